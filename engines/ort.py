"""ONNX Runtime backend: sessions over the exported engines, the same pre/post as torch."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engines import selfcheck
from engines.artifacts import BLIP_COMPONENTS, onnx_path, require
from engines.blip import MAX_TOKENS as BLIP_MAX_TOKENS
from engines.blip import SETTING as BLIP_SETTING
from engines.blip import BlipBase
from engines.siglip import SETTING as SIGLIP_SETTING
from engines.siglip import SiglipBase
from pipeline import vendor

log = logging.getLogger(__name__)

# Execution providers in order of preference, each with its options; filtered by what is installed.
PROVIDERS: list[tuple[str, dict[str, Any]]] = [
    ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
    ("CPUExecutionProvider", {}),
]


def providers(device: str) -> list[tuple[str, dict[str, Any]]]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    wanted = [p for p in PROVIDERS if p[0] in have]
    if not device.startswith("cuda"):
        wanted = [p for p in wanted if p[0] == "CPUExecutionProvider"]
    return wanted


_GLOBAL_POOL: bool | None = None


def _shared_pool(threads: int) -> bool:
    """One intra-op thread pool for every session of the process, made before the first session. A worker's
    sessions run one after another, so they share the cores rather than each holding its own pool; with one
    pool its threads may spin between runs (they steal from no other session), which saves a few ms of
    wake-up per run at batch 1. False where this onnxruntime has no global pools: per-session pools, no spin."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is None:
        try:
            from onnxruntime.capi import _pybind_state

            vendor.require("onnxruntime")  # outside the range the global pool was checked on: RuntimeError

            _pybind_state.set_global_thread_pool_sizes(threads, 1)  # 0: its default, one per core
            _GLOBAL_POOL = True
        except (ImportError, AttributeError, RuntimeError):
            _GLOBAL_POOL = False
    return _GLOBAL_POOL


