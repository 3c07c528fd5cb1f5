"""SigLIP's text side as it was trained: open_clip's text cleaning, and the token layout the text tower pools from.

SigLIP's text tower pools the LAST position of a fixed-length sequence, so the layout decides what a query's
vector means: the text's pieces, then EOS, then padding on the right up to the fixed length (64), with EOS kept
when a long text is truncated. The ids a tokenizer gives depend on its files (``tokenizer_config.json``'s
``padding_side``, ``tokenizer.json``'s post-processor), and a checkpoint's files may disagree with how its model
was trained without any error. So padding is forced to the right at every call, and at load ``check_layout``
compares the tokenizer's output for a short and a long text with the layout laid by hand from its plain pieces
and the config's pad and EOS ids; a folder whose files disagree is refused with a message naming the file.
"""

from __future__ import annotations

import html
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import ModelLoadError

_PUNCT = str.maketrans("", "", string.punctuation)
# what the self-check tokenizes: a short text, and one longer than any text limit (it must be truncated)
SHORT_TEXT = "a photo of two cats"
LONG_TEXT = " ".join(["a red circle above a blue square next to a green star"] * 40)


def canonicalize(text: str) -> str:
    """open_clip's ``canonicalize`` cleaning, which the SigLIP 2 weights were evaluated with: HTML entities
    unescaped (twice, as open_clip does), underscores to spaces, punctuation removed, lower case, whitespace
    collapsed. open_clip first repairs mojibake with ftfy; we only normalise to NFC (what ftfy's repair ends with)
    rather than add that dependency for a case queries typed into a box rarely hit."""
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
    text = text.replace("_", " ").translate(_PUNCT).lower()
    return " ".join(text.split())


class TokenizerLayoutError(ModelLoadError):
    """A model folder's tokenizer files give ids that differ from the layout its text tower was trained on."""

    code = "tokenizer_layout"


@dataclass(frozen=True)
class TextLayout:
    """The trained layout: ``prefix + pieces[:text_tokens] + [eos] + [pad] * rest``, ``max_tokens`` long."""

    max_tokens: int
    pad_id: int
    eos_id: int
    prefix: tuple[int, ...]  # BERT-style tokenizers open with [CLS]; SentencePiece and Gemma ones add nothing
    ids_from: str  # where the pad and EOS ids came from

    @property
    def text_tokens(self) -> int:
        """How many of a text's tokens fit; the rest is cut (EOS stays)."""
        return self.max_tokens - len(self.prefix) - 1

    def lay_out(self, pieces: Sequence[int]) -> list[int]:
        body = [*self.prefix, *pieces[:self.text_tokens], self.eos_id]
        return body + [self.pad_id] * (self.max_tokens - len(body))

    def describe(self, tokenizer: Any) -> str:
        def name(i: int) -> str:
            return f"{tokenizer.convert_ids_to_tokens(int(i))}={i}"

        head = "".join(f"{name(i)}, " for i in self.prefix)
        return (f"[{head}text..., {name(self.eos_id)}, {name(self.pad_id)}...] padded on the right to "
                f"{self.max_tokens} tokens; up to {self.text_tokens} text tokens, EOS kept when cut "
                f"(pad and EOS ids from {self.ids_from})")


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> NDArray[np.int64]:
    """Cleaned texts to ids, padded on the right to ``max_tokens`` whatever the tokenizer files say (a Gemma
    tokenizer without ``padding_side`` pads on the left, which would pool an EOS instead of padding)."""
    tok = tokenizer([canonicalize(t) for t in texts], padding="max_length", max_length=max_tokens, truncation=True,
                    padding_side="right", return_tensors="np")
    return np.asarray(tok["input_ids"], dtype=np.int64)


