"""Find a model's files (a local folder, or a hub id resolved through the local hub cache or the hub), load its
tokenizer, and name its version.

Offline, a hub id resolves from the Hugging Face cache: with ``HF_HUB_OFFLINE=1`` the hub is never called, and
without it a hub that can't be reached falls back to the cached snapshot (huggingface_hub does both).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError
from pipeline.vendor import needs_extra

log = logging.getLogger(__name__)

# everything but the weights that decides what a model computes from a text or an image
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
SAFETENSORS = "*.safetensors"
PICKLED = "pytorch_model*.bin"
_FILES = ["*.json", "*.model", "*.txt"]


def weight_files(path: Path) -> list[Path]:
    """The weights transformers loads from ``path``: safetensors, else ``pytorch_model*.bin``."""
    return sorted(path.glob(SAFETENSORS)) or sorted(path.glob(PICKLED))


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

        path = Path(snapshot_download(source, allow_patterns=[*_FILES, SAFETENSORS]))
        if not weight_files(path):
            # a repo with only pickled weights (older checkpoints); transformers reads them with its restricted,
            # weights-only unpickler
            path = Path(snapshot_download(source, allow_patterns=[*_FILES, PICKLED, "pytorch_model.bin.index.json"]))
    except Exception as exc:  # the hub raises many types; all mean "not here"
        raise ModelLoadError(
            f"could not load the model {source!r} (set by {setting}): it is not a local folder and the model hub "
            f"could not provide it ({type(exc).__name__}); offline (HF_HUB_OFFLINE=1) it must be in the Hugging Face "
            f"cache (HF_HOME). Set {setting} to a local model folder, e.g. the one `imgsearch models tiny DIR` "
            "writes") from None
    if not weight_files(path):
        raise ModelLoadError(f"the model {source!r} (set by {setting}) has no weights: neither *.safetensors nor "
                             f"pytorch_model.bin in {path}")
    return path


def load_tokenizer(path: Path, setting: str) -> Any:
    """The folder's tokenizer; a SentencePiece one (SigLIP v1) without the package fails with what to install."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (ImportError, ValueError, OSError) as exc:
        if "sentencepiece" in str(exc).lower() or "protobuf" in str(exc).lower():
            raise ModelLoadError(needs_extra(f"the tokenizer of {path} (set by {setting}) is a SentencePiece model "
                                             "and needs the sentencepiece package", "worker")) from None
        raise ModelLoadError(f"could not load the tokenizer of {path} (set by {setting}): {exc}") from None


def version_of(path: Path) -> str:
    """A short, stable fingerprint of a model folder: its name plus a hash of its config, its weights, and its
    tokenizer and preprocessor files (a changed tokenizer changes every vector, as changed weights do)."""
    h = hashlib.sha256()
    for name in (*CONFIG_FILES, *TOKENIZER_FILES, *PREPROCESSOR_FILES):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    for weights in weight_files(path):
        h.update(weights.name.encode() + b"\0")
        with weights.open("rb") as fh:
            h.update(fh.read(64 << 20))  # the first 64 MiB and the size tell checkpoints apart cheaply
        h.update(str(weights.stat().st_size).encode())
    return f"{path.name}-{h.hexdigest()[:12]}"
