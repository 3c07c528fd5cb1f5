"""SigLIP (transformers ``SiglipModel``): text tower for queries, image tower for ingest."""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

from engines.loading import resolve, version_of
from pipeline.types import Vector

_PUNCT = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """The original's text cleaning (open_clip's 'canonicalize'): lower case, no punctuation, single spaces."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _features(out: object) -> torch.Tensor:
    # transformers 5 may return an output object rather than the pooled tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


class SiglipEncoder:
    """Both SigLIP towers; L2-normalised float32 vectors out."""

    def __init__(self, source: str, *, device: str = "cpu", max_tokens: int = 64, setting: str = "IMGSEARCH_SIGLIP_MODEL",
                 dtype: torch.dtype | None = None) -> None:
        path = resolve(source, setting)
        self.version = version_of(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = SiglipModel.from_pretrained(path).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.max_tokens = max_tokens
        self.dim = int(self.encode_text(["warm up"]).shape[1])

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> Vector:
        # padded to max length, as SigLIP was trained: its pooled output is the last position
        tok = self.tokenizer([canonicalize(t) for t in texts], padding="max_length", max_length=self.max_tokens,
                             truncation=True, return_tensors="pt")
        with self._autocast():
            feats = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> Vector:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with self._autocast():
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