def _special_ids(config: dict[str, Any], tokenizer: Any) -> tuple[int, int, str]:
    """Pad and EOS ids: the model config's where it names them (the text tower was trained with those), else the
    tokenizer's own."""
    text = config.get("text_config") or {}
    pad, eos = text.get("pad_token_id"), text.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if pad is not None and eos is not None:
        return int(pad), int(eos), "config.json"
    pad = pad if pad is not None else tokenizer.pad_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    if pad is None or eos is None:
        raise TokenizerLayoutError(
            "neither config.json (text_config.pad_token_id / eos_token_id) nor the tokenizer files "
            "(tokenizer_config.json's pad_token / eos_token) name a pad and an EOS token; add them to "
            "config.json's text_config")
    return int(pad), int(eos), "config.json and the tokenizer files"


def _prefix(tokenizer: Any) -> tuple[int, ...]:
    cls = getattr(tokenizer, "cls_token_id", None)
    return (int(cls),) if cls is not None else ()


def _diagnose(got: list[int], want: list[int], layout: TextLayout, eos_token: str, long: bool) -> str:
    """What differs, which file decides it, and the fix."""
    eos, pad, n = layout.eos_id, layout.pad_id, len(layout.prefix)
    post = ("tokenizer.json's post_processor decides the special tokens in transformers 5 (add_bos_token and "
            "add_eos_token are ignored where it is set)")
    fix = (f'set its post_processor to a TemplateProcessing with single "$A {eos_token}" (what the conversion '
           "script writes: add_bos_token=False, add_eos_token=True), or re-save the tokenizer so that")
    if got[n] != want[n] and got[n + 1:n + 3] == want[n:n + 2]:  # one token too many before the text: a BOS
        return (f"the ids start with {got[:n + 3]} where the text tower was trained on {want[:n + 2]}: {post}; {fix} "
                "it adds no BOS")
    if eos not in got:
        return f"no EOS (id {eos}) in the ids: {post}; {fix} it appends EOS"
    if long and got[-1] != eos:
        return f"a truncated text ends with id {got[-1]}, not EOS (id {eos}): {post}; {fix} truncation keeps EOS"
    at = got.index(eos)
    if any(i != pad for i in got[at + 1:]):
        return (f"the padding after EOS is {sorted(set(got[at + 1:]))}, not id {pad} (from {layout.ids_from}): make "
                "tokenizer_config.json's pad_token the token that config.json's text_config.pad_token_id names")
    return f"the text's pieces differ: got {got[:at + 1]}, want {want[:want.index(eos) + 1]}"


def text_positions(config: dict[str, Any], default: int = 64) -> int:
    """How many positions the text tower has (a small model may have fewer than the 64 queries are padded to)."""
    return int((config.get("text_config") or {}).get("max_position_embeddings", default))


def check_layout(path: Path, tokenizer: Any, config: dict[str, Any], max_tokens: int) -> TextLayout:
    """The trained layout of this folder's text tower, ``max_tokens`` long (never more than the tower's positions),
    after checking that its tokenizer gives exactly it for a short and a long text; raises
    ``TokenizerLayoutError`` naming the file to fix where it does not."""
    pad, eos, ids_from = _special_ids(config, tokenizer)
    max_tokens = min(max_tokens, text_positions(config, max_tokens))
    layout = TextLayout(max_tokens, pad, eos, _prefix(tokenizer), ids_from)
    if layout.text_tokens < 1:
        raise TokenizerLayoutError(f"{path}: {max_tokens} text positions leave no room for a text")
    for text, long in ((SHORT_TEXT, False), (LONG_TEXT, True)):
        clean = canonicalize(text)
        pieces = list(tokenizer(clean, add_special_tokens=False, verbose=False)["input_ids"])
        if long and len(pieces) <= layout.text_tokens:
            continue  # a tokenizer with very long pieces: nothing to truncate
        got = [int(i) for i in tokenize(tokenizer, [text], max_tokens)[0]]
        want = layout.lay_out(pieces)
        if got != want:
            why = _diagnose(got, want, layout, str(tokenizer.convert_ids_to_tokens(eos)), long)
            raise TokenizerLayoutError(
                f"the tokenizer files in {path} do not give the layout this SigLIP text tower was trained on "
                f"({layout.describe(tokenizer)}): {why}. "
                f"For {'a long' if long else 'a short'} text it gave {got[:8]}...{got[-3:]}; refusing to load, "
                "since the vectors would be silently wrong")
    return layout
