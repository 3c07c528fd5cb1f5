"""Train the kit: a tokenizer, a small SigLIP (sigmoid loss) and a small BLIP ITM (ITC + ITM with hard
negatives) on the generated world, written in the transformers format the real loading code reads.

    imgsearch models train-kit --out engines/kit/models     # ~10 minutes on 2 CPU cores

Deterministic given the seed on one machine (same torch build and thread count).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import normalizers, pre_tokenizers
from transformers import (  # type: ignore[attr-defined]
    BertTokenizerFast,
    BlipConfig,
    BlipForImageTextRetrieval,
    SiglipConfig,
    SiglipModel,
)
from transformers.models.blip import BlipImageProcessorPil
from transformers.models.siglip import SiglipImageProcessorPil

from engines.kit.world import DATA_VERSION, Item, make_split, perturb
from engines.tiny import wordpiece_tokenizer

log = logging.getLogger(__name__)


@dataclass
class KitConfig:
    seed: int = 0
    image_size: int = 64
    n_train: int = 24_000  # rendered once; captions drawn per step from each item's phrasings
    siglip_steps: int = 700
    blip_steps: int = 1100
    batch: int = 128
    blip_batch: int = 64
    lr: float = 1e-3  # SigLIP
    blip_lr: float = 5e-4  # BLIP's text encoder is post-LN BERT: it trains worse at 1e-3
    hidden: int = 128
    layers: int = 3
    max_tokens: int = 24  # text positions; the engines pad SigLIP queries to this (it pools the last one)


def train_tokenizer(captions: list[str], vocab_size: int = 256) -> BertTokenizerFast:
    """A WordPiece tokenizer learned from the world's captions: the most frequent words (ties by spelling) as
    whole pieces, up to ``vocab_size`` pieces in all. Counted here rather than by the tokenizers trainer,
    which breaks frequency ties in hash order and so differs run to run."""
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for c in captions for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(c)))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    room = vocab_size - len(wordpiece_tokenizer([]))  # what the specials and the characters leave
    return wordpiece_tokenizer(words[:max(0, room)])


def _text_cfg(cfg: KitConfig, tok: BertTokenizerFast) -> dict[str, Any]:
    return dict(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                num_hidden_layers=cfg.layers, num_attention_heads=4, max_position_embeddings=cfg.max_tokens,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)


def _vision_cfg(cfg: KitConfig) -> dict[str, Any]:
    return dict(image_size=cfg.image_size, patch_size=8, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                num_hidden_layers=cfg.layers, num_attention_heads=4)


class Batches:
    """Random batches of distinct scenes (two alike scenes in one batch would be false negatives)."""

    def __init__(self, items: list[Item], pixels: np.ndarray, tok: BertTokenizerFast, cfg: KitConfig,
                 seed: int) -> None:
        self.items, self.pixels, self.tok, self.cfg = items, pixels, tok, cfg
        self.rng = random.Random(seed)
        self.captions = [it.scene.captions() for it in items]
        self.last: list[int] = []

    def __call__(self, size: int, pad: str = "max_length") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        idx: list[int] = []
        keys: set[str] = set()
        while len(idx) < size:
            i = self.rng.randrange(len(self.items))
            k = self.items[i].scene.key()
            if k not in keys:
                keys.add(k)
                idx.append(i)
        texts = [self.rng.choice(self.captions[i]) for i in idx]
        tok = self.tok(texts, padding=pad, max_length=self.cfg.max_tokens, truncation=True,
                       return_tensors="pt")
        self.last = idx
        return torch.from_numpy(self.pixels[idx]), tok["input_ids"], tok["attention_mask"], texts

    def perturbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A caption of each last item's scene with one thing changed (``world.perturb``), tokenised."""
        texts = [self.rng.choice(perturb(self.items[i].scene, self.rng).captions()) for i in self.last]
        tok = self.tok(texts, padding="longest", max_length=self.cfg.max_tokens, truncation=True, return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]


def _schedule(opt: torch.optim.Optimizer, steps: int, lr: float) -> Callable[[int], None]:
    warm = max(1, steps // 20)

    def at(step: int) -> None:
        f = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * max(0.02, f)
    return at


def siglip_processor(cfg: KitConfig) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})


