"""MODEL argument -> ModelSpec: a local directory, a catalog name, or a hub id in the local HF cache.

Never touches the network: the Hugging Face cache is only looked up (huggingface_hub is imported inside
the functions that need it, so `import qwenhw.models` stays light).
"""

from __future__ import annotations

import glob
import os
import re

from .. import settings
from ..errors import BadInput
from . import catalog
from .checkpoint import from_checkpoint, problems
from .spec import ModelSpec

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+$")
_SHAPE_FIELDS = ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "vocab_size", "moe", "linear_attention")


def hub_cache_dir() -> str:
    return str(settings.hub_cache_dir())


def _repo_dir(repo_id: str, cache_dir: str) -> str:
    return os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The cached snapshot directory of `repo_id` (revision main) holding a config.json, or None."""
    if not repo_id or not _HUB_ID.fullmatch(repo_id):
        return None
    cache_dir = cache_dir or hub_cache_dir()
    if not os.path.isdir(_repo_dir(repo_id, cache_dir)):
        return None  # spares the huggingface_hub import when nothing is cached
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    if isinstance(found, str):
        return os.path.dirname(found)
    # No refs/main (downloaded at a pinned revision): take the newest snapshot that has a config.json.
    configs = glob.glob(os.path.join(_repo_dir(repo_id, cache_dir), "snapshots", "*", "config.json"))
    return os.path.dirname(max(configs, key=os.path.getmtime)) if configs else None


def _has_weights(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "*.safetensors")))


def find_local_weights(spec: ModelSpec, cache_dir: str | None = None) -> str | None:
    """A local directory holding the model's safetensors: spec.path, else its hub cache snapshot."""
    if spec.path and _has_weights(spec.path):
        return spec.path
    snap = cached_snapshot(spec.hf_id, cache_dir)
    return snap if snap and _has_weights(snap) else None


def missing_weights_message(spec: ModelSpec, cache_dir: str | None = None) -> str:
    cache_dir = cache_dir or hub_cache_dir()
    repo = spec.hf_id or f"Qwen/{spec.name}"
    return (f"No local weights for {spec.name}: looked in {_repo_dir(repo, cache_dir)} (the Hugging Face hub "
            f"cache, set by HF_HUB_CACHE or HF_HOME) and found no *.safetensors. Download them with "
            f"`hf download {repo}` (or `huggingface-cli download {repo}`), or pass a local checkpoint "
            "directory instead. Planning does not need the weights.")


def _with_checkpoint(spec: ModelSpec, snapshot: str) -> ModelSpec:
    """Catalog entry + the cached checkpoint's exact bytes; the checkpoint's shape wins if it differs. A
    download cut short plans as the catalog entry, saying so (`run` then asks for the download)."""
    ck = from_checkpoint(snapshot, name=spec.name, complete=None)
    if ck.weight_bytes is None:
        return spec  # only config.json is cached
    wrong = problems(snapshot)
    if wrong:
        return spec.with_(notes=spec.notes + (f"the cached download at {snapshot} is incomplete ({'; '.join(wrong)}): "
                                              f"`hf download {spec.hf_id}` resumes it",))
    if all(getattr(ck, f) == getattr(spec, f) for f in _SHAPE_FIELDS):
        return spec.with_(weight_bytes=ck.weight_bytes, path=snapshot)
    return ck.with_(hf_id=spec.hf_id, thinking=spec.thinking,
                    notes=ck.notes + (f"cached checkpoint differs from the catalog's {spec.name}; using the checkpoint",))


def resolve_model(name_or_path: str, *, cache_dir: str | None = None, weights: bool = True) -> ModelSpec:
    """A ModelSpec for a local checkpoint directory, a catalog name or a hub id (cache only, no network).
    A directory must hold what `run` needs: its weights (unless `weights` is false: random weights) and a
    tokenizer."""
    arg = str(name_or_path).strip()
    local = os.path.expanduser(arg)
    if os.path.isdir(local):
        snap = os.path.abspath(local)
        m = _SNAPSHOT.search(snap)  # a hub cache snapshot: name it by its repo, not by its commit hash
        if not m:
            return from_checkpoint(snap, complete=weights)
        repo = f"{m[1]}/{m[2]}"
        spec = catalog.lookup(repo)
        return (_with_checkpoint(spec, snap) if spec else
                from_checkpoint(snap, name=repo, complete=weights).with_(hf_id=repo))
    if os.path.exists(local):
        raise BadInput(f"{arg} is a file, not a checkpoint directory: give the directory that holds config.json "
                       "and the *.safetensors files (or a catalog name such as Qwen3-30B-A3B).")
    if arg.startswith((".", "/", "~")) or (os.sep in arg and not _HUB_ID.fullmatch(arg)):
        raise BadInput(f"Checkpoint directory {arg} does not exist. Check the path, or give a catalog name such "
                       "as Qwen3-30B-A3B or a hub id such as Qwen/Qwen3-8B.")

    spec = catalog.lookup(arg)
    if spec is not None:
        snap = cached_snapshot(spec.hf_id, cache_dir)
        return _with_checkpoint(spec, snap) if snap else spec

    if _HUB_ID.fullmatch(arg):
        snap = cached_snapshot(arg, cache_dir)
        if snap:
            return from_checkpoint(snap, name=arg, complete=weights).with_(hf_id=arg)
        where = _repo_dir(arg, cache_dir or hub_cache_dir())
        near = catalog.closest(arg)
        raise BadInput(f"Model {arg!r} is neither in the built-in catalog nor in the local Hugging Face cache "
                       f"(looked in {where}). Download it with `huggingface-cli download {arg}` (or `hf download "
                       f"{arg}`), or pass a local checkpoint directory"
                       + (f"; closest catalog names: {', '.join(near)}." if near else "."))
    raise BadInput(catalog.unknown_model_message(arg))
