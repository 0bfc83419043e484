"""qwenhw.models: catalog numbers against published ones, checkpoint headers, hub cache, memory math."""

from __future__ import annotations

import doctest
import json
import math
import os
import struct
import subprocess
import sys

import pytest

from qwenhw.errors import BadInput
from qwenhw.models import (
    GiB,
    Quantization,
    active_bytes_per_token,
    expert_bytes,
    find_local_weights,
    from_checkpoint,
    get,
    kv_bytes_per_token,
    linear_state_bytes_per_seq,
    missing_weights_message,
    names,
    resolve_model,
    split_weight_bytes,
    tensor_bytes,
    weight_bytes_split,
)
from qwenhw.models import catalog, memory, spec
from qwenhw.models.catalog import KNOWN_CHECKPOINT_BYTES, PUBLISHED_PARAMS_B

KiB = 1024


# --- catalog ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_catalog_totals_match_published(name):
    total_b, active_b = PUBLISHED_PARAMS_B[name]
    s = get(name)
    assert s.total_params() / 1e9 == pytest.approx(total_b, rel=0.01)
    if active_b is not None:  # model cards round the active count to one decimal or to a whole B
        assert s.active_params() / 1e9 == pytest.approx(active_b, rel=0.02)


@pytest.mark.parametrize("name", sorted(KNOWN_CHECKPOINT_BYTES))
def test_catalog_matches_official_safetensors_index_bytes_exactly(name):
    assert 2 * get(name).total_params() == KNOWN_CHECKPOINT_BYTES[name]
    assert weight_bytes_split(get(name)).total == KNOWN_CHECKPOINT_BYTES[name]


def test_moe_totals_from_environment_notes():
    assert get("Qwen3-30B-A3B").total_params() == 30_532_122_624
    assert round(get("Qwen3-235B-A22B").total_params() / 1e9, 1) == 235.1
    assert round(get("Qwen3-Coder-480B-A35B-Instruct").total_params() / 1e9, 1) == 480.2
    # Qwen3-Next layout: same count as the Qwen3-Next-architecture checkpoint headers (79,674,391,296)
    nxt = get("Qwen3-Next-80B-A3B-Instruct")
    assert nxt.total_params() == 79_674_391_296 and nxt.active_params() == 3_874_929_408


@pytest.mark.parametrize("name,kib", [
    ("Qwen3-30B-A3B", 96), ("Qwen3-8B", 144), ("Qwen3-32B", 256), ("Qwen3-235B-A22B", 188),
    ("Qwen3-Coder-480B-A35B-Instruct", 248), ("Qwen3-Next-80B-A3B-Instruct", 24), ("Qwen2.5-72B-Instruct", 320),
])
def test_kv_bytes_per_token(name, kib):
    assert kv_bytes_per_token(get(name)) == kib * KiB
    assert kv_bytes_per_token(get(name), "fp8") == kib * KiB // 2
    assert kv_bytes_per_token(get(name + "-FP8" if name.startswith("Qwen3") else name), "auto") == kib * KiB


def test_architecture_details():
    s = get("Qwen3-0.6B")
    assert (s.hidden_size, s.num_heads, s.head_dim, s.tie_embeddings) == (1024, 16, 128, True)
    assert get("Qwen3-1.7B").tie_embeddings and get("Qwen3-4B").tie_embeddings
    assert not get("Qwen3-8B").tie_embeddings and not get("Qwen3-32B").tie_embeddings
    for size in ("7B", "14B", "32B", "72B"):
        q = get(f"Qwen2.5-{size}-Instruct")
        assert q.attention_bias and not q.qk_norm and not q.tie_embeddings
        assert q.head_dim == q.hidden_size // q.num_heads and q.max_position == 32768 and q.thinking == "none"
    assert get("Qwen3-8B").qk_norm and not get("Qwen3-8B").attention_bias
    assert get("Qwen2.5-72B-Instruct").intermediate_size == 29568
    assert get("Qwen2.5-72B-Instruct-AWQ").intermediate_size == 29696  # Qwen padded its int4 forms for TP=8
    n = get("Qwen3-Next-80B-A3B-Thinking")
    la, m = n.linear_attention, n.moe
    assert (n.num_layers, n.num_full_attention_layers, n.num_heads, n.num_kv_heads, n.head_dim) == (48, 12, 16, 2, 256)
    assert (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim, la.conv_kernel) == (16, 32, 128, 128, 4)
    assert (m.num_experts, m.top_k, m.moe_intermediate_size, m.shared_expert_intermediate_size) == (512, 10, 512, 512)
    assert n.attn_output_gate and n.max_position == 262144


