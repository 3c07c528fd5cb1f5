"""SigLIP (transformers ``SiglipModel``): text tower for queries, image tower for ingest.

``SiglipBase`` holds what every backend shares: the model folder, its version, the tokenizer with the text layout
its tower was trained on (checked at load, ``engines.tokens``), the image processor (pre), and L2 normalisation
(post). Each backend supplies the two cores that turn model inputs into raw features (``_text_core``, ``_image_core``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from transformers import AutoImageProcessor, SiglipModel

from engines import packed as packing
from engines.loading import load_tokenizer, resolve, version_of
from engines.tokens import check_layout, tokenize
from pipeline.types import Vector

SETTING = "IMGSEARCH_SIGLIP_MODEL"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_TEXTS = ["a surprised cat face on a white background", "two red circles", "warm up"]  # torch int8's check


def dtype_of(precision: str) -> torch.dtype:
    """The dtype a torch engine of ``precision`` loads its weights in and computes in between its products: int8's
    products run on int8 copies of the linear weights (``engines/intmm.py``) and everything else in fp32."""
    return torch.float32 if precision == "int8" else DTYPES[precision]


def l2(x: NDArray[Any]) -> Vector:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def features(out: object) -> torch.Tensor:
    """transformers 5 may return an output object rather than the pooled tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


class SiglipBase:
    """Both SigLIP towers; L2-normalised float32 vectors out."""

    backend = "base"

    def __init__(self, source: str, *, max_tokens: int = 64, setting: str = SETTING,
                 lock: threading.Lock | None = None) -> None:
        self.path = resolve(source, setting)
        self.version = version_of(self.path)
        self.tokenizer = load_tokenizer(self.path, setting)
        self.processor = AutoImageProcessor.from_pretrained(self.path)
        config = json.loads((self.path / "config.json").read_text())
        # refuses tokenizer files that would give silently wrong vectors
        self.layout = check_layout(self.path, self.tokenizer, config, max_tokens)
        self.max_tokens = self.layout.max_tokens  # padded to this many; a small model may have fewer positions
        self.dim = 0
        # held while a model call runs; a worker's engines are built with one (``lock``), shared with its reranker
        self.lock = lock or threading.Lock()

    def _warm_up(self) -> None:
        self.dim = int(self.encode_text(["warm up"]).shape[1])

    # --- pre ---
    def text_inputs(self, texts: Sequence[str]) -> NDArray[np.int64]:
        """Ids in the trained layout (pieces, EOS, padding on the right to ``max_tokens``): the text tower pools
        the last position."""
        return tokenize(self.tokenizer, texts, self.max_tokens)

    def image_inputs(self, images: Sequence[Image.Image]) -> NDArray[np.float32]:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="np")["pixel_values"]
        return np.asarray(pixels, dtype=np.float32)

    # --- core (per backend) ---
    def _text_core(self, input_ids: NDArray[np.int64]) -> NDArray[Any]:
        raise NotImplementedError

    def _image_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        raise NotImplementedError

    # --- the TextEncoder / ImageEncoder protocols ---
    def encode_text(self, texts: Sequence[str]) -> Vector:
        ids = self.text_inputs(texts)
        with self.lock:
            return l2(self._text_core(ids))

    def encode_images(self, images: Sequence[Image.Image]) -> Vector:
        pixels = self.image_inputs(images)
        with self.lock:
            return l2(self._image_core(pixels))


class TorchSiglip(SiglipBase):
    """Weights are cast to the precision once at load (no autocast): autocast re-casts every weight on every
    call, which on a CPU costs more than bf16 saves, and at batch 1 on a GPU doubles the kernel launches."""

    backend = "torch"

    def __init__(self, source: str, *, device: str = "cpu", precision: str = "fp32", max_tokens: int = 64,
                 setting: str = SETTING, lock: threading.Lock | None = None, packed: bool = True) -> None:
        """``packed``: the text tower's linear weights packed once for oneDNN where that pays (bf16 on a CPU,
        ``engines/packed.py``)."""
        super().__init__(source, max_tokens=max_tokens, setting=setting, lock=lock)
        self.device = torch.device(device)
        if precision == "int8":
            from engines import intmm

            intmm.require(self.device)
        self.dtype = dtype_of(precision)
        self.model = SiglipModel.from_pretrained(self.path, dtype=self.dtype).eval().to(self.device)
        text = self.model.text_model
        self.packed_bytes = 0
        if precision == "int8":  # the text tower's linear products in int8 (engines/intmm.py), checked at load
            probe = torch.from_numpy(self.text_inputs(PROBE_TEXTS)).to(self.device)
            self.packed_bytes = intmm.check(
                f"{self.version}/siglip_text (torch int8)",
                lambda: {"text": features(self.model.get_text_features(input_ids=probe)).float().numpy()},
                lambda: intmm.quantize_linears(text))
        elif packed and packing.available(self.dtype, self.device, int(text.config.hidden_size)):
            self.packed_bytes = packing.pack_linears(text)
        self._warm_up()

    @torch.inference_mode()
    def _text_core(self, input_ids: NDArray[np.int64]) -> NDArray[Any]:
        out = features(self.model.get_text_features(input_ids=torch.from_numpy(input_ids).to(self.device)))
        return out.float().cpu().numpy()  # type: ignore[no-any-return]

    @torch.inference_mode()
    def _image_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        pixels = torch.from_numpy(pixel_values).to(self.device, self.dtype)
        out = features(self.model.get_image_features(pixel_values=pixels))
        return out.float().cpu().numpy()  # type: ignore[no-any-return]
