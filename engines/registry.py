"""Pick and load the engines a worker holds, by the ``engines.backend`` and ``engines.precision`` settings
(``auto``, the default, for either: chosen on this machine at load, engines/auto.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engines.artifacts import check_precision
from pipeline.protocols import ImageEncoder, Reranker, TextEncoder
from pipeline.settings import IngestSettings, WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class Engines:
    text: TextEncoder
    image: ImageEncoder
    reranker: Reranker
    backend: str
    precision: str
    # held around every model call of these engines, built into each: the text encoder and the reranker never
    # run at once. Each call runs with a pool of threads sized to every core; the two at once oversubscribed
    # them, and throughput fell as load rose. (Ingest's parallel embed streams, ``load_image_engines``, keep a
    # lock each.)
    lock: threading.Lock
    chosen: dict[str, Any] | None = None  # how auto chose them (engines/auto.py Choice.describe); None: set

    def describe(self) -> dict[str, Any]:
        compiled = getattr(self.reranker, "compiled", None)  # the torch backend's ahead-of-time rerank pass
        return {"backend": self.backend, "precision": self.precision, "siglip": self.text.version,
                "blip": self.reranker.version, **({"rerank_compiled": compiled.path.name} if compiled else {}),
                **(self.chosen or {})}


def _torch(s: WorkerSettings) -> Engines:
    from engines.blip import TorchBlip
    from engines.siglip import TorchSiglip

    lock = threading.Lock()
    siglip = TorchSiglip(s.engines.siglip_model, device=s.engines.device, precision=s.engines.precision,
                         max_tokens=s.engines.text_max_tokens,
                         lock=lock, packed=s.engines.packed_weights == "auto")
    blip = TorchBlip(s.engines.blip_model, device=s.engines.device, precision=s.engines.precision,
                     max_tokens=s.engines.blip_max_tokens,
                     cross_attention=s.engines.blip_cross_attention, lock=lock, compiled=s.engines.compiled,
                     engine_dir=s.engines_path, packed=s.engines.packed_weights == "auto")
    return Engines(siglip, siglip, blip, "torch", s.engines.precision, lock)


def _onnxruntime(s: WorkerSettings) -> Engines:
    from engines.ort import OrtBlip, OrtSiglip

    lock = threading.Lock()
    siglip = OrtSiglip(s.engines.siglip_model, s.engines_path, max_tokens=s.engines.text_max_tokens, device=s.engines.device,
                       precision=s.engines.precision, threads=s.engines.intra_op_threads, lock=lock)
    blip = OrtBlip(s.engines.blip_model, s.engines_path, max_tokens=s.engines.blip_max_tokens,
                   cross_attention=s.engines.blip_cross_attention,
                   device=s.engines.device, precision=s.engines.precision, threads=s.engines.intra_op_threads, lock=lock)
    return Engines(siglip, siglip, blip, "onnxruntime", s.engines.precision, lock)


def _tensorrt(s: WorkerSettings) -> Engines:
    from engines.trt import TrtBlip, TrtSiglip

    lock = threading.Lock()
    siglip = TrtSiglip(s.engines.siglip_model, s.engines_path, precision=s.engines.precision,
                       max_tokens=s.engines.text_max_tokens,
                       lock=lock)
    blip = TrtBlip(s.engines.blip_model, s.engines_path, precision=s.engines.precision, max_tokens=s.engines.blip_max_tokens,
                   cross_attention=s.engines.blip_cross_attention, lock=lock)
    return Engines(siglip, siglip, blip, "tensorrt", s.engines.precision, lock)


BACKENDS: dict[str, Callable[[WorkerSettings], Engines]] = {"torch": _torch, "onnxruntime": _onnxruntime,
                                                      "tensorrt": _tensorrt}


def _load(settings: WorkerSettings) -> Engines:
    if settings.engines.backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {settings.engines.backend!r}; valid: auto, "
                         f"{', '.join(sorted(BACKENDS))}")
    check_precision(settings.engines.backend, settings.engines.precision)
    return BACKENDS[settings.engines.backend](settings)


def resolve_auto(settings: WorkerSettings) -> tuple[WorkerSettings, Engines | None, dict[str, Any] | None]:
    """``settings`` with ``auto`` replaced by this machine's choice (engines/auto.py), the chosen engines where
    the timed pass already loaded them, and how the choice was made. Settings without ``auto``: as they are."""
    from engines.auto import AUTO, choose

    if AUTO not in (settings.engines.backend, settings.engines.precision):
        return settings, None, None
    check_precision(settings.engines.backend, settings.engines.precision)
    choice, engines = choose(settings, _load)
    log.info("engines: auto chose %s %s: %s", choice.backend, choice.precision, choice.reason)
    concrete = settings.model_copy(update={"engines": {"backend": choice.backend, "precision": choice.precision}})
    return concrete, engines, choice.describe()


def load_engines(settings: WorkerSettings) -> Engines:
    """Load the configured engines; a missing model or engine raises one error naming what to set or build."""
    if settings.engines.intra_op_threads:
        import torch

        torch.set_num_threads(settings.engines.intra_op_threads)
    concrete, engines, chosen = resolve_auto(settings)
    engines = engines or _load(concrete)
    engines.chosen = chosen
    log.info("engines loaded: %s", engines.describe())
    return engines


def embed_streams(settings: IngestSettings) -> int:
    """How many embed streams an ingest run uses: IMGSEARCH_INGEST_EMBED_STREAMS, or on a CPU with ONNX Runtime
    one per core (each with one thread: on 2 cores 4 to 5% faster per image than one stream over both, and
    steadier beside the download threads); one elsewhere (torch's threads, or a GPU, gain nothing from it)."""
    import os

    if settings.ingest_embed_streams:
        return settings.ingest_embed_streams
    if settings.engines.backend == "onnxruntime" and settings.engines.device == "cpu":
        return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    return 1


def prepare_ingest_process(settings: IngestSettings) -> None:
    """Before any engine loads in a process that ingests: sessions with their own pools, if it will run
    parallel embed streams."""
    if embed_streams(settings) > 1 and settings.engines.backend == "onnxruntime":
        from engines.ort import per_session_pools

        per_session_pools()


def load_image_engines(settings: IngestSettings, engines: Engines | None = None) -> list[tuple[ImageEncoder, Reranker]]:
    """The (SigLIP image, BLIP vision) pairs an ingest run embeds with: the loaded engines alone, or as many
    single-threaded ONNX Runtime replicas (image sessions only) as ``embed_streams`` says."""
    n = embed_streams(settings)
    if n > 1 and settings.engines.backend == "onnxruntime":
        from engines.ort import per_session_pools

        if not per_session_pools():
            log.warning("ONNX Runtime's global thread pool is already in use here: ingest embeds in one stream "
                        "(call engines.ort.per_session_pools() before loading any engine)")
            n = 1
    if n <= 1 or settings.engines.backend != "onnxruntime":
        e = engines or load_engines(settings)
        return [(e.image, e.reranker)]
    from engines.ort import OrtBlip, OrtSiglip

    kw = dict(device=settings.engines.device, precision=settings.engines.precision, threads=1, shared_pool=False)
    return [(OrtSiglip(settings.engines.siglip_model, settings.engines_path, components=("siglip_image",),
                       **kw),  # type: ignore[arg-type]
             OrtBlip(settings.engines.blip_model, settings.engines_path, **kw))  # type: ignore[arg-type]
            for _ in range(n)]


def preflight(settings: WorkerSettings) -> None:
    """Fail fast, before a worker starts, if the configured models or built engines are missing or stale."""
    from engines.artifacts import BLIP_COMPONENTS, SIGLIP_COMPONENTS, onnx_path, require
    from engines.blip import SETTING as BLIP_SETTING
    from engines.loading import resolve, version_of
    from engines.siglip import SETTING as SIGLIP_SETTING

    if settings.engines.backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown engine backend {settings.engines.backend!r}; valid: auto, "
                         f"{', '.join(sorted(BACKENDS))}")
    check_precision(settings.engines.backend, settings.engines.precision)
    siglip = version_of(resolve(settings.engines.siglip_model, SIGLIP_SETTING))
    blip = version_of(resolve(settings.engines.blip_model, BLIP_SETTING))
    if settings.engines.backend == "auto":
        return  # auto times only what is built (engines/auto.py)
    if settings.engines.precision == "auto":
        from engines.auto import precision_for

        settings = settings.model_copy(update={"engines": {"precision": precision_for(settings.engines.backend, settings)}})
    if settings.engines.backend == "onnxruntime":
        for version, names in ((siglip, SIGLIP_COMPONENTS), (blip, BLIP_COMPONENTS)):
            for name in names:
                require(onnx_path(settings.engines_path, version, name, settings.engines.precision), "onnxruntime",
                        settings.engines.precision)
    elif settings.engines.backend == "torch" and settings.engines.compiled == "on":
        from engines.compiled import package_path

        if not settings.engines.device.startswith("cpu"):
            raise ValueError("engines.compiled=on: the compiled rerank runs on a CPU (a GPU has TensorRT)")
        package = package_path(settings.engines_path, blip, settings.engines.precision)
        require(package, "torch", settings.engines.precision)
        require(package.with_suffix(".json"), "torch", settings.engines.precision)  # its check's record
    elif settings.engines.backend == "tensorrt":
        from engines.trt import Plan, plan_path

        for version, names in ((siglip, SIGLIP_COMPONENTS), (blip, BLIP_COMPONENTS)):
            for name in names:
                path = plan_path(settings.engines_path, version, name, settings.engines.precision)
                if not path.is_file():
                    Plan(path)  # raises the message that names the build command
