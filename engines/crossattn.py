"""BLIP's ITM text side from stored image features, with the cross-attention reassociated: exact, and several
times cheaper for a short query.

A cross-attention head h of a layer sees the text rows ``Q_h`` (L x d) and the candidate's image tokens ``X``
(P x E, P = 577 for ViT/16 at 384 px) through the layer's key and value weights ``W_k,h``, ``W_v,h`` (d x E):

- scores = ``Q_h (X W_k,h^T + b_k,h)^T`` = ``(Q_h W_k,h) X^T`` + ``Q_h b_k,h^T``. The last term adds one
  constant to each row of scores and softmax cancels it, so the key bias drops out.
- output = ``P_h (X W_v,h^T + b_v,h)`` = ``(P_h X) W_v,h^T + b_v,h``, because each row of the softmax ``P_h``
  sums to one.

So the 577 image tokens are never projected to keys and values: per layer and candidate the work goes from
about ``2 P E D`` multiply-adds (the projections) to about ``2 L (D E + H P E)``. For a short query that is
several times less; near 62 tokens the two meet, and ``reassociation_pays`` says which is cheaper for a call.

More exact savings, for every call of this forward:
- the first layer's text-only work (embeddings, self-attention, the cross-attention query and ``Q_h W_k,h``)
  depends on the query alone, so it runs once per query and is gathered to its candidates (``owner``);
- the last layer computes only the [CLS] row, the only output ITM reads (its self-attention still sees every
  token as keys and values);
- the softmax scale rides on the cross-attention query (``Q_h W_k,h`` is scaled, not the B x HR x P scores), and
  the value bias through the output dense is folded into that dense's bias once at load.

The forward uses the model's own modules (embeddings, ``nn.Linear`` layers, LayerNorms) and weights, so it
loads nothing of its own, exports to ONNX as plain MatMul/Softmax graphs, and its weight matmuls quantize as
the original's do.
In bf16 on a CPU its linear products run on those weights packed once for oneDNN (``pack``,
``engines/packed.py``), the same products up to rounding; in torch int8 (``quantize``, ``engines/intmm.py``) they
and the two products over the image tokens run in int8, each operand with a scale per row.

An optional ``AttentionTap`` set on the module (``tap``) keeps, for one layer, the text [CLS] row's attention
probabilities over the image tokens as the pass computes them (``engines/explain.py`` turns them into maps);
without one the forward does nothing more.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engines import intmm
from engines import packed as packing


def cross_attention_macs(tokens: int, *, hidden: int, heads: int, patches: int, width: int,
                         reassociated: bool) -> int:
    """Multiply-adds of one cross-attention layer for one candidate, besides the query and output projections
    that both ways share: the key/value projections of the image tokens plus attention the usual way, or
    ``Q_h W_k,h``, ``(P_h X) W_v,h^T`` and the two attention products over the image's width reassociated."""
    if reassociated:
        return 2 * tokens * hidden * width + 2 * heads * tokens * patches * width
    return 2 * patches * width * hidden + 2 * tokens * patches * hidden


def reassociation_pays(tokens: int, *, hidden: int, heads: int, patches: int, width: int,
                       float_cost: float = 1.0) -> bool:
    """True where the reassociated cross-attention costs less than the usual one for queries padded to
    ``tokens``: in multiply-adds (BLIP-base and -large with 577 image tokens: up to 62 tokens), each of the
    products with activations on both sides counted ``float_cost`` times where the backend runs the weight
    products faster (int8) than those (float)."""
    shape = dict(hidden=hidden, heads=heads, patches=patches, width=width)
    rewrite = float_cost * cross_attention_macs(tokens, reassociated=True, **shape)
    # the usual way: the key/value projections are weight products, its attention products are not
    projections = 2 * patches * width * hidden
    plain = projections + float_cost * (cross_attention_macs(tokens, reassociated=False, **shape) - projections)
    return rewrite < plain


