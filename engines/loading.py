"""Find a model's files: a local folder, or a hub id resolved through the local hub cache or the hub."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pipeline.errors import ModelLoadError

log = logging.getLogger(__name__)


def resolve(source: str, setting: str) -> Path:
    """The folder holding ``source``'s files. Fails with one message that names the setting to change."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{setting}={source!r} is a folder without config.json; point it at a saved "
                                 "transformers model folder")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # the hub raises many types; all mean "not here"
        raise ModelLoadError(
            f"could not load the model {source!r} (set by {setting}): it is not a local folder and the model hub "
            f"could not provide it ({type(exc).__name__}). Set {setting} to a local model folder, e.g. the one "
            "`imgsearch models tiny DIR` writes") from None


def version_of(path: Path) -> str:
    """A short, stable fingerprint of a model folder: its name plus a hash of its config and weights."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as fh:
            h.update(fh.read(64 << 20))  # the first 64 MiB and the size tell checkpoints apart cheaply
        h.update(str(weights.stat().st_size).encode())
    return f"{path.name}-{h.hexdigest()[:12]}"