def test_context_and_thinking_modes():
    assert get("Qwen3-8B").max_position == 40960 and get("Qwen3-8B").thinking == "hybrid"
    assert get("Qwen3-235B-A22B").thinking == "hybrid"
    for n in ("Qwen3-30B-A3B-Instruct-2507", "Qwen3-235B-A22B-Instruct-2507-FP8", "Qwen3-4B-Instruct-2507",
              "Qwen3-Coder-30B-A3B-Instruct", "Qwen3-Next-80B-A3B-Instruct"):
        assert get(n).thinking == "none" and get(n).max_position == 262144, n
    for n in ("Qwen3-30B-A3B-Thinking-2507", "Qwen3-235B-A22B-Thinking-2507", "Qwen3-Next-80B-A3B-Thinking-FP8"):
        assert get(n).thinking == "thinking" and get(n).max_position == 262144, n


def test_quantized_variants_keep_parent_shape():
    for name in names():
        s = get(name)
        assert s.hf_id == f"Qwen/{name}"
        for suffix in ("-FP8", "-AWQ", "-GPTQ-Int4"):
            if name.endswith(suffix):
                parent = get(name[: -len(suffix)])
                same = [f for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "moe", "vocab_size")
                        if getattr(s, f) != getattr(parent, f)]
                assert not same, (name, same)
                assert parent.quant.method is None and s.quant.method is not None
    assert get("Qwen3-30B-A3B-FP8").quant == Quantization("fp8", 8, 128)
    assert get("Qwen3-235B-A22B-Instruct-2507-FP8").quant.method == "fp8"
    assert get("Qwen3-32B-AWQ").quant.method == "awq" and get("Qwen3-32B-AWQ").dtype == "fp16"
    assert get("Qwen2.5-7B-Instruct-GPTQ-Int4").quant.method == "gptq"
    assert len(set(names())) == len(names()) >= 50


def test_aliases_are_case_insensitive_with_or_without_org():
    for alias in ("Qwen3-30B-A3B", "qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "QWEN/qwen3_30b_a3b", " qwen3-30B-A3B "):
        assert get(alias).name == "Qwen3-30B-A3B"
    assert get("qwen/qwen3-235b-a22b-instruct-2507-fp8").name == "Qwen3-235B-A22B-Instruct-2507-FP8"


def test_unknown_name_suggests_closest():
    with pytest.raises(BadInput) as e:
        get("Qwen3-30B-A3")
    msg = str(e.value)
    assert "Qwen3-30B-A3B" in msg and "\n" not in msg and e.value.exit_code == 2
    with pytest.raises(BadInput, match="Qwen3-235B-A22B"):
        get("qwen3-235b")


def test_weight_bytes_split_and_roofline():
    s = get("Qwen3-30B-A3B")
    w = weight_bytes_split(s)
    assert w.total == 2 * s.total_params() and w.embeddings == 2 * 2 * 151936 * 2048
    assert w.experts == 48 * 128 * 3 * 2048 * 768 * 2 and w.experts / w.total > 0.94  # experts ~95% of bytes
    assert expert_bytes(s) == 3 * 2048 * 768 * 2
    # ENVIRONMENT.md: experts in host RAM cost 48 x 8 experts x 9 MiB = 3.62 GB per token
    assert 48 * 8 * expert_bytes(s) == pytest.approx(3.62e9, rel=0.01)
    assert active_bytes_per_token(s) == w.non_expert + w.embeddings // 2 + w.experts * 8 // 128
    fp8 = weight_bytes_split(get("Qwen3-30B-A3B-FP8"))
    assert fp8.embeddings == w.embeddings  # embeddings and lm_head stay bf16
    assert fp8.experts == pytest.approx(w.experts / 2, rel=0.001)
    # vLLM loaded Qwen/Qwen3-32B-AWQ as "18.00 GiB total" weights
    assert weight_bytes_split(get("Qwen3-32B-AWQ")).total / GiB == pytest.approx(18.00, rel=0.01)
    dense = weight_bytes_split(get("Qwen3-8B"))
    assert dense.experts == 0 and expert_bytes(get("Qwen3-8B")) == 0


def test_weight_bytes_split_scales_to_exact_disk_bytes():
    s = get("Qwen3-30B-A3B-FP8").with_(weight_bytes=32_000_000_001)
    w = weight_bytes_split(s)
    assert w.total == 32_000_000_001 == w.embeddings + w.non_expert + w.experts


def test_linear_state_bytes():
    # 36 Gated DeltaNet layers x (32 x 128 x 128 fp32 recurrent + (2*2048+4096) x 3 bf16 conv)
    assert linear_state_bytes_per_seq(get("Qwen3-Next-80B-A3B-Instruct")) == 36 * (32 * 128 * 128 * 4 + 8192 * 3 * 2)
    assert linear_state_bytes_per_seq(get("Qwen3-8B")) == 0


def test_doctests():
    from qwenhw.planning import layout

    for mod in (spec, memory, catalog, layout):
        failures, _ = doctest.testmod(mod)
        assert failures == 0, mod.__name__


def test_import_is_light():
    code = ("import sys, qwenhw.models; bad = [m for m in ('torch', 'transformers', 'huggingface_hub') "
            "if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(catalog.__file__)))))
    assert r.returncode == 0, r.stdout + r.stderr


# --- fake checkpoints (no torch: headers written by hand) -------------------------------------------
_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I32": 4}


def write_safetensors(file, tensors, metadata=None):
    """tensors: name -> (dtype, shape). Writes a valid safetensors file of zeros; returns data bytes."""
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * _SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(off))
    return off


H, LAYERS, HEADS, KV, HD, E, TOPK, MI, V = 64, 2, 4, 2, 16, 4, 2, 32, 128

MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
    "intermediate_size": 256, "moe_intermediate_size": MI, "num_experts": E, "num_experts_per_tok": TOPK,
    "vocab_size": V, "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1000000.0,
}