def _gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` along the first axis, as an embedding lookup: one Gather in ONNX, and in bf16 on a CPU about
    400x faster than ``index_select`` (measured: 0.2 ms against 90 ms for 32 x 96 x 768)."""
    return nn.functional.embedding(rows, x.reshape(x.shape[0], -1)).view(rows.shape[0], *x.shape[1:])


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` laid out contiguous, in the eager pass and in a compiled one. Inductor treats ``contiguous()`` as a
    hint and may keep the producer's layout: for the softmax over the image tokens it wrote B x HR x P probabilities
    with the tokens' stride 1 row apart, and the product that reads them ran 1.4x slower (AOTInductor, BLIP-base
    bf16 on a 2-core AMX Xeon: 3.2 against 2.3 ms a layer over 32 candidates); its stride-order primitive holds
    the layout."""
    if not torch.compiler.is_compiling():
        return x.contiguous()
    from torch._inductor import inductor_prims  # noqa: F401 - registers prims.inductor_force_stride_order

    return torch.ops.prims.inductor_force_stride_order(x, [x.shape[1] * x.shape[2], x.shape[2], 1])  # type: ignore[no-any-return]


class AttentionTap:
    """The cross-attention probabilities at ``layer`` (negative: from the last) as the pass computed them, one
    B x HR x P tensor per forward call in ``probs`` (in the autograd graph where gradients are on);
    ``cls_rows`` reads the text [CLS] row of each head from one of them."""

    def __init__(self, layer: int = -1) -> None:
        self.layer, self.heads = layer, 0
        self.probs: list[torch.Tensor] = []

    def capture(self, index: int, layers: int, probs: torch.Tensor, heads: int) -> None:
        if index != self.layer % layers:
            return
        self.heads = heads
        self.probs.append(probs)

    def cls_rows(self, probs: torch.Tensor) -> torch.Tensor:
        """B x HR x P -> B x H x P: each head's [CLS] row."""
        return probs.view(probs.shape[0], self.heads, -1, probs.shape[-1])[:, :, 0]


