"""Where built engines live and how a runtime finds them; shared by the builders and the runtimes.

Layout: ``{engine_dir}/{model version}/{component}.{precision}.onnx`` (TensorRT adds the GPU and TensorRT
version to the folder name). The model version hashes the weights, so a changed checkpoint finds no engine
and the worker says which command builds it, rather than running a stale one.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ModelLoadError

SIGLIP_COMPONENTS = ("siglip_text", "siglip_image")
BLIP_COMPONENTS = ("blip_vision", "blip_itc", "blip_itm", "blip_itm_rx")  # rx: the reassociated ITM pass
PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "onnxruntime": ("fp32", "int8"), "tensorrt": ("fp16", "fp32")}


class EngineMissing(ModelLoadError):
    code = "engine_missing"


def onnx_path(engine_dir: Path, model_version: str, component: str, precision: str) -> Path:
    return engine_dir / model_version / f"{component}.{precision}.onnx"


def require(path: Path, backend: str, precision: str) -> Path:
    if not path.is_file():
        raise EngineMissing(
            f"the {backend} {precision} engine {path.name} for {path.parent.name} is missing (looked in {path.parent}); "
            f"build it with `imgsearch engines build --backend {backend} --precision {precision}`")
    return path


def check_precision(backend: str, precision: str) -> None:
    valid = PRECISIONS.get(backend)
    if valid is None:
        raise ValueError(f"unknown engine backend {backend!r}; valid: {', '.join(sorted(PRECISIONS))}")
    if precision not in valid:
        raise ValueError(f"precision {precision!r} is not available on {backend}; valid: {', '.join(valid)}")