def moe_tensors(fused=False):
    t = {"model.embed_tokens.weight": ("BF16", (V, H)), "lm_head.weight": ("BF16", (V, H)),
         "model.norm.weight": ("BF16", (H,))}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": ("BF16", (H,)), p + "post_attention_layernorm.weight": ("BF16", (H,)),
                  p + "self_attn.q_proj.weight": ("BF16", (HEADS * HD, H)),
                  p + "self_attn.k_proj.weight": ("BF16", (KV * HD, H)),
                  p + "self_attn.v_proj.weight": ("BF16", (KV * HD, H)),
                  p + "self_attn.o_proj.weight": ("BF16", (H, HEADS * HD)),
                  p + "self_attn.q_norm.weight": ("BF16", (HD,)), p + "self_attn.k_norm.weight": ("BF16", (HD,)),
                  p + "mlp.gate.weight": ("BF16", (E, H))})
        if fused:  # transformers 5 layout
            t[p + "mlp.experts.gate_up_proj"] = ("BF16", (E, 2 * MI, H))
            t[p + "mlp.experts.down_proj"] = ("BF16", (E, H, MI))
        else:
            for x in range(E):
                for proj, shape in (("gate_proj", (MI, H)), ("up_proj", (MI, H)), ("down_proj", (H, MI))):
                    t[f"{p}mlp.experts.{x}.{proj}.weight"] = ("BF16", shape)
    return t


