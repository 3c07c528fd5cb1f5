"""BLIP ITM (transformers ``BlipForImageTextRetrieval``) split at the seam the product needs.

Ingest runs the vision tower once per image and stores its output. A query then runs only the text side:
one unimodal pass for ITC and one batched cross-attention pass over all candidates for ITM. Both equal
the full forward on pixels (the split changes where work happens, not the numbers). Where it is cheaper for
the query's length (always, at BLIP's 35 tokens), the ITM pass runs with its cross-attention reassociated
(``engines/crossattn.py``): the same numbers without projecting the image tokens to keys and values.

``BlipBase`` holds what every backend shares (tokenizer, image processor, batching, cosine, the choice of ITM
pass); each backend supplies four cores: ``_vision_core`` (pixels -> image embeds), ``_itc_core`` (query ->
projected text feature), ``_itm_core`` (the plain pass: one query row per candidate x image embeds -> ITM
match probability and projected image feature) and ``_itm_rx_core`` (the reassociated pass: query rows, each
candidate's query row, image embeds -> the same outputs).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

from engines import intmm
from engines.crossattn import ReassociatedItm, reassociation_pays
from engines.loading import resolve, version_of
from engines.siglip import dtype_of, l2
from engines.tokens import text_positions

SETTING = "IMGSEARCH_BLIP_MODEL"
MAX_TOKENS = 35  # BLIP ITM (COCO) was trained on captions of at most 35 tokens, [CLS] and [SEP] included
CROSS_ATTENTION = ("auto", "plain")  # auto: reassociated wherever it is cheaper; plain: transformers' own pass


@functools.cache
def _numpy_bf16() -> np.dtype[Any] | None:
    """NumPy's bfloat16 (ml_dtypes, which onnx requires), or None where it is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def cross_attention_shape(config: dict[str, Any]) -> dict[str, int]:
    """What the cost of BLIP's cross-attention depends on, from the model's config.json."""
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    image, patch = int(vision.get("image_size", 384)), int(vision.get("patch_size", 16))
    return {"hidden": int(text.get("hidden_size", 768)), "heads": int(text.get("num_attention_heads", 12)),
            "patches": (image // patch) ** 2 + 1, "width": int(vision.get("hidden_size", 768))}


class BlipBase:
    backend = "base"

    def __init__(self, source: str, *, setting: str = SETTING, batch_size: int = 32, max_tokens: int = MAX_TOKENS,
                 cross_attention: str = "auto", lock: threading.Lock | None = None) -> None:
        if cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"unknown cross_attention {cross_attention!r}; valid: {', '.join(CROSS_ATTENTION)}")
        self.path = resolve(source, setting)
        self.version = version_of(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.processor = AutoImageProcessor.from_pretrained(self.path)
        self.batch_size = batch_size
        config = json.loads((self.path / "config.json").read_text())
        # never more tokens than the text tower has positions (the kit's has 24): a longer query is truncated, as
        # one over the setting is, instead of failing in the position embedding
        self.max_tokens = min(max_tokens, text_positions(config, max_tokens))
        self.cross_attention = cross_attention
        self.shape = cross_attention_shape(config)
        # held while a model call runs: a worker's engines are built with one (``lock``, engines.registry), so the
        # text encoder and the reranker never run at once, each with a pool of threads sized to every core (on 2
        # cores that oversubscription cost throughput as load rose)
        self.lock = lock or threading.Lock()
        self._proj: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None

    # how much more a multiply-add of the reassociated pass's products costs than one of the key/value projections
    # it saves: 1 where both run in one precision (every backend now: ONNX Runtime int8 runs both in int8)
    float_cost = 1.0

    def reassociates(self, tokens: int) -> bool:
        """Whether a call with queries padded to ``tokens`` runs the reassociated ITM pass (decided from the
        shapes alone, so a query's numbers never depend on what it was batched with beyond rounding)."""
        return self.cross_attention == "auto" and reassociation_pays(tokens, float_cost=self.float_cost, **self.shape)

    # --- pre ---
    def pixel_inputs(self, images: Sequence[Image.Image]) -> NDArray[np.float32]:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="np")["pixel_values"]
        return np.asarray(pixels, dtype=np.float32)

    def query_inputs(self, query: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        tok = self.tokenizer([query], truncation=True, max_length=self.max_tokens, return_tensors="np")
        return tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(self.pixel_inputs(images))

    def stored_form(self, features: NDArray[Any]) -> NDArray[Any]:
        """A stored feature (float16, as ingest writes it) in the form this engine computes on, for a feature
        cache to keep: then a query stacks its candidates without converting them. Here as stored; the torch
        bf16 backend keeps bfloat16 (the same bytes)."""
        return features

    def _stack(self, features: Sequence[NDArray[Any]]) -> NDArray[Any]:
        """The candidates' features as one array: as they come where they share a dtype (a cache keeps them in
        ``stored_form``), else each in ``stored_form`` first."""
        if len({f.dtype for f in features}) > 1:
            features = [self.stored_form(f) for f in features]
        return np.stack(features)

    # --- cores (per backend) ---
    def _vision_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        raise NotImplementedError

    def _itc_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64]) -> NDArray[Any]:
        raise NotImplementedError

    def _itm_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64],
                  embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        """``embeds``: the candidates' stored vision features, stacked, in their stored dtype."""
        raise NotImplementedError

    def _itm_rx_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64], owner: NDArray[np.int64],
                     embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        """``ids``/``mask``: one row per query; ``owner``: each candidate's query row."""
        raise NotImplementedError

    def _itm_text(self, ids: NDArray[np.int64], mask: NDArray[np.int64], owner: NDArray[np.int64],
                  embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]] | None:
        """``_itm``'s outputs and the ITC text embeddings of the queries that own a candidate here (one row per row
        of ``ids``; the other rows are zeros) from one pass, where this backend folds the unimodal text pass into
        the ITM pass; None where it does not (then ``_itc_core`` runs apart)."""
        return None

    def _itm(self, ids: NDArray[np.int64], mask: NDArray[np.int64], owner: NDArray[np.int64],
             embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        """ITM for candidates ``embeds`` of the queries ``ids[owner]``, by the cheaper exact pass."""
        if self.reassociates(ids.shape[1]):
            used, row = np.unique(owner, return_inverse=True)  # each query's first layer once, for its own rows
            return self._itm_rx_core(ids[used], mask[used], row.astype(np.int64), embeds)
        return self._itm_core(ids[owner], mask[owner], embeds)

    # --- the Reranker protocol ---
    def vision_features(self, images: Sequence[Image.Image]) -> NDArray[np.float16]:
        pixels = self.pixel_inputs(images)
        with self.lock:
            return np.asarray(self._vision_core(pixels), dtype=np.float16)

    def image_projection(self, features: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        """ITC image projections: ``vision_proj`` on each stored feature's [CLS] row, L2-normalised. One small
        matrix product (1024 x 256 for BLIP large), so NumPy runs it for every backend, outside the model lock."""
        if not len(features):
            return np.zeros((0, 0), np.float32)
        weight, bias = self._vision_proj()
        cls = np.stack([np.asarray(f[0], np.float32) for f in features])
        return l2(cls @ weight.T + bias)

    def _vision_proj(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """``vision_proj``'s weight and bias, read once from the checkpoint: its safetensors (one file or the
        shard the index names), else ``pytorch_model.bin`` through torch's weights-only loader."""
        if self._proj is None:
            names = ("vision_proj.weight", "vision_proj.bias")
            index = self.path / "model.safetensors.index.json"
            if index.is_file() or (self.path / "model.safetensors").is_file():
                from safetensors import safe_open

                shard = json.loads(index.read_text())["weight_map"][names[0]] if index.is_file() else "model.safetensors"
                with safe_open(str(self.path / shard), "np") as f:
                    weight, bias = (f.get_tensor(n) for n in names)
            else:
                state = torch.load(self.path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
                weight, bias = (state[n].float().numpy() for n in names)
            self._proj = (np.asarray(weight, np.float32), np.asarray(bias, np.float32))
        return self._proj

    def score(self, query: str, features: Sequence[NDArray[Any]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        if not len(features):
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        ids, mask = self.query_inputs(query)
        with self.lock:
            return self._score(ids, mask, features)

    def _score(self, ids: NDArray[np.int64], mask: NDArray[np.int64],
               features: Sequence[NDArray[Any]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        # ITC: the query's unimodal text pass runs once, whatever the number of candidates; in the first ITM
        # call where the backend folds it in (``_itm_text``), else on its own
        text_feat: NDArray[Any] | None = None
        itm_out, cos_out = [], []
        for start in range(0, len(features), self.batch_size):
            # as stored (float16): each core casts where it runs (on the GPU, after a copy of half the bytes)
            embeds = self._stack(features[start:start + self.batch_size])
            owner = np.zeros(embeds.shape[0], np.int64)
            folded = self._itm_text(ids, mask, owner, embeds) if text_feat is None else None
            if folded is not None:
                itm, image_proj, text = folded
                text_feat = l2(np.asarray(text, np.float32))[0]
            else:
                if text_feat is None:
                    text_feat = l2(self._itc_core(ids, mask))[0]
                itm, image_proj = self._itm(ids, mask, owner, embeds)
            itm_out.append(np.asarray(itm, np.float32))
            cos_out.append(l2(image_proj) @ text_feat)
        return np.concatenate(itm_out), np.concatenate(cos_out).astype(np.float32)

    def score_many(self, items: Sequence[tuple[str, Sequence[NDArray[Any]]]],
                   pairs_per_call: int = 128) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
        """``score`` for several queries at once (cross-query batching): ITM passes over their (query, candidate)
        pairs, each query's ITC rows riding in the first one over its candidates where the backend folds them in
        (else one ITC pass for all the queries, each padded to the longest, its padding masked), the queries
        of one length together: the ITM pass costs per token row, so a short query is never padded to a long
        one's length. Each query's scores equal ``score``'s."""
        items = [(q, f) for q, f in items]
        if len(items) == 1 or not any(len(f) for _, f in items):
            return [self.score(q, f) for q, f in items]
        tok = self.tokenizer([q for q, _ in items], truncation=True, max_length=self.max_tokens, padding="longest",
                             return_tensors="np")
        ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
        with self.lock:
            return self._score_many(items, ids, mask, pairs_per_call)

    def _score_many(self, items: list[tuple[str, Sequence[NDArray[Any]]]], ids: NDArray[np.int64],
                    mask: NDArray[np.int64], pairs_per_call: int) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
        owner = np.concatenate([np.full(len(f), i) for i, (_, f) in enumerate(items)]).astype(np.int64)
        feats = [x for _, f in items for x in f]
        lengths = mask.sum(1)[owner]
        itm_all, cos_all = np.zeros(len(feats), np.float32), np.zeros(len(feats), np.float32)
        # each query's ITC text embedding: from the first ITM call over its candidates where the backend folds the
        # ITC rows in (``_itm_text``), else from one ITC pass over every query (at most once, when first needed)
        text_feat: NDArray[Any] | None = None
        known = np.zeros(len(items), bool)
        apart: NDArray[Any] | None = None
        for n in np.unique(lengths):
            cut = slice(None, n) if self.tokenizer.padding_side == "right" else slice(-n, None)
            pairs = np.flatnonzero(lengths == n)
            for start in range(0, len(pairs), pairs_per_call):
                pick = pairs[start:start + pairs_per_call]
                rows = owner[pick]
                embeds = self._stack([feats[i] for i in pick])
                folded = self._itm_text(ids[:, cut], mask[:, cut], rows, embeds)
                if folded is not None:
                    itm, proj, texts = folded
                else:
                    if apart is None:
                        apart = self._itc_core(ids, mask)
                    texts = apart
                    itm, proj = self._itm(ids[:, cut], mask[:, cut], rows, embeds)
                new = np.unique(rows[~known[rows]])
                if text_feat is None:
                    text_feat = np.zeros((len(items), texts.shape[-1]), np.float32)
                text_feat[new], known[new] = l2(np.asarray(texts[new], np.float32)), True
                itm_all[pick] = np.asarray(itm, np.float32)
                cos_all[pick] = np.einsum("nd,nd->n", l2(np.asarray(proj, np.float32)), text_feat[rows])
        out, at = [], 0
        for _, f in items:
            out.append((itm_all[at:at + len(f)], cos_all[at:at + len(f)]))
            at += len(f)
        return out


class BlipCores(torch.nn.Module):
    """The three BLIP cores as torch modules' forward passes; also what the ONNX export traces."""

    def __init__(self, model: BlipForImageTextRetrieval) -> None:
        super().__init__()
        self.m = model
        self.rx = ReassociatedItm(model)

    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.m.vision_model(pixel_values=pixel_values).last_hidden_state  # type: ignore[no-any-return]

    def itc(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text = self.m.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0, :]
        return self.m.text_proj(text)  # type: ignore[no-any-return]

    def itm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.m.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                     encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=image_mask).last_hidden_state[:, 0, :]
        itm = torch.softmax(self.m.itm_head(hidden).float(), dim=-1)[:, 1]
        return itm, self.m.vision_proj(image_embeds[:, 0, :])

    def itm_rx(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, owner: torch.Tensor,
               image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rx(input_ids, attention_mask, owner, image_embeds)  # type: ignore[no-any-return]


class TorchBlip(BlipBase):
    """Weights cast to the precision once at load, as in ``TorchSiglip``. int8 (a CPU's) loads fp32 and adds int8
    copies of the reassociated pass's linear weights (``engines/intmm.py``), checked against the float pass at
    load; what runs outside that pass stays fp32: the plain ITM pass (``cross_attention="plain"``, or queries
    long enough that the reassociation does not pay: past 62 tokens at BLIP's widths, beyond its 35) and the
    separate ITC pass, which the reassociated pass folds in."""

    backend = "torch"

    def __init__(self, source: str, *, device: str = "cpu", precision: str = "fp32", setting: str = SETTING,
                 batch_size: int = 32, max_tokens: int = MAX_TOKENS, cross_attention: str = "auto",
                 lock: threading.Lock | None = None, compiled: str = "auto", engine_dir: Path | None = None,
                 packed: bool = True) -> None:
        super().__init__(source, setting=setting, batch_size=batch_size, max_tokens=max_tokens,
                         cross_attention=cross_attention, lock=lock)
        from engines import compiled as aot

        self.device = torch.device(device)
        if precision == "int8":
            intmm.require(self.device)
        self.precision = precision
        self.dtype = dtype_of(precision)
        self.model = BlipForImageTextRetrieval.from_pretrained(self.path, dtype=self.dtype).eval().to(self.device)
        self.cores = BlipCores(self.model)
        # in int8, the reassociated pass's products on int8 weights and tokens (engines/intmm.py); else its linear
        # weights packed once for oneDNN, in bf16 on a CPU (engines/packed.py)
        if precision == "int8":
            self.packed_bytes = self._quantize_checked()
        else:
            self.packed_bytes = self.cores.rx.pack() if packed else 0
        # the reassociated pass compiled ahead of time for this host, where built (engines/compiled.py)
        self.compiled = aot.load(self, engine_dir, compiled)

    def _quantize_checked(self) -> int:
        """``ReassociatedItm.quantize``, held at load to the int8 self-check's bounds against the float pass on a
        probe (a query over 4 seeded random stored features; ``intmm.check``)."""
        rng = np.random.default_rng(0)
        feats = torch.from_numpy((rng.standard_normal((4, self.shape["patches"], self.shape["width"])) * 0.5)
                                 .astype(np.float16))
        ids, mask = (torch.from_numpy(a) for a in self.query_inputs("a surprised cat face on a white background"))
        owner = torch.zeros(4, dtype=torch.long)
        rx = self.cores.rx

        def run() -> dict[str, Any]:
            itm, proj, text = rx.with_text(ids, mask, owner, feats if rx.int8 else feats.float())
            return {"itm": itm.float().numpy(), "image": proj.float().numpy(), "text": text.float().numpy()}

        return int(intmm.check(f"{self.version}/blip_itm_rx (torch int8)", run, rx.quantize))

    def _vision_proj(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """From the loaded model (a checkpoint with only ``pytorch_model.bin`` has no safetensors to read)."""
        if self._proj is None:
            proj = self.model.vision_proj
            self._proj = (proj.weight.detach().float().cpu().numpy(), proj.bias.detach().float().cpu().numpy())
        return self._proj

    def stored_form(self, features: NDArray[Any]) -> NDArray[Any]:
        """In bf16, stored features kept as bfloat16 (NumPy's, from ml_dtypes): converting 32 candidates' float16
        features to bf16 took 12 to 40 ms of a 215 ms rerank on a 2-core AMX Xeon, every query; a view of the
        same bytes takes none. Other precisions keep float16 (fp32 would double a cache's bytes)."""
        bf16 = _numpy_bf16()
        if self.dtype != torch.bfloat16 or bf16 is None or features.dtype == bf16:
            return features
        return np.asarray(features).astype(bf16)

    def _stack(self, features: Sequence[NDArray[Any]]) -> NDArray[Any]:
        """As ``BlipBase._stack``, into memory torch allocated (64-byte aligned, which oneDNN's kernels read
        fastest): NumPy's own allocation of 32 candidates' features may start 16 bytes into a cache line, and then
        the products over them ran up to 1.6x slower (bf16, 2-core AMX Xeon: 2.1 against 1.3 ms a product)."""
        if len({f.dtype for f in features}) > 1:
            features = [self.stored_form(f) for f in features]
        kinds = {np.asarray(f).dtype for f in features}
        kind = kinds.pop()
        if kinds or kind.itemsize not in (2, 4):
            return np.stack(features)  # mixed still (fp32 keeps what comes): NumPy's promotion, never a narrowing
        raw = torch.empty((len(features), *np.shape(features[0])), dtype=torch.int16 if kind.itemsize == 2 else torch.int32)
        return np.stack(features, out=raw.numpy().view(kind))

    def _t(self, x: NDArray[Any]) -> torch.Tensor:
        x = np.ascontiguousarray(x)
        if x.dtype == _numpy_bf16():  # NumPy's bfloat16 (stored_form's): torch reads the same bytes
            t = torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16).to(self.device)
        else:
            t = torch.from_numpy(x).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def _tokens(self, embeds: NDArray[Any]) -> torch.Tensor:
        """The stacked stored features for the reassociated pass: as ``_t``, except that in int8 they stay as stored
        (float16): the pass rounds them to int8 one candidate at a time (``intmm.ImageTokens``), and converting all
        32 candidates to fp32 first took 14 ms of a 314 ms rerank (BLIP-base, 2-core AMX Xeon)."""
        if self.precision == "int8" and embeds.dtype == np.float16:
            return torch.from_numpy(np.ascontiguousarray(embeds))
        return self._t(embeds)

    @torch.inference_mode()
    def _vision_core(self, pixel_values: NDArray[np.float32]) -> NDArray[Any]:
        return self.cores.vision(self._t(pixel_values)).float().cpu().numpy()  # type: ignore[no-any-return]

    @torch.inference_mode()
    def _itc_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64]) -> NDArray[Any]:
        return self.cores.itc(self._t(ids), self._t(mask)).float().cpu().numpy()  # type: ignore[no-any-return]

    @torch.inference_mode()
    def _itm_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64],
                  embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        itm, proj = self.cores.itm(self._t(ids), self._t(mask), self._t(embeds))
        return itm.float().cpu().numpy(), proj.float().cpu().numpy()

    @torch.inference_mode()
    def _itm_text(self, ids: NDArray[np.int64], mask: NDArray[np.int64], owner: NDArray[np.int64],
                  embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]] | None:
        """The queries' ITC rows in their reassociated ITM pass (``ReassociatedItm.with_text``): each query that
        owns a candidate here once, its first layer once too."""
        rx = self.cores.rx
        if not (rx.folds_text and self.reassociates(ids.shape[1])):
            return None
        used, row = np.unique(owner, return_inverse=True)
        run: Any = rx.with_text
        if self.compiled is not None and self.compiled.fits(len(used), ids.shape[1], len(row)):
            run = self.compiled
        itm, proj, text = run(self._t(ids[used]), self._t(mask[used]), self._t(row.astype(np.int64)), self._tokens(embeds))
        texts = np.zeros((len(ids), text.shape[-1]), np.float32)
        texts[used] = text.float().cpu().numpy()
        return itm.float().cpu().numpy(), proj.float().cpu().numpy(), texts

    @torch.inference_mode()
    def _itm_rx_core(self, ids: NDArray[np.int64], mask: NDArray[np.int64], owner: NDArray[np.int64],
                     embeds: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        itm, proj = self.cores.itm_rx(self._t(ids), self._t(mask), self._t(owner), self._tokens(embeds))
        return itm.float().cpu().numpy(), proj.float().cpu().numpy()
