"""Pick and load the engines a worker holds, by the ``engine_backend`` setting."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.protocols import ImageEncoder, Reranker, TextEncoder
from pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Engines:
    text: TextEncoder
    image: ImageEncoder
    reranker: Reranker
    backend: str

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend, "siglip": self.text.version, "blip": self.reranker.version}


def _torch(settings: Settings) -> Engines:
    import torch

    from engines.blip import BlipReranker
    from engines.siglip import SiglipEncoder

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    siglip = SiglipEncoder(settings.siglip_model, device=settings.device, max_tokens=settings.text_max_tokens)
    blip = BlipReranker(settings.blip_model, device=settings.device)
    return Engines(text=siglip, image=siglip, reranker=blip, backend="torch")


BACKENDS: dict[str, Callable[[Settings], Engines]] = {"torch": _torch}


def load_engines(settings: Settings) -> Engines:
    try:
        loader = BACKENDS[settings.engine_backend]
    except KeyError:
        raise ValueError(f"unknown engine backend {settings.engine_backend!r}; valid: {', '.join(sorted(BACKENDS))}") from None
    engines = loader(settings)
    log.info("engines loaded: %s", engines.describe())
    return engines