class ReassociatedItm(nn.Module):
    """``(ITM match probability, projected image feature)`` for each candidate, from its query's tokens and its
    stored image features, equal to ``BlipForImageTextRetrieval``'s ITM forward on them.

    ``input_ids``/``attention_mask``: one row per query (Q x L, padding masked); ``owner``: for each of the N
    candidates, the row of its query; ``image_embeds``: N x P x E. Several queries' candidates go in one call
    (cross-query batching) with each query's first layer run once."""

    folds_text = True  # with_text may serve the ITC text embedding (bench.baseline's pass may not)

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.m = model
        cfg = model.text_encoder.config
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.tap: AttentionTap | None = None
        self.tokens_as_rows: bool | None = None  # the scores' layout; None: by the device (_tokens_as_rows)
        self.packed = False  # the text layers' linear weights packed for oneDNN (pack; engines/packed.py)
        self.int8: dict[int, intmm.Int8Linear] = {}  # the text layers' linear products in int8, by the nn.Linear's id (quantize)
        # each layer's cross-attention value bias through its output dense, plus that dense's bias: softmax rows
        # sum to one, so the bias adds b_v to every context row and b_v W_o^T + b_o to every output row
        for i, layer in enumerate(model.text_encoder.encoder.layer):
            self.register_buffer(f"value_out_bias_{i}", self._value_out_bias(layer.crossattention), persistent=False)

    @staticmethod
    @torch.no_grad()
    def _value_out_bias(attention: Any) -> torch.Tensor:
        dense, b_v = attention.output.dense, attention.self.value.bias
        return (dense.weight.float() @ b_v.float() + dense.bias.float()).to(dense.bias.dtype)

    def pack(self) -> int:
        """Packs the text layers' linear weights for oneDNN (``engines/packed.py``), where that serves (bf16 on a
        CPU, layers wide enough for it to pay); the pass then runs its products on them. Returns the bytes added (0
        where nothing is packed)."""
        w = self.m.text_encoder.encoder.layer[0].attention.self.query.weight
        if not packing.available(w.dtype, w.device, int(self.m.text_encoder.config.hidden_size)):
            return 0
        weights = []
        for layer in self.m.text_encoder.encoder.layer:
            s, c = layer.attention.self, layer.crossattention
            weights += [s.query.weight, s.key.weight, s.value.weight, layer.attention.output.dense.weight,
                        c.self.query.weight, c.output.dense.weight, layer.intermediate.dense.weight, layer.output.dense.weight]
        added = packing.pack(weights)
        self.packed = True
        return added

    def quantize(self) -> int:
        """The pass in int8 (``engines/intmm.py``): the text layers' linear products on weights rounded once, and the
        two products over the image tokens on tokens rounded once a call. Returns the bytes the int8 weights hold."""
        for layer in self.m.text_encoder.encoder.layer:
            s, c = layer.attention.self, layer.crossattention
            for dense in (s.query, s.key, s.value, layer.attention.output.dense, c.self.query, c.output.dense,
                          layer.intermediate.dense, layer.output.dense):
                self.int8[id(dense)] = intmm.Int8Linear(dense)
        return sum(q.wt.numel() for q in self.int8.values())

    def _int8_now(self) -> bool:
        """Whether this call runs the int8 products: quantized, and no gradient wanted (the explain path's Grad-CAM
        differentiates through the attention, so it runs the float weights, which stay loaded)."""
        return bool(self.int8) and not torch.is_grad_enabled()

    def _own_products(self) -> bool:
        """Whether the linear products run here (packed or int8) rather than in the modules' own forwards."""
        return self._int8_now() or packing.in_use(self)

    def _linear(self, dense: nn.Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``dense(x)`` (with ``bias`` in place of its own where given), on its packed or int8 weight where in use."""
        if self._int8_now():
            return self.int8[id(dense)](x, bias)
        b = dense.bias if bias is None else bias
        if packing.in_use(self):
            return packing.op()(x, dense.weight, b, False)  # type: ignore[no-any-return]
        return dense(x) if bias is None else nn.functional.linear(x, dense.weight, b)

    def _output(self, out: Any, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """A BLIP text layer's output block (``BlipTextSelfOutput``/``BlipTextOutput``: dense, dropout, LayerNorm of
        the sum with ``residual``)."""
        if not self._own_products():
            return out(h, residual)  # type: ignore[no-any-return]
        return out.LayerNorm(out.dropout(self._linear(out.dense, h)) + residual)  # type: ignore[no-any-return]

    def _feed_forward(self, layer: Any, h: torch.Tensor) -> torch.Tensor:
        """``layer.feed_forward_chunk(h)``; on packed weights with BLIP's GELU (erf) in the first product's epilogue."""
        if not self._own_products():
            return layer.feed_forward_chunk(h)  # type: ignore[no-any-return]
        inter = layer.intermediate
        if self._int8_now():
            return self._output(layer.output, inter.intermediate_act_fn(self._linear(inter.dense, h)), h)
        fused = getattr(layer.config, "hidden_act", None) == "gelu"
        mid = packing.op()(h, inter.dense.weight, inter.dense.bias, fused)
        return self._output(layer.output, mid if fused else inter.intermediate_act_fn(mid), h)

    def _tokens_as_rows(self, x: torch.Tensor) -> bool:
        """The scores' layout: B x P x HR (True) or B x HR x P; ``tokens_as_rows`` set on the module wins (the
        tests compare both on one device), else by the device (rows first on a CPU)."""
        return x.device.type == "cpu" if self.tokens_as_rows is None else self.tokens_as_rows

    # --- the pieces of one BLIP text layer ---
    def _self_attention(self, layer: Any, h: torch.Tensor, neg: torch.Tensor, rows: int | None) -> torch.Tensor:
        """The layer's text self-attention; with ``rows`` only the first ``rows`` positions are computed (as
        queries), every position still serving as a key and a value."""
        a = layer.attention.self
        b, t, _ = h.shape
        hq = h if rows is None else h[:, :rows]
        r = hq.shape[1]
        q = self._linear(a.query, hq).view(b, r, self.heads, self.head_dim).transpose(1, 2)
        k = self._linear(a.key, h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self._linear(a.value, h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale + neg, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, r, -1)
        return self._output(layer.attention.output, ctx, hq)

    def _query_keys(self, layer: Any, a: torch.Tensor) -> torch.Tensor:
        """``Q_h W_k,h`` for every head, scaled by ``1/sqrt(d)`` (so the scores need no pass of their own), laid
        out B x HR x E for the scores (the key bias dropped: softmax cancels it); in int8 H x B x R x E, as the
        product makes them (``ImageTokens.scores`` rounds them into its order). The heads are the batch of the
        product, so no weight is copied per candidate."""
        c = layer.crossattention.self
        b, r, _ = a.shape
        q = (self._linear(c.query, a) * self.scale).view(b * r, self.heads, self.head_dim).transpose(0, 1)  # H x BR x d
        w_k = c.key.weight.view(self.heads, self.head_dim, -1)                         # H x d x E
        qk = torch.bmm(q, w_k).view(self.heads, b, r, -1)                              # H x B x R x E
        if self._int8_now():
            return qk
        return qk.transpose(0, 1).reshape(b, self.heads * r, -1)

    def _cross_attention(self, layer: Any, a: torch.Tensor, qk: torch.Tensor, x: torch.Tensor,
                         index: int = 0, tokens: intmm.ImageTokens | None = None) -> torch.Tensor:
        # one product per candidate for all heads (its image tokens are shared by every head). On a CPU the image
        # tokens are its rows: B x P x HR, measured faster than B x HR x P (the longer side first), then softmax
        # over the image tokens and back to B x HR x P for the second product. On a GPU a softmax over a middle
        # dimension is a slow kernel (on an H200, 53% of the pass's kernel time for 32 candidates in fp16), so
        # there the scores come as B x HR x P and the softmax runs over their last dimension.
        # The ONNX export (traced) turns the scores to B x HR x P before its softmax, over their last axis: ONNX
        # Runtime runs a softmax over another axis between two transposes of its own, and the graph took 6 to 8%
        # less time a rerank that way (BLIP-base, 32 candidates x 8 tokens, int8 and fp32, 2-core AMX Xeon).
        # In int8 (``tokens``, engines/intmm.py) the scores come as B x HR x P: the image tokens are the second
        # operand of both integer products.
        if tokens is not None:  # qk: H x B x R x E, the pass's own (rounded in place)
            probs = torch.softmax(tokens.scores(qk, inplace=True), dim=-1)             # B x HR x P
            if self.tap is not None:
                self.tap.capture(index, len(self.m.text_encoder.encoder.layer), probs, self.heads)
            px = tokens.weighted(probs, inplace=self.tap is None, heads=self.heads)    # H x BR x E
            return self._attend(layer, a, px, index, heads_first=True)
        if self._tokens_as_rows(x):
            scores = torch.bmm(x, qk.transpose(1, 2))                                  # B x P x HR
            if torch.jit.is_tracing():
                probs = torch.softmax(scores.transpose(1, 2), dim=-1)                  # B x HR x P
            else:
                probs = _contiguous(torch.softmax(scores, dim=1).transpose(1, 2))
        else:
            probs = torch.softmax(torch.bmm(qk, x.transpose(1, 2)), dim=-1)            # B x HR x P
        if self.tap is not None:
            self.tap.capture(index, len(self.m.text_encoder.encoder.layer), probs, self.heads)
        return self._attend(layer, a, torch.bmm(probs, x), index)                     # B x HR x E

    def _attend(self, layer: Any, a: torch.Tensor, px: torch.Tensor, index: int,
                heads_first: bool = False) -> torch.Tensor:
        """The cross-attention's end from ``P_h X`` (B x HR x E, or H x BR x E with ``heads_first``): each head's
        value weights, the output dense (the value bias in its bias) and the residual LayerNorm."""
        c = layer.crossattention.self
        b, r, _ = a.shape
        h, d = self.heads, self.head_dim
        if not heads_first:
            px = px.view(b, h, r, -1).transpose(0, 1).reshape(h, b * r, -1)            # H x BR x E
        w_v = c.value.weight.view(h, d, -1).transpose(1, 2)                            # H x E x d
        ctx = torch.bmm(px, w_v)                                                       # H x BR x d
        ctx = ctx.view(h, b, r, d).permute(1, 2, 0, 3).reshape(b, r, h * d)
        # the value bias, through the output dense, is a constant row: in that dense's bias (value_out_bias)
        out = layer.crossattention.output
        dense = self._linear(out.dense, ctx, getattr(self, f"value_out_bias_{index}"))
        return out.LayerNorm(out.dropout(dense) + a)  # type: ignore[no-any-return]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, owner: torch.Tensor,
                image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        itm, image_proj, _ = self._run(input_ids, attention_mask, owner, image_embeds, False)
        return itm, image_proj

    def with_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, owner: torch.Tensor,
                  image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward``'s two outputs and each query's ITC text embedding (``text_proj`` of the unimodal text
        pass's [CLS], as ``BlipCores.itc`` computes it), in the same pass: the unimodal pass is the ITM pass's
        text layers without their cross-attention, over the same tokens with the same weights, so its layer 0
        is the one the ITM pass already runs once per query, and from layer 1 on its rows ride along in the ITM
        rows' self-attention and feed-forward products (Q more rows beside B x L) instead of 12 layers of
        products of Q x L rows alone (on a 2-core AMX Xeon in bf16, that separate pass took 20 of a 181 ms
        rerank: products of 8 rows run far below the rate of products of 264)."""
        return self._run(input_ids, attention_mask, owner, image_embeds, True)  # type: ignore[return-value]

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, owner: torch.Tensor,
             image_embeds: torch.Tensor, text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        te = self.m.text_encoder
        layers = te.encoder.layer
        last = len(layers) - 1
        x = image_embeds
        tokens = intmm.ImageTokens(x) if self._int8_now() else None  # rounded once for every layer
        h = te.embeddings(input_ids=input_ids)                                         # Q x L x D
        neg = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        # the first layer up to its cross-attention scores: text only, once per query
        a = self._self_attention(layers[0], h, neg, 1 if last == 0 else None)
        qk = self._query_keys(layers[0], a)
        ta = a if text else None  # the unimodal pass's layer 0 (it has no cross-attention): the same rows
        a, query_neg, neg = _gather(a, owner), neg, _gather(neg, owner)
        qk = _gather(qk, owner) if qk.dim() == 3 else _gather(qk.transpose(0, 1), owner).transpose(0, 1)  # int8: H first
        n, th = owner.shape[0], h  # the ITM rows come first wherever the unimodal rows ride along
        for i, layer in enumerate(layers):
            rows = 1 if i == last else None
            if i and ta is None:
                a = self._self_attention(layer, h, neg, rows)
            elif i:
                both = self._self_attention(layer, torch.cat([h, th]), torch.cat([neg, query_neg]), rows)
                a, ta = both[:n], both[n:]
            if i:
                qk = self._query_keys(layer, a)
            crossed = self._cross_attention(layer, a, qk, x, i, tokens)
            if ta is None:
                h = self._feed_forward(layer, crossed)
            else:
                out = self._feed_forward(layer, torch.cat([crossed, ta]))
                h, th = out[:n], out[n:]
        cls = h[:, 0, :]
        itm = torch.softmax(self.m.itm_head(cls).float(), dim=-1)[:, 1]
        text_embed = self.m.text_proj(th[:, 0, :]) if text else None
        cls_token = x[:, 0, :] if tokens is None else x[:, 0, :].float()  # in int8 x may come as stored (float16)
        return itm, self.m.vision_proj(cls_token), text_embed
