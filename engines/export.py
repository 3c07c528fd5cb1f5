"""Build ONNX engines from the torch models: export with dynamic axes, optionally quantise to int8.

Building is a command (``imgsearch engines build``), never something a worker does at request time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engines.artifacts import BLIP_COMPONENTS, INT8_RECIPE, RX_RECIPE, SIGLIP_COMPONENTS, Recipe, onnx_path
from engines.blip import BlipCores, TorchBlip
from engines.selfcheck import probe_path, write_probe
from engines.siglip import TorchSiglip, features

log = logging.getLogger(__name__)
OPSET = 17


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any], owner: torch.nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.owner = owner  # registers the weights as parameters of the traced module, not as constants

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


def _export(fn: Callable[..., Any], owner: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
            inputs: list[str], outputs: list[str], axes: dict[str, dict[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with torch.inference_mode():
        torch.onnx.export(_Fn(fn, owner), args, str(tmp), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    os.replace(tmp, path)  # a half-written engine never has the final name


def _fuse_transformer(src: Path, dst: Path, heads: int, hidden: int) -> None:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, FastGelu) on a CLIP-style encoder:
    fewer, fatter kernels. The result holds ONNX Runtime's own operators, so it only feeds the int8 build; the
    plain fp32 export stays portable (TensorRT parses it)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    fused = optimizer.optimize_model(str(src), model_type="clip", num_heads=heads, hidden_size=hidden,
                                     optimization_options=FusionOptions("clip"), opt_level=0)
    log.info("fused %s: %s", src.name, {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
    fused.save_model_to_file(str(dst))


def _quantize(src: Path, dst: Path, recipe: Recipe, fuse: tuple[int, int] | None = None) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import quantize_dynamic

    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    if fuse:
        fused = dst.with_name(f".tmp-{os.getpid()}-fused-{src.name}")
        try:
            _fuse_transformer(src, fused, *fuse)
            quantize_dynamic(str(fused), str(tmp), **recipe.options(),
                             extra_options={"DefaultTensorType": TensorProto.FLOAT})
        finally:
            fused.unlink(missing_ok=True)
    else:
        quantize_dynamic(str(src), str(tmp), **recipe.options())
    os.replace(tmp, dst)


def _quantize_reassociated(src: Path, dst: Path) -> None:
    """int8 for the reassociated ITM pass: every 2-D weight product int8, the per-head ``W_k,h``/``W_v,h``
    products (3-D weights, which ONNX Runtime quantizes per tensor only) in float, and both products with the image
    tokens in uint8 x int8 with a scale per row (``_int8_image_attention``; until graph revision 3 they stayed float,
    and the rewrite then paid only for queries under about 28 tokens).

    With full-range weights (the old recipe) per-channel scales were best here: largest ITM error against
    transformers in fp32 (kit weights / random BLIP-base / -large widths) plain int8 0.031 / 0.010 / 0.0067, this
    0.013 / 0.0097 / 0.0064; quantizing the scores product too gave 0.016 / 0.0089 / 0.0066, and the
    attention-weighted sum per tensor reordered the kit's candidates (top-10 agreement with fp32 0.8 against 0.93).
    With 7-bit weights (``reduce_range``, which int8 weights need to be right without VNNI) per-channel scales lose
    precision instead. Mean / largest ITM error against fp32 at BLIP-large widths (32 candidates, 8/16/35 tokens),
    and the largest over eight queries on the kit, this graph then the plain int8 pass of the same recipe:
      int8 7-bit per channel  0.0069 / 0.0104, kit 0.0156  (plain 0.0012 / 0.0041, kit 0.0144)
      int8 7-bit per tensor   0.0016 / 0.0053, kit 0.0239  (plain 0.0012 / 0.0041, kit 0.0230)
      uint8 per tensor        0.0012 / 0.0039, kit 0.0098  (plain 0.0013 / 0.0035, kit 0.0191)
    uint8 weights (ONNX Runtime's U8U8 kernels, which never saturate) are the only choice as close as the plain
    pass on both, so this graph takes ``RX_RECIPE`` whatever the engine's recipe."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {i.name: len(i.dims) for i in graph.initializer}
    floats = [n.name for n in graph.node if n.op_type == "MatMul"
              and (weights.get(n.input[1], 0) != 2 or n.input[0] in weights)]
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    quantize_dynamic(str(src), str(tmp), **RX_RECIPE.options(), nodes_to_exclude=floats)
    model = onnx.load(str(tmp))
    _int8_image_attention(model.graph, "image_embeds")
    _float16_input(model.graph, "image_embeds")
    onnx.save(model, str(tmp))
    os.replace(tmp, dst)


def _float16_input(graph: Any, name: str) -> None:
    """The graph input ``name`` taken as float16 (the stored features' type) and cast to float32 inside the graph:
    ONNX Runtime's Cast ran 3.3 ms for 32 BLIP-base candidates' features where NumPy's ``astype`` before the call
    took 26 (2-core AMX Xeon under ``bench.cpumask avx2``; scratch, not kept)."""
    from onnx import TensorProto, helper

    (inp,) = [i for i in graph.input if i.name == name]
    inp.type.tensor_type.elem_type = TensorProto.FLOAT16
    inside = f"{name}_f32"
    for n in graph.node:
        n.input[:] = [inside if i == name else i for i in n.input]
    graph.node.insert(0, helper.make_node("Cast", [name], [inside], name=inside, to=TensorProto.FLOAT))


def _int8_image_attention(graph: Any, x: str) -> int:
    """The reassociated pass's two products with the image tokens, in ONNX Runtime's uint8 x int8
    (``MatMulInteger``), laid out as torch int8's are (``engines/intmm.py``): the tokens rounded once a call to 7
    bits with a scale per token (the second operand of both products, so right where a kernel adds pairs of
    products in 16 bits: AVX2 without VNNI; ``x`` is their graph input), the query keys per row to 8 bits (uint8
    around 128), and the probabilities, the tokens' scales folded in, per row to 8 bits unsigned. The scores come
    out B x HR x P, so the transpose that fed the softmax goes. Returns how many products it rewrote (2 a layer).

    Each rounding is one per-axis ``QuantizeLinear`` over the rows laid out 2-D, and each row's range comes from
    ``ReduceMax`` and ``ReduceMin`` (no |x| written out): against ``Div``, ``Round`` and ``Cast`` and an ``Abs``
    pass, 557 against 606 ms a rerank (a scratch comparison, not kept). On a 2-core AMX Xeon made an AVX2-only CPU
    (``bench.cpumask avx2``; ``python -m bench.rerank --backend onnxruntime`` keeps the pass's figure), one
    candidate batch's scores product (32 x 96 x 768 by 768 x 577) took 9.1 ms in uint8 x int8 against 22 ms in
    float, and the pass (BLIP-base, 32 candidates, 8 tokens, seven alternating rounds) 557 ms against 709 with
    these products in float and 767 in fp32. The largest ITM error on the kit grew from below plain int8's to
    0.0245 against its 0.0230 (tests/engines/test_rerank_rewrite.py); the weighted sum in uint8 x uint8 with
    8-bit tokens kept it below plain's, but took 609 ms, and uint8 x uint8 runs without VNNI's speed-up."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    scores = [n for n in graph.node if n.op_type == "MatMul" and n.input[0] == x and n.input[1] in producer]
    weighted = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] == x and n.input[0] in producer]
    if not scores or len(scores) != len(weighted):
        raise RuntimeError(f"blip_itm_rx: expected the image tokens' two products a layer, found {len(scores)} "
                           f"and {len(weighted)}")
    const = {"rx8_tokens_top": 63.0, "rx8_rows_top": 127.0, "rx8_probs_top": 255.0, "rx8_tiny": 1e-12}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in const.items())
    graph.initializer.extend([numpy_helper.from_array(np.array(128, np.uint8), "rx8_zero_u8"),
                              numpy_helper.from_array(np.array(0, np.uint8), "rx8_nil_u8"),
                              numpy_helper.from_array(np.array(0, np.int8), "rx8_zero_s8"),
                              numpy_helper.from_array(np.array([-1], np.int64), "rx8_flat")])
    nodes: list[Any] = []

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def row_scale(t: str, top: str, out: str, signed: bool = True) -> str:
        """``t``'s scale per row (its last axis), ``..., 1``: both ends read, no |t| written out."""
        big = node("ReduceMax", [t], f"{out}_max", axes=[-1], keepdims=1)
        if signed:
            low = node("ReduceMin", [t], f"{out}_min", axes=[-1], keepdims=1)
            big = node("Max", [big, node("Neg", [low], f"{out}_neg")], f"{out}_big")
        return node("Div", [node("Max", [big, "rx8_tiny"], f"{out}_safe"), top], out)

    def rounded(t: str, scale: str, zero: str, out: str) -> str:
        """``t / scale`` rounded, plus ``zero`` (its type is the result's): one QuantizeLinear per row of ``t``
        laid out 2-D (per-axis over the rows), then back to ``t``'s shape."""
        flat = node("Flatten", [t], f"{out}_2d", axis=-1)
        scales = node("Reshape", [scale, "rx8_flat"], f"{out}_s1")
        zeros = node("Expand", [zero, node("Shape", [scales], f"{out}_n")], f"{out}_z1")
        q = node("QuantizeLinear", [flat, scales, zeros], f"{out}_q2d", axis=0)
        return node("Reshape", [q, node("Shape", [t], f"{out}_shape")], out)

    # the tokens, once: B x P x E -> 7-bit int8 (for the weighted sum) and its transpose (for the scores)
    xs = row_scale(x, "rx8_tokens_top", "rx8_x_scale")                                     # B x P x 1
    xq = rounded(x, xs, "rx8_zero_s8", "rx8_x_q")                                          # B x P x E
    xqt = node("Transpose", [xq], "rx8_x_qt", perm=[0, 2, 1])                              # B x E x P
    xst = node("Transpose", [xs], "rx8_x_scale_t", perm=[0, 2, 1])                         # B x 1 x P
    head = list(nodes)
    per_layer: dict[int, list[Any]] = {}  # a product's node (by id) -> the nodes in its place
    for i, mm in enumerate(scores):  # x @ K^T (B x P x HR) -> Transpose -> softmax; here K x^T (B x HR x P)
        nodes.clear()
        keys_t = producer[mm.input[1]]
        after = users.get(mm.output[0], [])
        if keys_t.op_type != "Transpose" or len(after) != 1 or after[0].op_type != "Transpose":
            raise RuntimeError(f"blip_itm_rx: unexpected scores product {mm.name}")
        keys = keys_t.input[0]                                                             # B x HR x E
        ks = row_scale(keys, "rx8_rows_top", f"rx8_k{i}_scale")
        kq = rounded(keys, ks, "rx8_zero_u8", f"rx8_k{i}_q")
        sums = node("MatMulInteger", [kq, xqt, "rx8_zero_u8", "rx8_zero_s8"], f"rx8_k{i}_sums")
        f = node("Cast", [sums], f"rx8_k{i}_sumsf", to=TensorProto.FLOAT)
        node("Mul", [node("Mul", [f, ks], f"rx8_k{i}_rows"), xst], after[0].output[0])      # the softmax's input
        per_layer[id(mm)] = list(nodes)
    for i, mm in enumerate(weighted):  # P x (B x HR x P by B x P x E)
        nodes.clear()
        p = node("Mul", [mm.input[0], xst], f"rx8_p{i}_scaled")
        ps = row_scale(p, "rx8_probs_top", f"rx8_p{i}_scale", signed=False)
        pq = rounded(p, ps, "rx8_nil_u8", f"rx8_p{i}_q")
        sums = node("MatMulInteger", [pq, xq, "", "rx8_zero_s8"], f"rx8_p{i}_sums")
        f = node("Cast", [sums], f"rx8_p{i}_sumsf", to=TensorProto.FLOAT)
        node("Mul", [f, ps], mm.output[0])
        per_layer[id(mm)] = list(nodes)
    gone = {id(users[mm.output[0]][0]) for mm in scores}  # the transposes to the softmax's layout
    gone |= {id(producer[mm.input[1]]) for mm in scores if len(users[mm.input[1]]) == 1}  # and of the keys
    order: list[Any] = list(head)
    for n in graph.node:
        if id(n) in gone:
            continue
        order.extend(per_layer.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(order)
    return len(scores) + len(weighted)


PROBE_TEXTS = ["a red circle on a white background", "two blue squares"]


def _probe_images() -> list[Any]:
    """Two fixed pictures with shapes and edges (a blank one hardly exercises a vision tower)."""
    from PIL import Image, ImageDraw

    a = Image.new("RGB", (320, 240), (240, 240, 235))
    ImageDraw.Draw(a).ellipse((40, 40, 160, 160), fill=(210, 30, 40))
    b = Image.new("RGB", (240, 320), (40, 60, 90))
    draw = ImageDraw.Draw(b)
    draw.rectangle((20, 30, 120, 130), fill=(40, 90, 220))
    draw.polygon([(130, 300), (230, 300), (180, 180)], fill=(250, 210, 30))
    return [a, b]


def _probe_inputs(model: Any, name: str) -> dict[str, Any]:
    """What ``name``'s int8 self-check feeds it (engines/selfcheck.py): the model's own preprocessing of fixed
    texts and pictures; BLIP's candidates are the torch vision tower's features stored as float16, as ingest
    stores them. Small, so the check stays cheap at warm-up: two texts, one picture for the vision towers, two
    query-candidate pairs for ITM."""
    import numpy as np

    images = _probe_images()
    if name == "siglip_text":
        return {"input_ids": model.text_inputs(PROBE_TEXTS[:2])}
    if name == "siglip_image":
        return {"pixel_values": model.image_inputs(images[:1])}
    pixels = model.pixel_inputs(images)
    if name == "blip_vision":
        return {"pixel_values": pixels[:1]}
    tok = model.tokenizer(PROBE_TEXTS[:2], padding=True, truncation=True, max_length=model.max_tokens, return_tensors="np")
    ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
    if name == "blip_itc":
        return {"input_ids": ids, "attention_mask": mask}
    with torch.inference_mode():
        embeds = BlipCores(model.model).vision(torch.from_numpy(pixels)).numpy().astype(np.float16)
    owner = np.array([0, 1])  # the first query against the first picture, the second against the second
    if name == "blip_itm":
        return {"input_ids": ids[owner], "attention_mask": mask[owner], "image_embeds": embeds}
    return {"input_ids": ids, "attention_mask": mask, "owner": owner.astype(np.int64), "image_embeds": embeds}


def _write_probe(model: Any, name: str, fp32: Path) -> None:
    """The probe beside the graphs: its inputs and the fp32 graph's outputs on them."""
    import numpy as np

    from engines.ort import Session

    inputs = _probe_inputs(model, name)
    sess = Session(fp32, "cpu", 0)
    feed = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in inputs.items()}
    values = sess(**feed)
    write_probe(probe_path(fp32), inputs, dict(zip([o.name for o in sess.outputs()], values, strict=True)))


def _fusable(m: TorchSiglip, name: str) -> tuple[int, int]:
    cfg = m.model.config.text_config if name == "siglip_text" else m.model.config.vision_config
    return cfg.num_attention_heads, cfg.hidden_size


# what to trace, example inputs, input names, output names, dynamic axes
Spec = tuple[Callable[..., Any], tuple[torch.Tensor, ...], list[str], list[str], dict[str, dict[int, str]]]


def last_position_text_features(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """SigLIP's text features, computing only what they read: the output is the last position after the final
    layer, so that layer's query, attention output and MLP run for that position alone (keys and values still
    see every position). The same numbers as ``get_text_features``; about 1/12 less work in the base model."""
    tm = model.text_model
    h = tm.embeddings(input_ids=input_ids)
    *body, last = tm.encoder.layers
    for layer in body:
        h = layer(h, None)
    attn = last.self_attn
    x = last.layer_norm1(h)
    b, t, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x[:, -1:]).view(b, 1, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
    w = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
    o = attn.out_proj((w @ v).transpose(1, 2).reshape(b, 1, -1))
    h_last = h[:, -1:] + o
    h_last = h_last + last.mlp(last.layer_norm2(h_last))
    return tm.head(tm.final_layer_norm(h_last)[:, 0])  # type: ignore[no-any-return]


def siglip_specs(m: TorchSiglip) -> dict[str, Spec]:
    model = m.model
    # eager attention traces to the MatMul/Softmax pattern that ONNX Runtime's Attention fusion recognises
    # (same numbers as sdpa)
    model.set_attn_implementation("eager")
    ids = torch.from_numpy(m.text_inputs(["a photo", "two cats"]))
    pixels = torch.from_numpy(m.image_inputs([_blank()] * 2))
    return {
        "siglip_text": (lambda i: last_position_text_features(model, i), (ids,), ["input_ids"], ["features"],
                        {"input_ids": {0: "batch"}, "features": {0: "batch"}}),
        "siglip_image": (lambda p: features(model.get_image_features(pixel_values=p)), (pixels,), ["pixel_values"],
                         ["features"], {"pixel_values": {0: "batch"}, "features": {0: "batch"}}),
    }


def blip_specs(m: TorchBlip) -> dict[str, Spec]:
    cores = BlipCores(m.model)
    pixels = torch.from_numpy(m.pixel_inputs([_blank()] * 2))
    with torch.inference_mode():
        embeds = cores.vision(pixels[:1]).repeat(3, 1, 1)
    ids, mask = (torch.from_numpy(x) for x in m.query_inputs("a photo of two cats"))
    ids3, mask3 = ids.repeat(3, 1), mask.repeat(3, 1)
    # two queries (padded to one length, as cross-query batching sends them) and three candidates
    ids2 = torch.cat([ids, ids.flip(1)])
    mask2 = torch.cat([mask, mask.clone().index_fill_(1, torch.tensor([ids.shape[1] - 1]), 0)])
    owner = torch.tensor([0, 1, 1])
    return {
        "blip_vision": (cores.vision, (pixels,), ["pixel_values"], ["image_embeds"],
                        {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
        "blip_itc": (cores.itc, (ids, mask), ["input_ids", "attention_mask"], ["text_proj"],
                     {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                      "text_proj": {0: "batch"}}),
        "blip_itm": (cores.itm, (ids3, mask3, embeds), ["input_ids", "attention_mask", "image_embeds"],
                     ["itm", "image_proj"],
                     {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                      "image_embeds": {0: "batch", 1: "patches"}, "itm": {0: "batch"}, "image_proj": {0: "batch"}}),
        "blip_itm_rx": (cores.itm_rx, (ids2, mask2, owner, embeds), ["input_ids", "attention_mask", "owner", "image_embeds"],
                        ["itm", "image_proj"],
                        {"input_ids": {0: "queries", 1: "tokens"}, "attention_mask": {0: "queries", 1: "tokens"},
                         "owner": {0: "batch"}, "image_embeds": {0: "batch", 1: "patches"}, "itm": {0: "batch"},
                         "image_proj": {0: "batch"}}),
    }


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 48), (128, 64, 32))


def build_onnx(siglip_source: str, blip_source: str, engine_dir: Path, precisions: tuple[str, ...] = ("fp32",),
               components: tuple[str, ...] = SIGLIP_COMPONENTS + BLIP_COMPONENTS, force: bool = False,
               progress: Callable[[str], None] | None = None, recipe: Recipe = INT8_RECIPE) -> list[Path]:
    """Export (and quantise) the named components; skip those already built unless ``force``."""
    built: list[Path] = []
    loaders: list[tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]] = []
    if set(components) & set(SIGLIP_COMPONENTS):
        loaders.append((lambda: TorchSiglip(siglip_source), siglip_specs))
    if set(components) & set(BLIP_COMPONENTS):
        loaders.append((lambda: TorchBlip(blip_source), blip_specs))
    for load, specs_of in loaders:
        model = load()
        owner = model.model
        for name, (fn, args, inputs, outputs, axes) in specs_of(model).items():
            if name not in components:
                continue
            fp32 = onnx_path(engine_dir, model.version, name, "fp32")
            if force or not fp32.is_file():
                t0 = time.perf_counter()
                _export(fn, owner, args, fp32, inputs, outputs, axes)
                log.info("exported %s in %.1f s (%.0f MB)", fp32, time.perf_counter() - t0, fp32.stat().st_size / 1e6)
            if progress:
                progress(f"{name} fp32")
            built.append(fp32)
            if "int8" in precisions:
                int8 = onnx_path(engine_dir, model.version, name, "int8", recipe.name)
                if force or not probe_path(int8).is_file():
                    _write_probe(model, name, fp32)
                if force or not int8.is_file():
                    # SigLIP's towers are fused first (text: Attention, SkipLayerNorm, FastGelu, 2x at batch 1;
                    # image: LayerNorm and FastGelu only, 8%); BLIP's vision tower gained nothing from it (measured)
                    if name == "blip_itm_rx":
                        _quantize_reassociated(fp32, int8)
                    else:
                        _quantize(fp32, int8, recipe, _fusable(model, name) if name in SIGLIP_COMPONENTS else None)
                if progress:
                    progress(f"{name} int8")
                built.append(int8)
        manifest = engine_dir / model.version / "manifest.json"
        files = sorted(p.name for p in manifest.parent.glob("*.onnx"))
        manifest.write_text(json.dumps({"model_version": model.version, "source": str(model.path), "opset": OPSET,
                                        "torch": torch.__version__, "files": files,
                                        "int8_recipe": recipe.name if "int8" in precisions else None}, indent=2))
    return built
