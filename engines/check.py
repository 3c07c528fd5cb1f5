"""``imgsearch models check``: the self-checks a worker runs at load, run on one model folder or hub id, with what
a person bringing their own checkpoint needs to know: the tokenizer layout found, the text limits, the version,
the parameter counts and the memory it will take."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.loading import load_tokenizer, resolve, version_of, weight_files
from pipeline.errors import ModelLoadError

KINDS = {"siglip": "SigLIP (text and image towers: IMGSEARCH_SIGLIP_MODEL)",
         "blip": "BLIP ITM (the reranker: IMGSEARCH_BLIP_MODEL)"}
SETTINGS = {"siglip": "IMGSEARCH_SIGLIP_MODEL", "blip": "IMGSEARCH_BLIP_MODEL"}
# what a CPU worker process holds besides the weights (Python, torch, transformers, tokenizers, the stores and
# caches of an idle worker); measured with bench.memory, see the README
WORKER_BASE_MB = 365


@dataclass
class Check:
    name: str
    ok: bool | None  # None: information, not a check
    detail: str


@dataclass
class Report:
    source: str
    checks: list[Check] = field(default_factory=list)
    kind: str = ""
    version: str = ""
    params: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def lines(self) -> list[str]:
        mark = {True: "ok  ", False: "FAIL", None: "    "}
        out = [f"model: {self.source}" + (f" ({KINDS[self.kind]})" if self.kind else "")]
        out += [f"{mark[c.ok]} {c.name:12} {c.detail}" for c in self.checks]
        out.append("all checks passed" if self.ok else "a check failed: a worker would refuse this model")
        return out


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f} MB"


def count_params(kind: str, path: Path) -> dict[str, int]:
    """Parameters per tower, from the config alone (the model is built on the meta device: no memory, no
    weights read)."""
    import torch
    from transformers import AutoConfig, BlipForImageTextRetrieval, SiglipModel  # type: ignore[attr-defined]

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = SiglipModel(config) if kind == "siglip" else BlipForImageTextRetrieval(config)
    text: Any = model.text_model if kind == "siglip" else model.text_encoder
    towers: dict[str, Any] = {"text": text, "vision": model.vision_model}
    out: dict[str, int] = {name: sum(int(p.numel()) for p in m.parameters()) for name, m in towers.items()}
    out["other"] = sum(int(p.numel()) for p in model.parameters()) - sum(out.values())
    out["total"] = sum(out.values())
    return out


def memory(params: dict[str, int]) -> str:
    """What the weights take per precision, and what a worker process holding them takes."""
    n = params["total"]
    return (f"weights {_mb(4 * n)} in fp32 ({_mb(2 * n)} in bf16/fp16); a CPU worker process: ~{WORKER_BASE_MB} MB "
            f"plus the weights it runs, up to ~{_mb(4 * n + WORKER_BASE_MB * 1e6)} once every tower has run (safetensors "
            f"are memory-mapped: a search worker never reads the image towers); torch int8 adds an int8 copy of the "
            f"text layers' linear weights (a quarter of their fp32 bytes); on a GPU in fp16: {_mb(2 * n)} of "
            "weights plus activations and the CUDA context")


def _files(path: Path) -> str:
    present = [p.name for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".json", ".model", ".txt")]
    weights = ", ".join(f"{w.name} ({_mb(w.stat().st_size)})" for w in weight_files(path))
    return f"{weights or 'NO WEIGHTS'}; {', '.join(present)}"


def _tokenizer_checks(report: Report, kind: str, path: Path, config: dict[str, Any], max_tokens: int) -> None:
    setting = SETTINGS[kind]
    tokenizer = load_tokenizer(path, setting)
    if kind == "siglip":
        from engines.tokens import TokenizerLayoutError, check_layout, text_positions

        positions = text_positions(config, max_tokens)
        try:
            layout = check_layout(path, tokenizer, config, max_tokens)
        except TokenizerLayoutError as exc:
            report.add("tokenizer", False, exc.message)
            return
        report.add("tokenizer", True, f"{type(tokenizer).__name__}, {len(tokenizer):,} entries: {layout.describe(tokenizer)}")
        report.add("text limits", None, f"{positions} positions in the text tower; queries padded to {layout.max_tokens} "
                                        f"tokens; up to {layout.text_tokens} text tokens, the rest is cut (EOS kept)")
    else:
        ids = tokenizer("a photo of two cats")["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        positions = int((config.get("text_config") or {}).get("max_position_embeddings", 512))
        report.add("tokenizer", None, f"{type(tokenizer).__name__}, {len(tokenizer):,} entries: "
                                      f"'a photo of two cats' -> {tokens}")
        report.add("text limits", None, f"{positions} positions in the text side; queries are cut to the worker's "
                                        "BLIP token limit (IMGSEARCH_BLIP_MAX_TOKENS, 35 by default)")


def _load(report: Report, kind: str, source: str) -> None:
    """What a worker does: load the weights (torch, fp32) and run a text through."""
    t0 = time.perf_counter()
    if kind == "siglip":
        from engines.siglip import TorchSiglip

        dim = TorchSiglip(source).dim
        report.add("weights", True, f"loaded and ran in {time.perf_counter() - t0:.1f} s; a text encodes to {dim}-d")
    else:
        import numpy as np
        from PIL import Image

        from engines.blip import TorchBlip

        blip = TorchBlip(source)
        feats = blip.vision_features([Image.new("RGB", (64, 64), (120, 60, 30))])
        itm, _ = blip.score("a photo of two cats", list(feats))
        ok = bool(np.isfinite(itm).all())
        report.add("weights", ok, f"loaded and ran in {time.perf_counter() - t0:.1f} s; image features "
                                  f"{tuple(feats.shape[1:])}, ITM {float(itm[0]):.3f}")


def check_text_layout(source: str, max_tokens: int = 64) -> None:
    """Before a worker starts: raise ``ModelLoadError`` (a ``TokenizerLayoutError`` naming the file to fix) where
    the SigLIP folder's tokenizer would give another layout than its text tower was trained on. Reads the config
    and tokenizer only, no weights; the engines run the same check when they load."""
    from engines.siglip import SETTING
    from engines.tokens import check_layout

    path = resolve(source, SETTING)
    check_layout(path, load_tokenizer(path, SETTING), json.loads((path / "config.json").read_text()), max_tokens)


def _int8_checks(report: Report, engine_dir: Path) -> None:
    """The int8 self-check a worker runs before an int8 graph's first use, on every int8 graph built for this
    version (engines/selfcheck.py), with its figures."""
    from engines.artifacts import INT8_RECIPE
    from engines.ort import Session
    from engines.selfcheck import MAX_ITM_DIFF, MIN_COSINE, Run, check_folder

    def session(graph: Path) -> tuple[Run, list[str]]:  # a worker's kind of session; measure() reports, not refuses
        s = Session(graph, "cpu", 0, check=False)
        return s, [o.name for o in s.outputs()]

    folder = engine_dir / report.version
    rows = check_folder(folder, INT8_RECIPE.name, session) if folder.is_dir() else []
    if not rows:
        report.add("int8", None, f"no int8 engines of recipe {INT8_RECIPE.name} in {folder} (`imgsearch engines build "
                                 "--backend onnxruntime --precision int8` builds them)")
    for r in rows:
        itm = f", largest ITM difference {r['itm_diff']:.4f} (bound <= {MAX_ITM_DIFF})" if r["itm_diff"] else ""
        report.add("int8", r["ok"], f"{r['graph'].split('/')[1]}: cosine to fp32 {r['cosine']:.4f} (bound >= "
                                    f"{MIN_COSINE}){itm}, probe {r['ms']:.0f} ms on this CPU")


def check_model(source: str, *, max_tokens: int = 64, load: bool = True, engine_dir: Path | None = None) -> Report:
    """Run the load-time self-checks on ``source`` (a folder or a hub id), and the int8 self-check on the engines
    built for it under ``engine_dir``; never raises for a bad model: every failure is a failed check in the
    report."""
    report = Report(source)
    try:
        path = resolve(source, "DIR_OR_HUB_ID")
        config = json.loads((path / "config.json").read_text())
        kind = str(config.get("model_type", ""))
        if kind not in KINDS:
            report.add("model type", False, f"config.json's model_type is {kind!r}; this product runs "
                                            f"{' and '.join(sorted(KINDS))} checkpoints")
            return report
        report.kind = kind
        report.add("files", bool(weight_files(path)), _files(path))
        report.version = version_of(path)
        report.add("version", None, f"{report.version} (hash of config, weights, tokenizer and preprocessor "
                                    "files; stored vectors and features are keyed by it)")
        _tokenizer_checks(report, kind, path, config, max_tokens)
        report.params = count_params(kind, path)
        p = report.params
        report.add("parameters", None, f"text {p['text'] / 1e6:.1f}M, vision {p['vision'] / 1e6:.1f}M, "
                                       f"other {p['other'] / 1e6:.1f}M, total {p['total'] / 1e6:.1f}M")
        report.add("memory", None, memory(p))
        if load and report.ok:
            _load(report, kind, str(path))
        if engine_dir is not None:
            _int8_checks(report, engine_dir)
    except ModelLoadError as exc:
        report.add("load", False, exc.message)
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint may fail anywhere in transformers: report it
        report.add("load", False, f"{type(exc).__name__}: {exc}")
    return report
