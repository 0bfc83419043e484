"""Bundled hardware profiles (qwenhw/hardware/profiles/*.json) and `--hardware NAME|FILE` resolution."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from ..errors import BadInput
from .profile import HardwareProfile


def _dir():
    return resources.files("qwenhw.hardware") / "profiles"


def bundled_names() -> list[str]:
    names = [p.name[: -len(".json")] for p in _dir().iterdir() if p.name.endswith(".json")]
    return sorted(names, key=lambda n: (n != "cpu-only", n.lower()))


def load_bundled(name: str) -> HardwareProfile:
    names = {n.lower(): n for n in bundled_names()}
    real = names.get(name.lower())
    if real is None:
        raise BadInput(_unknown_message(name))
    return HardwareProfile.from_json((_dir() / f"{real}.json").read_text(), source=f"bundled profile {real}")


def resolve_hardware(name_or_path=None) -> HardwareProfile:
    """A bundled name (case-insensitive), a JSON file path, a HardwareProfile, or None (detect this machine)."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    if name_or_path is None:
        from .detect import detect

        return detect()
    text = str(name_or_path)
    if text.lower() in (n.lower() for n in bundled_names()):
        return load_bundled(text)
    path = Path(text).expanduser()
    if path.is_file():
        try:
            content = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"Cannot read hardware profile {path}: {exc}.") from None
        return HardwareProfile.from_json(content, source=str(path))
    if path.exists():
        raise BadInput(f"{path} is a directory, not a hardware profile; pass a JSON file or a bundled name.")
    if text.endswith(".json") or "/" in text or "\\" in text:
        raise BadInput(
            f"Hardware profile file {path} does not exist. Create one with `qwenhw detect --json > {path.name}` "
            f"or use a bundled profile: {', '.join(bundled_names())}."
        )
    raise BadInput(_unknown_message(text))


def _unknown_message(name: str) -> str:
    names = bundled_names()
    lower = {n.lower(): n for n in names}
    close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.4)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"Unknown hardware profile {name!r}: it is neither a bundled profile nor an existing JSON file.{hint} "
        f"Bundled profiles: {', '.join(names)}. A file made by `qwenhw detect --json` works too."
    )
