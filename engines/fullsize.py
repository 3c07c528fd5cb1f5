"""Full-size random-weight models with the real architectures' shapes: the same cost as the real checkpoints,
for speed figures and full-size parity tests on machines that can't download weights.

The real checkpoints' configs: ``google/siglip2-base-patch16-512`` (ViT-B/16 at 512 px, 768-d, 12+12 layers, a
Gemma vocabulary of 256,000 entries with pad 0 and EOS 1: the embedding table alone is 197M parameters, 786 MB in
fp32) and ``Salesforce/blip-itm-large-coco`` / ``blip-itm-base-coco`` (ViT-L/16 or ViT-B/16 at 384 px, the
BERT-base text side with its 30,524-entry vocabulary and cross-attention to the image tokens). The tokenizers
are small ones made offline (a Gemma-style one for SigLIP, a WordPiece one for BLIP) whose ids fall inside the
real vocabularies: memory, load time and export sizes are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BlipConfig, BlipForImageTextRetrieval, SiglipConfig, SiglipModel  # type: ignore[attr-defined]
from transformers.models.blip import BlipImageProcessorPil
from transformers.models.siglip import SiglipImageProcessorPil

from engines.tiny import gemma_tokenizer, make_tokenizer

SIGLIP_VOCAB = 256_000  # Gemma's
BLIP_VOCAB = 30_524  # bert-base-uncased's 30,522 plus BLIP's [DEC] and [ENC]


def siglip_config(vocab: int = SIGLIP_VOCAB) -> SiglipConfig:
    """SigLIP 2 base at 512 px; the text tower's special ids are Gemma's (pad 0, EOS 1, BOS 2)."""
    return SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2),
        vision_config=dict(image_size=512, patch_size=16, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12))


def _blip_config(vocab: int, vision_hidden: int, vision_layers: int, vision_heads: int) -> BlipConfig:
    """BLIP ITM: the BERT-base text side with cross-attention to the vision tower's tokens (ViT/16 at 384 px)."""
    return BlipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                         sep_token_id=3),
        vision_config=dict(image_size=384, patch_size=16, hidden_size=vision_hidden,
                           intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
                           num_attention_heads=vision_heads),
        projection_dim=256)


def blip_large_config(vocab: int = BLIP_VOCAB) -> BlipConfig:
    """BLIP ITM large (ViT-L/16): the product's default reranker."""
    return _blip_config(vocab, 1024, 24, 16)


def blip_base_config(vocab: int = BLIP_VOCAB) -> BlipConfig:
    """BLIP ITM base (ViT-B/16): what the load benchmark runs on a CPU, for both systems."""
    return _blip_config(vocab, 768, 12, 12)


def make_fullsize_models(root: Path | str, *, which: tuple[str, ...] = ("siglip", "blip"), seed: int = 0,
                         siglip_vocab: int = SIGLIP_VOCAB) -> dict[str, Path]:
    """Write the requested full-size random-weight models under ``root`` (skipping ones already there).
    ``siglip_vocab``: a smaller SigLIP embedding table costs the same per token (a lookup) and exports in a
    fraction of the time; the real 256,000 is the default, for memory and size figures."""
    root = Path(root)
    out = {}
    for name in which:
        folder = root / name
        out[name] = folder
        if (folder / "config.json").is_file():
            continue
        torch.manual_seed(seed)
        if name == "siglip":
            SiglipModel(siglip_config(siglip_vocab)).save_pretrained(folder)
            SiglipImageProcessorPil(size={"height": 512, "width": 512}).save_pretrained(folder)
            gemma_tokenizer().save_pretrained(folder)
        elif name in ("blip", "blip-base"):
            config = blip_large_config() if name == "blip" else blip_base_config()
            BlipForImageTextRetrieval(config).save_pretrained(folder)
            BlipImageProcessorPil(size={"height": 384, "width": 384}).save_pretrained(folder)
            make_tokenizer().save_pretrained(folder)
        else:
            raise ValueError(f"unknown model {name!r}; valid: siglip, blip, blip-base")
    return out