def make_checkpoint(path, config=None, tensors=None, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or MOE_CONFIG))
    (path / "tokenizer.json").write_text("{}")  # present, as in every released checkpoint (plan checks it)
    tensors = tensors or moe_tensors()
    items = list(tensors.items())
    if shards == 1:
        return write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    total, weight_map = 0, {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(items[k::shards])
        total += write_safetensors(path / fname, part)
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def _headers(path):
    total = 0
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with open(path / f, "rb") as fh:
                total += 8 + struct.unpack("<Q", fh.read(8))[0]
    return total


def _file_sizes(path):
    return sum(os.path.getsize(path / f) for f in os.listdir(path) if f.endswith(".safetensors"))


def test_checkpoint_weight_bytes_exact(tmp_path):
    ck = tmp_path / "tiny-moe"
    data = make_checkpoint(ck)
    s = from_checkpoint(str(ck))
    assert s.weight_bytes == data == _file_sizes(ck) - _headers(ck)
    assert s.weight_bytes == sum(nb for _, _, nb in tensor_bytes(str(ck)).values())
    assert s.weight_bytes == 2 * s.total_params()  # the spec's parameter formulas match the real tensor layout
    assert (s.name, s.source, s.path, s.architecture) == ("tiny-moe", "checkpoint", str(ck), "qwen3_moe")
    assert (s.moe.num_experts, s.moe.top_k, s.moe.moe_intermediate_size) == (E, TOPK, MI)
    assert s.quant.method is None and s.dtype == "bf16" and not s.tie_embeddings
    assert "__metadata__" not in tensor_bytes(str(ck))
    split = split_weight_bytes(str(ck))
    assert split["embeddings"] == 2 * V * H * 2
    assert split["experts"] == LAYERS * E * 3 * H * MI * 2
    assert split["total"] == split["embeddings"] + split["experts"] + split["non_expert"] == data
    w = weight_bytes_split(s)  # the spec's estimate, pinned to disk, agrees with the header split here
    assert (w.embeddings, w.experts, w.non_expert) == (split["embeddings"], split["experts"], split["non_expert"])


def test_sharded_checkpoint_and_fused_experts(tmp_path):
    ck = tmp_path / "sharded"
    cfg = {k: v for k, v in MOE_CONFIG.items() if k not in ("num_experts", "rope_theta", "torch_dtype")}
    cfg.update(num_local_experts=E, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="bfloat16")
    data = make_checkpoint(ck, cfg, moe_tensors(fused=True), shards=3)
    s = from_checkpoint(str(ck))
    assert s.moe.num_experts == E
    assert s.weight_bytes == data == _file_sizes(ck) - _headers(ck) == 2 * s.total_params()
    assert split_weight_bytes(str(ck))["experts"] == LAYERS * E * 3 * H * MI * 2
    os.remove(ck / "model-00002-of-00003.safetensors")
    with pytest.raises(BadInput, match="missing"):
        from_checkpoint(str(ck))


def test_numpy_safetensors_headers(tmp_path):
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"a": np.zeros((3, 5), np.float16), "b": np.zeros((7,), np.float32), "c": np.zeros((2, 2, 2), np.int32)}
    st.save_file(arrays, str(tmp_path / "x.safetensors"))
    got = tensor_bytes(str(tmp_path / "x.safetensors"))
    assert got == {"a": ("F16", (3, 5), 30), "b": ("F32", (7,), 28), "c": ("I32", (2, 2, 2), 32)}


def test_quantization_configs(tmp_path):
    fp8 = dict(MOE_CONFIG, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                "weight_block_size": [128, 128]})
    make_checkpoint(tmp_path / "Qwen3-30B-A3B-FP8", fp8)
    s = from_checkpoint(str(tmp_path / "Qwen3-30B-A3B-FP8"))
    assert s.quant.method == "fp8" and s.quant.bits == 8 and s.quant.group_size == 128
    awq = dict(MOE_CONFIG, model_type="qwen2", torch_dtype="float16",
               quantization_config={"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm",
                                    "zero_point": True, "modules_to_not_convert": None})
    for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        awq.pop(k)
    make_checkpoint(tmp_path / "Qwen2.5-7B-Instruct-AWQ", awq, {"x": ("I32", (4,))})
    a = from_checkpoint(str(tmp_path / "Qwen2.5-7B-Instruct-AWQ"))
    assert (a.quant.method, a.quant.bits, a.dtype, a.attention_bias, a.qk_norm, a.thinking) == \
        ("awq", 4, "fp16", True, False, "none")
    gptq = dict(awq, quantization_config={"bits": 4, "group_size": 128, "quant_method": "gptq", "desc_act": False})
    make_checkpoint(tmp_path / "g", gptq, {"x": ("I32", (4,))})
    assert from_checkpoint(str(tmp_path / "g")).quant == Quantization("gptq", 4, 128)
    bnb = dict(MOE_CONFIG, quantization_config={"quant_method": "bitsandbytes"})
    make_checkpoint(tmp_path / "b", bnb)
    with pytest.raises(BadInput, match="bitsandbytes"):
        from_checkpoint(str(tmp_path / "b"))


