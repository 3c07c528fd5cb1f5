"""TensorRT backend: engines built from the ONNX exports with optimisation profiles sized to the real inputs,
cached on disk under a key of model version, GPU name and TensorRT version, and run through torch's CUDA
memory. Building is a command (``imgsearch engines build --backend tensorrt``), never a request-time step.

Needs a CUDA GPU, the ``tensorrt`` package and its libraries (the ``gpu`` extra, or NVIDIA's images).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engines.artifacts import EngineMissing, onnx_path
from engines.blip import MAX_TOKENS as BLIP_MAX_TOKENS
from engines.blip import SETTING as BLIP_SETTING
from engines.blip import BlipBase
from engines.siglip import SETTING as SIGLIP_SETTING
from engines.siglip import SiglipBase

log = logging.getLogger(__name__)


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineMissing("the tensorrt backend needs the `tensorrt` package and a CUDA GPU: "
                            "pip install 'imgsearch[gpu]' on a GPU machine, or choose IMGSEARCH_ENGINE_BACKEND="
                            "onnxruntime or torch") from exc
    return trt


def cache_dir(engine_dir: Path, model_version: str) -> Path:
    """The folder of this model's engines for this GPU and this TensorRT version."""
    import torch

    trt = _trt()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return engine_dir / model_version / f"trt-{gpu}-{trt.__version__}"


def plan_path(engine_dir: Path, model_version: str, component: str, precision: str) -> Path:
    from engines.artifacts import graph_name

    return cache_dir(engine_dir, model_version) / f"{graph_name(component)}.{precision}.plan"


def build_plan(onnx_file: Path, plan: Path, profiles: dict[str, tuple[tuple[int, ...], ...]], precision: str = "fp16",
               workspace_gb: int = 4) -> Path:
    """Parse ``onnx_file``, build an engine with one optimisation profile (min, opt, max per input), save it."""
    trt = _trt()
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


class Plan:
    """A deserialised engine and its execution context; inputs and outputs are numpy on the host."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise EngineMissing(f"the TensorRT engine {path} is missing (or was built for another GPU or TensorRT "
                                "version): build it with `imgsearch engines build --backend tensorrt`")
        import torch

        trt = _trt()
        self.torch = torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dtypes = {n: torch.from_numpy(np.zeros(1, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in self.names}
        self.stream = torch.cuda.Stream()

    def __call__(self, **inputs: NDArray[Any]) -> list[NDArray[Any]]:
        torch = self.torch
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(inputs[name])).to("cuda", self.dtypes[name])
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            outs.append(out)
            self.context.set_tensor_address(name, out.data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return [o.float().cpu().numpy() for o in outs]


class TrtSiglip(SiglipBase):
    backend = "tensorrt"

    def __init__(self, source: str, engine_dir: Path, *, precision: str = "fp16", max_tokens: int = 64,
                 setting: str = SIGLIP_SETTING, lock: threading.Lock | None = None) -> None:
        super().__init__(source, max_tokens=max_tokens, setting=setting, lock=lock)
        self.text = Plan(plan_path(engine_dir, self.version, "siglip_text", precision))
        self._image_plan = lambda: Plan(plan_path(engine_dir, self.version, "siglip_image", precision))
        self._image: Plan | None = None
        self._warm_up()

    def _text_core(self, input_ids: NDArray[np.int64]) -> NDArray[Any]:
        return self.text(input_ids=input_ids)[0]

    def _image_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        self._image = self._image or self._image_plan()
        return self._image(pixel_values=pixel_values)[0]


class TrtBlip(BlipBase):
    backend = "tensorrt"

    def __init__(self, source: str, engine_dir: Path, *, precision: str = "fp16", batch_size: int = 32,
                 max_tokens: int = BLIP_MAX_TOKENS, setting: str = BLIP_SETTING, cross_attention: str = "auto",
                 lock: threading.Lock | None = None) -> None:
        super().__init__(source, setting=setting, batch_size=batch_size, max_tokens=max_tokens,
                         cross_attention=cross_attention, lock=lock)
        self.itc = Plan(plan_path(engine_dir, self.version, "blip_itc", precision))
        self.itm = Plan(plan_path(engine_dir, self.version, "blip_itm", precision))
        self.itm_rx = Plan(plan_path(engine_dir, self.version, "blip_itm_rx", precision))
        self._vision_plan = lambda: Plan(plan_path(engine_dir, self.version, "blip_vision", precision))
        self._vision: Plan | None = None

    def _vision_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        self._vision = self._vision or self._vision_plan()
        return self._vision(pixel_values=pixel_values)[0]

    def _itc_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64]) -> NDArray[Any]:
        return self.itc(input_ids=ids, attention_mask=mask)[0]

    def _itm_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64],
                  embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        itm, proj = self.itm(input_ids=ids, attention_mask=mask, image_embeds=embeds.astype(np.float32, copy=False))
        return itm, proj

    def _itm_rx_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64], owner: NDArray[np.int64],
                     embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        itm, proj = self.itm_rx(input_ids=ids, attention_mask=mask, owner=owner,
                                image_embeds=embeds.astype(np.float32, copy=False))
        return itm, proj


def siglip_profiles(siglip: SiglipBase, max_queries: int = 8) -> dict[str, dict[str, Any]]:
    """SigLIP's optimisation profiles: its 64-token queries (up to ``max_queries`` per call, and ingest's
    batches), the processor's image size."""
    import json as _json

    img = _json.loads((siglip.path / "config.json").read_text())["vision_config"].get("image_size", 224)
    t = siglip.max_tokens
    return {
        "siglip_text": {"input_ids": ((1, t), (16, t), (max(64, max_queries), t))},
        "siglip_image": {"pixel_values": ((1, 3, img, img), (16, 3, img, img), (32, 3, img, img))},
    }


def blip_profiles(blip: BlipBase, max_batch: int = 128, max_queries: int = 8) -> dict[str, dict[str, Any]]:
    """BLIP's optimisation profiles, covering every call the worker makes: up to ``max_queries`` queries per call
    (the batcher's ``batch_max``; ITC and the reassociated ITM pass take one row per query) of up to its token
    limit, and up to ``max_batch`` rerank candidates with the model's patch count and width."""
    import json as _json

    cfg = _json.loads((blip.path / "config.json").read_text())["vision_config"]
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