def blip_processor(cfg: KitConfig) -> BlipImageProcessorPil:
    """BLIP's processor with SigLIP's normalisation: its ViT starts from SigLIP's, which was trained on those
    pixels (and one preprocessed array then feeds both models' training)."""
    return BlipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size},
                                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _save(out: Path, model: Any, tok: BertTokenizerFast, processor: Any) -> None:
    """The transformers folder the real loading code reads: weights, tokenizer, image processor."""
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    processor.save_pretrained(out)


def _pixels(processor: Any, items: list[Item], size: int) -> np.ndarray:
    out = []
    for start in range(0, len(items), 512):
        imgs = [it.image(size) for it in items[start:start + 512]]
        out.append(np.asarray(processor(images=imgs, return_tensors="np")["pixel_values"], np.float32))
    return np.concatenate(out)


def train_siglip(cfg: KitConfig, tok: BertTokenizerFast, items: list[Item], out: Path,
                 progress: Callable[[str], None], pixels: np.ndarray) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    processor = siglip_processor(cfg)
    model = SiglipModel(SiglipConfig(text_config=_text_cfg(cfg, tok), vision_config=_vision_cfg(cfg)))
    with torch.no_grad():  # the paper's start: t' = log 10, b = -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    lr_at, batches = _schedule(opt, cfg.siglip_steps, cfg.lr), Batches(items, pixels, tok, cfg, cfg.seed)
    model.train()
    t0, loss_ema = time.perf_counter(), 0.0
    for step in range(cfg.siglip_steps):
        lr_at(step)
        px, ids, _, _ = batches(cfg.batch)
        loss = model(input_ids=ids, pixel_values=px, return_loss=True).loss  # no mask: padded, as at query time
        _step(model, opt, loss)
        loss_ema = 0.98 * loss_ema + 0.02 * float(loss) if step else float(loss)
        if step % 100 == 0 or step == cfg.siglip_steps - 1:
            progress(f"siglip step {step}/{cfg.siglip_steps} loss {loss_ema:.3f}")
    _save(out, model, tok, processor)
    return {"steps": cfg.siglip_steps, "final_loss": round(loss_ema, 4), "train_s": round(time.perf_counter() - t0)}


