"""TensorRT backend: plans (built from the ONNX exports by engines.build) found on disk under a key of model
version, GPU name and TensorRT version, and run through torch's CUDA memory. Building is a command
(``imgsearch engines build --backend tensorrt``), never a request-time step; this module only loads and runs.

Needs a CUDA GPU, the ``tensorrt`` package and its libraries (the ``gpu`` extra, or NVIDIA's images).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engines.artifacts import EngineMissing
from engines.blip import MAX_TOKENS as BLIP_MAX_TOKENS
from engines.blip import SETTING as BLIP_SETTING
from engines.blip import BlipBase
from engines.siglip import SETTING as SIGLIP_SETTING
from engines.siglip import SiglipBase
from pipeline.vendor import needs_extra


def load_tensorrt() -> Any:
    """The tensorrt module, or EngineMissing naming what to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineMissing(needs_extra("the tensorrt backend needs the `tensorrt` package and a CUDA GPU", "gpu")
                            + " on a GPU machine, or choose IMGSEARCH_ENGINE_BACKEND=onnxruntime or torch") from exc
    return trt


def cache_dir(engine_dir: Path, model_version: str) -> Path:
    """The folder of this model's engines for this GPU and this TensorRT version."""
    import torch

    trt = load_tensorrt()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return engine_dir / model_version / f"trt-{gpu}-{trt.__version__}"


def plan_path(engine_dir: Path, model_version: str, component: str, precision: str) -> Path:
    from engines.artifacts import graph_name

    return cache_dir(engine_dir, model_version) / f"{graph_name(component)}.{precision}.plan"


class Plan:
    """A deserialised engine and its execution context; inputs and outputs are numpy on the host."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise EngineMissing(f"the TensorRT engine {path} is missing (or was built for another GPU or TensorRT "
                                "version): build it with `imgsearch engines build --backend tensorrt`")
        import torch

        trt = load_tensorrt()
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