def per_session_pools() -> bool:
    """Make this process's sessions keep their own pools (ingest's parallel embed streams need that). Only before
    the first session: ONNX Runtime refuses per-session pools once a global one exists. True if it took."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is None:
        _GLOBAL_POOL = False
    return _GLOBAL_POOL is False


class Session:
    """One ONNX Runtime session, created on first use (a query worker never opens the ingest-only graphs). An int8
    graph runs its probe before anything else runs on it (engines/selfcheck.py): a graph this CPU computes
    wrongly is refused with ``Int8Disagrees``, whoever opened it (a worker, the CLI, a benchmark)."""

    def __init__(self, path: Path, device: str, threads: int, shared: bool = True, check: bool = True,
                 profile: str | None = None) -> None:
        self.path, self.device, self.threads, self.shared, self.check = path, device, threads, shared, check
        self.profile = profile  # a file prefix: ONNX Runtime's own per-operator trace of every run (bench.rerank)
        self._sess: Any = None
        self._run: Any = None  # the session's run, its float inputs converted to the types the graph declares
        self.runs = 0  # how often it ran (tests check which graph a call took)
        self.agreement: selfcheck.Agreement | None = None  # the int8 self-check's figures, once it ran

    def __call__(self, **inputs: NDArray[Any]) -> list[NDArray[Any]]:
        self.open()
        self.runs += 1
        return self._run(**inputs)  # type: ignore[no-any-return]

    def end_profiling(self) -> Path:
        """The trace of the runs so far (a session opened with ``profile``); profiling stops."""
        return Path(self._sess.end_profiling())

    def outputs(self) -> list[Any]:
        self.open()
        return self._sess.get_outputs()  # type: ignore[no-any-return]

    def open(self) -> None:
        if self._sess is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.shared and _shared_pool(self.threads):
                opts.use_per_session_threads = False
            else:
                if self.threads:
                    opts.intra_op_num_threads = self.threads
                # per-session pools that spin after their run would steal the cores the next session needs
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.profile:
                opts.enable_profiling, opts.profile_file_prefix = True, self.profile
            sess = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers(self.device))
            run = selfcheck.runner(sess)
            if self.check and ".int8-" in self.path.name:
                self.agreement = selfcheck.verify(self.path, run, [o.name for o in sess.get_outputs()])
                log.info("%s in %.0f ms", self.agreement.line(), self.agreement.ms)
            self._sess, self._run = sess, run


def _sessions(engine_dir: Path, version: str, names: tuple[str, ...], precision: str, device: str,
              threads: int, shared: bool = True, recipe: str | None = None) -> dict[str, Session]:
    """``shared=False``: sessions with their own pool of ``threads`` (ingest's parallel embed streams, one
    thread each, measured 4 to 5% faster per image on 2 cores than one stream over both; bench.ingest)."""
    return {n: Session(require(onnx_path(engine_dir, version, n, precision, recipe), "onnxruntime", precision), device,
                       threads, shared) for n in names}


class OrtSiglip(SiglipBase):
    backend = "onnxruntime"

    def __init__(self, source: str, engine_dir: Path, *, device: str = "cpu", precision: str = "fp32",
                 threads: int = 0, max_tokens: int = 64, setting: str = SIGLIP_SETTING,
                 components: tuple[str, ...] = ("siglip_text", "siglip_image"), shared_pool: bool = True,
                 recipe: str | None = None, lock: threading.Lock | None = None) -> None:
        super().__init__(source, max_tokens=max_tokens, setting=setting, lock=lock)
        self.s = _sessions(engine_dir, self.version, components, precision, device, threads, shared_pool, recipe)
        if "siglip_text" in self.s:
            self._warm_up()
        else:  # an image-only replica (ingest): the width from the config, with no text session to ask
            cfg = json.loads((self.path / "config.json").read_text())
            self.dim = int(cfg.get("vision_config", {}).get("hidden_size", 768))

    def _text_core(self, input_ids: NDArray[np.int64]) -> NDArray[Any]:
        return self.s["siglip_text"](input_ids=input_ids)[0]

    def _image_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        return self.s["siglip_image"](pixel_values=pixel_values)[0]


class OrtBlip(BlipBase):
    backend = "onnxruntime"

    def __init__(self, source: str, engine_dir: Path, *, device: str = "cpu", precision: str = "fp32",
                 threads: int = 0, batch_size: int = 32, max_tokens: int = BLIP_MAX_TOKENS, setting: str = BLIP_SETTING,
                 shared_pool: bool = True, cross_attention: str = "auto", recipe: str | None = None,
                 lock: threading.Lock | None = None) -> None:
        super().__init__(source, setting=setting, batch_size=batch_size, max_tokens=max_tokens,
                         cross_attention=cross_attention, lock=lock)
        self.s = _sessions(engine_dir, self.version, BLIP_COMPONENTS, precision, device, threads, shared_pool, recipe)
        if precision == "int8":
            # the reassociated pass's products with the image tokens run in uint8 x int8 as the plain pass's
            # projections do (engines/export.py ``_int8_image_attention``), so a multiply-add costs the same on both
            # sides (float_cost 1). Before, with those products in float, the break-even sat near 28 tokens (2 Zen 4
            # cores, bench.engines, BLIP-base, 32 candidates: 2.2x faster at 8 tokens, 1.4x at 16, 0.9x at 32)
            for name in ("blip_itc", "blip_itm_rx", "blip_itm"):  # the query graphs: an unsafe one fails at load
                self.s[name].open()

    def _vision_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        return self.s["blip_vision"](pixel_values=pixel_values)[0]

    def _itc_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64]) -> NDArray[Any]:
        return self.s["blip_itc"](input_ids=ids, attention_mask=mask)[0]

    def _itm_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64],
                  embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        itm, proj = self.s["blip_itm"](input_ids=ids, attention_mask=mask, image_embeds=embeds)  # cast as declared
        return itm, proj

    def _itm_rx_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64], owner: NDArray[np.int64],
                     embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        itm, proj = self.s["blip_itm_rx"](input_ids=ids, attention_mask=mask, owner=owner, image_embeds=embeds)
        return itm, proj