def test_qwen3_next_config(tmp_path):
    cfg = {"model_type": "qwen3_next", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 16,
           "num_key_value_heads": 2, "head_dim": 256, "intermediate_size": 5120, "vocab_size": 151936,
           "max_position_embeddings": 262144, "full_attention_interval": 4, "linear_num_key_heads": 16,
           "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
           "linear_conv_kernel_dim": 4, "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
           "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    make_checkpoint(tmp_path / "Qwen3-Next-80B-A3B-Instruct", cfg, {"x": ("BF16", (4,))})
    s = from_checkpoint(str(tmp_path / "Qwen3-Next-80B-A3B-Instruct"))
    ref = get("Qwen3-Next-80B-A3B-Instruct")
    assert s.total_params() == ref.total_params() and s.linear_attention == ref.linear_attention
    assert s.attn_output_gate and s.thinking == "none"


@pytest.mark.parametrize("case,match", [
    ("missing_dir", "does not exist"), ("no_config", "no config.json"), ("malformed", "not valid JSON"),
    ("llama", "not a supported"), ("missing_keys", "hidden_size"), ("truncated", "safetensors"),
])
def test_bad_checkpoints(tmp_path, case, match):
    ck = tmp_path / "ck"
    if case != "missing_dir":
        ck.mkdir()
    if case == "malformed":
        (ck / "config.json").write_text('{"model_type": "qwen3",, }')
    elif case == "llama":
        (ck / "config.json").write_text(json.dumps(dict(MOE_CONFIG, model_type="llama")))
    elif case == "missing_keys":
        (ck / "config.json").write_text(json.dumps({k: v for k, v in MOE_CONFIG.items() if k != "hidden_size"}))
    elif case == "truncated":
        make_checkpoint(ck)
        with open(ck / "model.safetensors", "r+b") as f:
            f.truncate(20)
    with pytest.raises(BadInput, match=match) as e:
        from_checkpoint(str(ck))
    assert str(ck) in str(e.value) and "\n" not in str(e.value)


# --- hub cache ----------------------------------------------------------------------------------------
def make_hub_cache(root, repo_id, config, tensors, commit="0123456789abcdef0123456789abcdef01234567", ref=True):
    """Lay out a repo as huggingface_hub does: blobs/, snapshots/<commit>/ symlinks, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "cfg").write_text(json.dumps(config))
    data = write_safetensors(blobs / "st", tensors)
    (blobs / "tok").write_text("{}")
    os.symlink(blobs / "cfg", snap / "config.json")
    os.symlink(blobs / "st", snap / "model.safetensors")
    os.symlink(blobs / "tok", snap / "tokenizer.json")
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return snap, data


QWEN3_8B_CONFIG = {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
                   "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_catalog_name_picks_up_cached_checkpoint(hub):
    snap, data = make_hub_cache(hub, "Qwen/Qwen3-8B", QWEN3_8B_CONFIG, {"w": ("BF16", (8, 8))})
    for arg in ("Qwen/Qwen3-8B", "qwen3-8b"):
        s = resolve_model(arg)
        assert (s.name, s.source, s.weight_bytes, s.path, s.thinking) == ("Qwen3-8B", "catalog", data, str(snap), "hybrid")
    assert find_local_weights(get("Qwen3-8B")) == str(snap)
    assert resolve_model(str(snap)).name == "Qwen3-8B"  # a snapshot path is named by its repo, not its hash
    # huggingface_hub itself finds the same snapshot when given the cache dir explicitly
    from huggingface_hub import snapshot_download
    assert snapshot_download("Qwen/Qwen3-8B", local_files_only=True, cache_dir=str(hub)) == str(snap)


def test_cached_checkpoint_that_differs_from_catalog_wins(hub):
    make_hub_cache(hub, "Qwen/Qwen3-8B", dict(QWEN3_8B_CONFIG, num_hidden_layers=2), {"w": ("BF16", (8,))})
    s = resolve_model("Qwen/Qwen3-8B")
    assert s.num_layers == 2 and s.name == "Qwen3-8B" and s.weight_bytes == 16 and "differs" in s.notes[-1]


def test_uncached_catalog_name_and_missing_weights_message(hub):
    s = resolve_model("Qwen/Qwen3-30B-A3B-FP8")
    assert s.name == "Qwen3-30B-A3B-FP8" and s.weight_bytes is None and s.path is None
    assert find_local_weights(s) is None
    msg = missing_weights_message(s)
    assert str(hub / "models--Qwen--Qwen3-30B-A3B-FP8") in msg
    assert "hf download Qwen/Qwen3-30B-A3B-FP8" in msg and "huggingface-cli download" in msg


def test_hub_id_outside_catalog(hub):
    snap, data = make_hub_cache(hub, "acme/tiny-moe", MOE_CONFIG, moe_tensors(), ref=False)  # pinned revision
    s = resolve_model("acme/tiny-moe")
    assert (s.name, s.hf_id, s.path, s.weight_bytes, s.source) == ("acme/tiny-moe", "acme/tiny-moe", str(snap), data,
                                                                   "checkpoint")
    with pytest.raises(BadInput, match="huggingface-cli download acme/nothing") as e:
        resolve_model("acme/nothing")
    assert str(hub) in str(e.value)


def test_resolve_local_dir_and_unknowns(hub, tmp_path):
    make_checkpoint(tmp_path / "mine")
    assert resolve_model(str(tmp_path / "mine")).weight_bytes == 2 * resolve_model(str(tmp_path / "mine")).total_params()
    with pytest.raises(BadInput, match="Qwen3-30B-A3B"):
        resolve_model("Qwen3-30B-A3")
    with pytest.raises(BadInput, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
