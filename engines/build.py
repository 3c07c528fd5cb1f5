"""Every build sequence, and nothing that runs: the ONNX exports (engines.export), then for TensorRT a plan per
graph built from its fp32 export, with optimisation profiles sized to what the worker sends. Building is a
command (``imgsearch engines build``, or a Modal container's first start), never a request-time step; the
runtimes (engines.ort, engines.trt) only load what this writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.artifacts import onnx_path
from engines.blip import BlipBase
from engines.export import build_onnx
from engines.siglip import SiglipBase
from engines.trt import load_tensorrt, plan_path

if TYPE_CHECKING:
    from pipeline.settings import WorkerSettings

log = logging.getLogger(__name__)


def onnx_precisions(precision: str) -> tuple[str, ...]:
    """The ONNX exports an engine of ``precision`` is made from: int8 quantizes the fp32 export; the rest
    (TensorRT's included) need the fp32 one only."""
    return ("fp32", "int8") if precision == "int8" else ("fp32",)


def build_engines(settings: WorkerSettings, backend: str, precision: str, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> list[Path]:
    """The configured models' engines for ``backend`` at ``precision`` under the engine dir (what is there is
    kept unless ``force``): the ONNX exports, then, for TensorRT, its plans; for torch, the rerank pass compiled
    for this host (engines/compiled.py). The files the last step built."""
    if backend == "torch":
        path = build_compiled_rerank(settings, precision, force)
        if progress:
            progress(path.name)
        return [path]
    built = build_onnx(settings.engines.siglip_model, settings.engines.blip_model, settings.engines_path,
                       precisions=onnx_precisions(precision), force=force, progress=progress)
    if backend != "tensorrt":
        return built
    return build_all(SiglipBase(settings.engines.siglip_model, max_tokens=settings.engines.text_max_tokens),
                     BlipBase(settings.engines.blip_model, max_tokens=settings.engines.blip_max_tokens), settings.engines_path,
                     precision, force, max_queries=settings.batch_max)


def build_compiled_rerank(settings: WorkerSettings, precision: str, force: bool = False) -> Path:
    """The torch backend's rerank pass at ``precision`` (fp32 or bf16), compiled ahead of time for this host."""
    from engines import compiled
    from engines.blip import TorchBlip

    if precision not in compiled.PRECISIONS:
        raise ValueError(f"the compiled rerank runs {' or '.join(compiled.PRECISIONS)} on a CPU, not {precision} (torch "
                         "int8 runs its eager pass: nothing to build)")
    blip = TorchBlip(settings.engines.blip_model, precision=precision, max_tokens=settings.engines.blip_max_tokens,
                     compiled="off")
    return compiled.build(blip, settings.engines_path, force)


def build_plan(onnx_file: Path, plan: Path, profiles: dict[str, tuple[tuple[int, ...], ...]], precision: str = "fp16",
               workspace_gb: int = 4) -> Path:
    """Parse ``onnx_file``, build an engine with one optimisation profile (min, opt, max per input), save it."""
    trt = load_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan.name}")
    plan.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.with_name(f".tmp-{os.getpid()}-{plan.name}")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan)
    (plan.parent / f"{plan.stem}.json").write_text(json.dumps({"profiles": profiles, "precision": precision}))
    return plan



def siglip_profiles(siglip: SiglipBase, max_queries: int = 8) -> dict[str, dict[str, Any]]:
    """SigLIP's optimisation profiles: its 64-token queries (up to ``max_queries`` per call, and ingest's
    batches), the processor's image size."""
    img = json.loads((siglip.path / "config.json").read_text())["vision_config"].get("image_size", 224)
    t = siglip.max_tokens
    return {
        "siglip_text": {"input_ids": ((1, t), (16, t), (max(64, max_queries), t))},
        "siglip_image": {"pixel_values": ((1, 3, img, img), (16, 3, img, img), (32, 3, img, img))},
    }


def blip_profiles(blip: BlipBase, max_batch: int = 128, max_queries: int = 8) -> dict[str, dict[str, Any]]:
    """BLIP's optimisation profiles, covering every call the worker makes: up to ``max_queries`` queries per call
    (the batcher's ``batch_max``; ITC and the reassociated ITM pass take one row per query) of up to its token
    limit, and up to ``max_batch`` rerank candidates with the model's patch count and width."""
    cfg = json.loads((blip.path / "config.json").read_text())["vision_config"]
    img = cfg.get("image_size", 384)
    patches = (img // cfg.get("patch_size", 16)) ** 2 + 1
    width = cfg.get("hidden_size", 768)
    q, nq = blip.max_tokens, max(1, max_queries)
    embeds = ((1, patches, width), (32, patches, width), (max_batch, patches, width))
    return {
        "blip_vision": {"pixel_values": ((1, 3, img, img), (16, 3, img, img), (32, 3, img, img))},
        "blip_itc": {"input_ids": ((1, 1), (1, 16), (nq, q)), "attention_mask": ((1, 1), (1, 16), (nq, q))},
        "blip_itm": {"input_ids": ((1, 1), (32, 16), (max_batch, q)), "attention_mask": ((1, 1), (32, 16), (max_batch, q)),
                     "image_embeds": embeds},
        "blip_itm_rx": {"input_ids": ((1, 1), (1, 16), (nq, q)), "attention_mask": ((1, 1), (1, 16), (nq, q)),
                        "owner": ((1,), (32,), (max_batch,)), "image_embeds": embeds},
    }


def profiles_for(siglip: SiglipBase, blip: BlipBase, max_batch: int = 128, max_queries: int = 8) -> dict[str, dict[str, Any]]:
    """Every component's optimisation profile (``siglip_profiles`` and ``blip_profiles``)."""
    return {**siglip_profiles(siglip, max_queries), **blip_profiles(blip, max_batch, max_queries)}


def build_plans(profiles: dict[str, dict[str, Any]], versions: dict[str, str], engine_dir: Path, precision: str = "fp16",
                force: bool = False) -> list[Path]:
    """Build (or keep) one plan per component from its fp32 ONNX export; ``versions``: component -> model version."""
    built = []
    for component, shapes in profiles.items():
        plan = plan_path(engine_dir, versions[component], component, precision)
        if force or not plan.is_file():
            log.info("building TensorRT %s %s", component, precision)
            build_plan(onnx_path(engine_dir, versions[component], component, "fp32"), plan, shapes, precision)
        built.append(plan)
    return built


def build_all(siglip: SiglipBase, blip: BlipBase, engine_dir: Path, precision: str = "fp16",
              force: bool = False, max_queries: int = 8) -> list[Path]:
    profiles = profiles_for(siglip, blip, max_queries=max_queries)
    versions = {c: siglip.version if c.startswith("siglip") else blip.version for c in profiles}
    return build_plans(profiles, versions, engine_dir, precision, force)