def _blip_losses(model: BlipForImageTextRetrieval, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 gen: torch.Generator, perturbed: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC (InfoNCE both ways) and ITM on each positive pair plus one hard negative text per image and one
    hard negative image per text, sampled by ITC similarity (the BLIP recipe), and one perturbed caption per
    image (the same scene with one thing changed: in-batch negatives almost never differ that little)."""
    image_embeds = model.vision_model(pixel_values=px).last_hidden_state
    text = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0, :]
    img_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    txt_feat = F.normalize(model.text_proj(text), dim=-1)
    sim = img_feat @ txt_feat.t() / 0.07
    target = torch.arange(len(px))
    itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
    with torch.no_grad():
        w = F.softmax(sim.float(), dim=1) + 1e-5
        w.fill_diagonal_(0)
        neg_txt = torch.multinomial(w, 1, generator=gen).squeeze(1)  # per image
        w = F.softmax(sim.t().float(), dim=1) + 1e-5
        w.fill_diagonal_(0)
        neg_img = torch.multinomial(w, 1, generator=gen).squeeze(1)  # per text
    p_ids, p_mask = perturbed
    width = max(ids.shape[1], p_ids.shape[1])
    pad = lambda t: F.pad(t, (0, width - t.shape[1]))  # noqa: E731  (pad ids and masks with 0: [PAD], masked)
    all_ids = torch.cat([pad(ids), pad(ids), pad(ids[neg_txt]), pad(p_ids)])
    all_mask = torch.cat([pad(mask), pad(mask), pad(mask[neg_txt]), pad(p_mask)])
    all_img = torch.cat([image_embeds, image_embeds[neg_img], image_embeds, image_embeds])
    img_mask = torch.ones(all_img.shape[:-1], dtype=torch.long)
    hidden = model.text_encoder(input_ids=all_ids, attention_mask=all_mask, encoder_hidden_states=all_img,
                                encoder_attention_mask=img_mask).last_hidden_state[:, 0, :]
    labels = torch.cat([torch.ones(len(px)), torch.zeros(3 * len(px))]).long()
    itm = F.cross_entropy(model.itm_head(hidden), labels)
    return itc, itm


@torch.no_grad()
def init_vision_from_siglip(blip: BlipForImageTextRetrieval, siglip: SiglipModel) -> None:
    """Start BLIP's ViT from the trained SigLIP ViT (BLIP itself starts from a pretrained ViT): the same pre-LN
    blocks, with q/k/v fused into one projection, and a class token (new) in front of the patches."""
    bv: Any = blip.vision_model
    sv: Any = siglip.vision_model
    bv.embeddings.patch_embedding.load_state_dict(sv.embeddings.patch_embedding.state_dict())
    bv.embeddings.position_embedding[0, 1:] = sv.embeddings.position_embedding.weight
    bv.embeddings.position_embedding[0, 0] = 0
    for b, s in zip(bv.encoder.layers, sv.encoder.layers, strict=True):
        a = s.self_attn
        b.self_attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        b.self_attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        b.self_attn.projection.load_state_dict(a.out_proj.state_dict())
        for name in ("layer_norm1", "layer_norm2", "mlp"):
            getattr(b, name).load_state_dict(getattr(s, name).state_dict())
    bv.post_layernorm.load_state_dict(sv.post_layernorm.state_dict())


def train_blip(cfg: KitConfig, tok: BertTokenizerFast, items: list[Item], out: Path,
               progress: Callable[[str], None], pixels: np.ndarray, siglip: SiglipModel | None = None) -> dict[str, Any]:
    torch.manual_seed(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    processor = blip_processor(cfg)
    model = BlipForImageTextRetrieval(BlipConfig(text_config=_text_cfg(cfg, tok), vision_config=_vision_cfg(cfg),
                                                 projection_dim=64))
    if siglip is not None:
        init_vision_from_siglip(model, siglip)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.blip_lr, weight_decay=0.05)
    lr_at, batches = _schedule(opt, cfg.blip_steps, cfg.blip_lr), Batches(items, pixels, tok, cfg, cfg.seed + 3)
    model.train()
    t0, ema = time.perf_counter(), (0.0, 0.0)
    for step in range(cfg.blip_steps):
        lr_at(step)
        px, ids, mask, _ = batches(cfg.blip_batch, pad="longest")  # BLIP masks padding
        itc, itm = _blip_losses(model, px, ids, mask, gen, batches.perturbed())
        _step(model, opt, itc + itm)
        ema = (0.98 * ema[0] + 0.02 * float(itc), 0.98 * ema[1] + 0.02 * float(itm)) if step else (float(itc), float(itm))
        if step % 100 == 0 or step == cfg.blip_steps - 1:
            progress(f"blip step {step}/{cfg.blip_steps} itc {ema[0]:.3f} itm {ema[1]:.3f}")
    _save(out, model, tok, processor)
    return {"steps": cfg.blip_steps, "final_itc": round(ema[0], 4), "final_itm": round(ema[1], 4),
            "train_s": round(time.perf_counter() - t0)}


def train_kit(out: Path | str, cfg: KitConfig | None = None, progress: Callable[[str], None] = log.info,
              eval_gallery: int = 500) -> dict[str, Any]:
    """Train both models into ``out/siglip`` and ``out/blip``, measure them on the held-out world (a gallery
    of ``eval_gallery`` scenes; 0 skips it) and write ``out/manifest.json``."""
    cfg = cfg or KitConfig()
    out = Path(out)
    t0 = time.perf_counter()
    items = make_split(cfg.n_train, held_out=False, seed=cfg.seed)
    tok = train_tokenizer([c for it in items for c in it.scene.captions()])
    progress(f"tokenizer: {len(tok)} pieces; {len(items)} training scenes")
    manifest: dict[str, Any] = {"data_version": DATA_VERSION, "config": asdict(cfg), "torch": torch.__version__}
    pixels = _pixels(siglip_processor(cfg), items, cfg.image_size)
    manifest["siglip"] = train_siglip(cfg, tok, items, out / "siglip", progress, pixels)
    manifest["blip"] = train_blip(cfg, tok, items, out / "blip", progress, pixels,
                                  SiglipModel.from_pretrained(out / "siglip"))
    manifest["train_s"] = round(time.perf_counter() - t0)
    if eval_gallery:
        from engines.blip import TorchBlip
        from engines.kit.evaluate import evaluate, table
        from engines.siglip import TorchSiglip

        report = evaluate(TorchSiglip(str(out / "siglip")), TorchBlip(str(out / "blip")), n=eval_gallery)
        progress(f"held-out gallery of {eval_gallery} scenes\n{table(report)}")
        manifest["metrics"] = report
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
