"""Tiny random-weight SigLIP and BLIP of the real transformers classes, with a tokenizer made offline.

They exercise the same loading and inference code as the real checkpoints, on machines that can't
download weights. They rank at random: quality comes from the trained model kit.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (  # type: ignore[attr-defined]
    BertTokenizerFast,
    BlipConfig,
    BlipForImageTextRetrieval,
    GemmaTokenizer,
    SiglipConfig,
    SiglipModel,
)
from transformers.models.blip import BlipImageProcessorPil
from transformers.models.siglip import SiglipImageProcessorPil

_WORDS = """a an the of on in with and at by to is are one two three four five many some big small large tiny
red green blue yellow orange purple pink black white gray brown circle square triangle star heart ring
cross stripe dot shape shapes background left right top bottom middle center corner near next above below
cat dog face meme surprised confused happy sad computer looking picture photo image funny reddit post"""


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(words: list[str]) -> BertTokenizerFast:
    """A WordPiece tokenizer with ``words`` as whole pieces (in that order) over every character as a
    fallback, so any text still tokenises; saved and reloaded like BERT's."""
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = SPECIALS + chars + ["##" + c for c in chars] + [w for w in words if w not in chars]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def make_tokenizer(extra_words: str = "") -> BertTokenizerFast:
    """Over a small built word list, not trained, so it is the same on every run."""
    return wordpiece_tokenizer(sorted(set((_WORDS + " " + extra_words).lower().split())))


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, as in Gemma's vocabulary


def gemma_tokenizer(extra_words: str = "", vocab_size: int = 600) -> GemmaTokenizer:
    """A Gemma-style tokenizer as SigLIP 2 has it (BPE over "▁"-joined text with byte fallback; pad 0, EOS 1,
    BOS 2), trained on the word list, with the conversion script's settings: no BOS, EOS appended, padding on
    the right. Deterministic (the same corpus every time)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    words = sorted(set((_WORDS + " " + extra_words).lower().split()))
    specials = GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]  # byte fallback: any text tokenises
    tok.train_from_iterator([" ".join(words[i:i + 6]) for i in range(len(words))],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    return GemmaTokenizer(tokenizer_object=tok, add_bos_token=False, add_eos_token=True, padding_side="right")


def _text_cfg(vocab: int, hidden: int, tokenizer: BertTokenizerFast) -> dict[str, int]:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)


def _vision_cfg(hidden: int, image_size: int) -> dict[str, int]:
    return dict(image_size=image_size, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=2)


def _spread(model: torch.nn.Module, std: float = 0.15) -> None:
    """Widen the random init: with BLIP's default (std 0.02) and so few layers every image gets near-identical
    features, and every candidate the same score, which would hide ranking bugs in tests."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)


def make_tiny_models(root: Path | str, *, seed: int = 0, image_size: int = 32) -> tuple[Path, Path]:
    """Write ``siglip/`` and ``blip/`` model folders under ``root``; return their paths."""
    root = Path(root)
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    siglip_dir, blip_dir = root / "siglip", root / "blip"

    torch.manual_seed(seed)
    siglip = SiglipModel(SiglipConfig(text_config=_text_cfg(vocab, 32, tokenizer),
                                      vision_config=_vision_cfg(32, image_size)))
    siglip.save_pretrained(siglip_dir)
    tokenizer.save_pretrained(siglip_dir)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(siglip_dir)

    torch.manual_seed(seed + 1)
    blip = BlipForImageTextRetrieval(BlipConfig(text_config=_text_cfg(vocab, 32, tokenizer),
                                                vision_config=_vision_cfg(48, image_size), projection_dim=16))
    _spread(blip)
    blip.save_pretrained(blip_dir)
    tokenizer.save_pretrained(blip_dir)
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(blip_dir)
    return siglip_dir, blip_dir
