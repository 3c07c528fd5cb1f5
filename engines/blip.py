"""BLIP ITM (transformers ``BlipForImageTextRetrieval``) split at the seam the product needs.

Ingest runs the vision tower once per image and stores its output. A query then runs only the text side:
one unimodal pass for ITC and one batched cross-attention pass over all candidates for ITM. Both equal
the full forward on pixels (the split changes where work happens, not the numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

from engines.loading import resolve, version_of


class BlipReranker:
    def __init__(self, source: str, *, device: str = "cpu", setting: str = "IMGSEARCH_BLIP_MODEL",
                 dtype: torch.dtype | None = None, batch_size: int = 32, max_tokens: int = 64) -> None:
        path = resolve(source, setting)
        self.version = version_of(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.model = BlipForImageTextRetrieval.from_pretrained(path).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = AutoImageProcessor.from_pretrained(path)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def vision_features(self, images: Sequence[Image.Image]) -> NDArray[np.float16]:
        with self._autocast():
            feats = self.model.vision_model(pixel_values=self.pixels(images).to(self.device)).last_hidden_state
        return feats.to(torch.float16).cpu().numpy()

    @torch.inference_mode()
    def score(self, query: str, features: Sequence[NDArray[Any]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        if not features:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        tok = self.tokenizer([query], truncation=True, max_length=self.max_tokens, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        m = self.model
        itm_out, cos_out = [], []
        with self._autocast():
            # ITC: the query's unimodal text pass runs once, whatever the number of candidates
            text = m.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0, :]
            text_feat = torch.nn.functional.normalize(m.text_proj(text).float(), dim=-1)[0]
            for start in range(0, len(features), self.batch_size):
                chunk = features[start:start + self.batch_size]
                embeds = torch.from_numpy(np.stack([np.asarray(f, np.float32) for f in chunk])).to(self.device)
                image_feat = torch.nn.functional.normalize(m.vision_proj(embeds[:, 0, :]).float(), dim=-1)
                cos_out.append(image_feat @ text_feat)
                n = embeds.shape[0]
                hidden = m.text_encoder(
                    input_ids=ids.expand(n, -1), attention_mask=mask.expand(n, -1), encoder_hidden_states=embeds,
                    encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=self.device),
                ).last_hidden_state[:, 0, :]
                itm_out.append(torch.softmax(m.itm_head(hidden).float(), dim=-1)[:, 1])
        return torch.cat(itm_out).cpu().numpy(), torch.cat(cos_out).cpu().numpy()
