"""Real checkpoints' shapes, built offline: a SigLIP 2-shaped folder (a Gemma-style tokenizer with byte fallback,
made with `tokenizers` and saved through transformers; a tiny SiglipModel with pad 0 / EOS 1) in the three ways
its tokenizer files are found in the wild. Each gives exactly the trained layout, with the embedding of ids laid
by hand, or is refused at load. Also: the ONNX export of that folder, versions, pickled weights, the hub cache
offline, SigLIP v1's SentencePiece tokenizer, and `imgsearch models check`."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, SiglipConfig, SiglipModel  # type: ignore[attr-defined]
from transformers.models.siglip import SiglipImageProcessorPil

from engines.loading import version_of
from engines.siglip import TorchSiglip
from engines.tiny import gemma_tokenizer
from engines.tokens import LONG_TEXT, TokenizerLayoutError, canonicalize

pytestmark = pytest.mark.checkpoints

PAD, EOS, BOS = 0, 1, 2
TEXTS = ["A photo of two cats", "a surprised pikachu face, caf\u00e9 \u2615", LONG_TEXT]
BOS_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<bos>": {"id": "<bos>", "ids": [BOS], "tokens": ["<bos>"]}},
}


def _tiny_siglip(vocab: int, pad: int, eos: int, image_size: int = 32) -> SiglipModel:
    torch.manual_seed(0)
    return SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=pad, eos_token_id=eos),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2))).eval()


def _siglip2_folder(folder: Path) -> Path:
    """As the conversion script writes it: add_bos_token=False, add_eos_token=True, padding_side right."""
    tokenizer = gemma_tokenizer()
    _tiny_siglip(len(tokenizer), PAD, EOS).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _edit_json(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("siglip2")
    conversion = _siglip2_folder(root / "conversion" / "siglip2")
    no_padding_side = shutil.copytree(conversion, root / "no_padding_side" / "siglip2")
    _edit_json(no_padding_side / "tokenizer_config.json", lambda d: d.pop("padding_side"))
    bos = shutil.copytree(conversion, root / "bos_post_processor" / "siglip2")
    _edit_json(bos / "tokenizer.json", lambda d: d.update(post_processor=BOS_POST_PROCESSOR))
    return {"conversion": conversion, "no_padding_side": no_padding_side, "bos_post_processor": bos}


def hand_laid(folder: Path, text: str, n: int = 64) -> list[int]:
    """The trained layout from the raw tokenizer's pieces: pieces (at most n - 1), EOS, then pad to n."""
    pieces = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(canonicalize(text), add_special_tokens=False).ids
    body = pieces[:n - 1] + [EOS]
    return body + [PAD] * (n - len(body))


def reference(folder: Path, texts: list[str]) -> np.ndarray:
    """Embeddings straight from the model on hand-laid ids, L2-normalised."""
    model = SiglipModel.from_pretrained(folder).eval()
    ids = torch.tensor([hand_laid(folder, t) for t in texts])
    with torch.inference_mode():
        out = model.get_text_features(input_ids=ids)
    v = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)  # type: ignore[no-any-return]


# --- text cleaning ---

@pytest.mark.parametrize("raw, clean", [
    ("a_red__circle", "a red circle"),  # underscores are spaces, not dropped
    ("snake_case_words", "snake case words"),
    ("Tom &amp; Jerry", "tom jerry"),  # HTML unescaped, then the '&' is punctuation
    ("caf&eacute; &lt;3", "café 3"),
    ("&amp;lt;b&amp;gt;bold", "bbold"),  # unescaped twice, as open_clip does
    ("Hello, World!! (really?)", "hello world really"),
    ("ÉCOLE Straße", "école straße"),
    ("  many\t\n  spaces\u00a0here  ", "many spaces here"),
    ("cafe\u0301", "café"),  # composed (NFC)
])
def test_canonicalize_matches_open_clip(raw: str, clean: str) -> None:
    assert canonicalize(raw) == clean


# --- the three ways a SigLIP 2 tokenizer is found ---

def test_conversion_script_layout_is_the_trained_one(variants) -> None:  # type: ignore[no-untyped-def]
    folder = variants["conversion"]
    enc = TorchSiglip(str(folder))
    assert [list(r) for r in enc.text_inputs(TEXTS)] == [hand_laid(folder, t) for t in TEXTS]
    ids = enc.text_inputs([LONG_TEXT])[0]
    assert ids[-1] == EOS and PAD not in ids  # truncated, EOS kept at the pooled position
    assert any(int(i) >= 5 and enc.tokenizer.convert_ids_to_tokens(int(i)).startswith("<0x")
               for i in enc.text_inputs(["caf\u00e9 \u2615"])[0])  # byte fallback, no <unk>
    np.testing.assert_allclose(enc.encode_text(TEXTS), reference(folder, TEXTS), atol=1e-6)


def test_missing_padding_side_is_forced_right(variants) -> None:  # type: ignore[no-untyped-def]
    folder = variants["no_padding_side"]
    plain = AutoTokenizer.from_pretrained(folder)  # what the files alone give: padding on the left
    left = plain(["a photo"], padding="max_length", max_length=64)["input_ids"][0]
    assert left[0] == PAD and left[-1] == EOS
    enc = TorchSiglip(str(folder))
    assert [list(r) for r in enc.text_inputs(TEXTS)] == [hand_laid(folder, t) for t in TEXTS]
    np.testing.assert_allclose(enc.encode_text(TEXTS), reference(variants["conversion"], TEXTS), atol=1e-6)


def test_bos_post_processor_is_refused_naming_the_file(variants) -> None:  # type: ignore[no-untyped-def]
    folder = variants["bos_post_processor"]
    plain = AutoTokenizer.from_pretrained(folder)("a photo")["input_ids"]
    assert plain[0] == BOS and EOS not in plain  # the files give BOS and no EOS (add_eos_token is ignored)
    with pytest.raises(TokenizerLayoutError) as err:
        TorchSiglip(str(folder))
    msg = str(err.value)
    assert "tokenizer.json" in msg and "post_processor" in msg and str(folder) in msg and "BOS" in msg


def test_onnx_export_gives_the_same_embeddings(variants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engines.export import build_onnx
    from engines.ort import OrtSiglip

    folder = variants["conversion"]
    build_onnx(str(folder), str(folder), tmp_path, components=("siglip_text",))
    ort = OrtSiglip(str(folder), tmp_path, components=("siglip_text",))
    np.testing.assert_allclose(ort.encode_text(TEXTS), reference(folder, TEXTS), atol=1e-5)


# --- versions ---

def test_version_hashes_tokenizer_and_preprocessor_files(variants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = variants["conversion"]
    same = shutil.copytree(base, tmp_path / "same" / "siglip2")
    assert version_of(same) == version_of(base)
    # the three variants share weights and config; only a tokenizer file differs
    versions = {version_of(p) for p in variants.values()}
    assert len(versions) == 3
    pre = shutil.copytree(base, tmp_path / "pre" / "siglip2")
    _edit_json(pre / "preprocessor_config.json", lambda d: d.update(size={"height": 48, "width": 48}))
    assert version_of(pre) != version_of(base)


# --- loading ---

def _pickled_copy(src: Path, dst: Path) -> Path:
    """The folder with its weights as pytorch_model.bin only, as older hub repos have them."""
    shutil.copytree(src, dst)
    model = SiglipModel.from_pretrained(src)
    (dst / "model.safetensors").unlink()
    torch.save(model.state_dict(), dst / "pytorch_model.bin")
    return dst


def test_pickled_weights_load_when_there_are_no_safetensors(variants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = _pickled_copy(variants["conversion"], tmp_path / "bin" / "siglip2")
    enc = TorchSiglip(str(folder))
    np.testing.assert_allclose(enc.encode_text(TEXTS), reference(variants["conversion"], TEXTS), atol=1e-6)
    assert version_of(folder).split("-")[-1] != version_of(variants["conversion"]).split("-")[-1]


def _hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """The Hugging Face cache's layout for one repo at one commit: refs/main names the snapshot."""
    base = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)


def test_offline_mode_loads_from_the_hub_cache(variants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/siglip2-tiny", variants["conversion"])
    _hub_cache(cache, "acme/siglip2-pickled", _pickled_copy(variants["conversion"], tmp_path / "bin" / "siglip2"))
    code = (
        "import json, sys\n"
        "from engines.siglip import TorchSiglip\n"
        "from pipeline.errors import ModelLoadError\n"
        "out = {r: TorchSiglip(r).encode_text(json.loads(sys.argv[1])).tolist()\n"
        "       for r in ('acme/siglip2-tiny', 'acme/siglip2-pickled')}\n"
        "try:\n"
        "    TorchSiglip('acme/not-cached')\n"
        "except ModelLoadError as exc:\n"
        "    out['error'] = exc.message\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    ref = reference(variants["conversion"], TEXTS)
    np.testing.assert_allclose(np.array(out["acme/siglip2-tiny"]), ref, atol=1e-6)
    np.testing.assert_allclose(np.array(out["acme/siglip2-pickled"]), ref, atol=1e-6)
    assert "acme/not-cached" in out["error"] and "HF_HUB_OFFLINE" in out["error"]


@pytest.fixture(scope="module")
def siglip_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SigLIP (v1): a SentencePiece model (spiece.model), trained here, whose pad and EOS are both </s> (id 1)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import SiglipTokenizer  # type: ignore[attr-defined]

    from engines.tiny import _WORDS

    words = sorted(set(_WORDS.split()))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(words[i:i + 6]) for i in range(len(words))] * 3), model_writer=buf,
        vocab_size=120, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
    folder = tmp_path_factory.mktemp("v1") / "siglip-v1"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=64)
    tokenizer.save_pretrained(folder)
    _tiny_siglip(len(tokenizer), 1, 1).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_siglip_v1_sentencepiece_tokenizer_loads(siglip_v1, tmp_path) -> None:  # type: ignore[no-untyped-def]
    enc = TorchSiglip(str(siglip_v1))
    ids = enc.text_inputs(["a red circle"])[0]
    n = int(np.flatnonzero(ids == 1)[0])
    assert n > 0 and (ids[n:] == 1).all()  # pieces, then </s> as EOS and as padding
    v = enc.encode_text(["a red circle", "two blue squares"])
    assert v.shape == (2, 32) and not np.allclose(v[0], v[1])
    assert version_of(siglip_v1) != version_of(_touch_copy(siglip_v1, tmp_path / "v1b"))


def test_siglip_v1_without_sentencepiece_says_what_to_install(siglip_v1) -> None:  # type: ignore[no-untyped-def]
    code = ("import sys\n"
            "sys.modules['sentencepiece'] = None  # as if it were not installed\n"
            "from engines.siglip import TorchSiglip\n"
            "from pipeline.errors import ModelLoadError\n"
            "try:\n"
            "    TorchSiglip(sys.argv[1])\n"
            "except ModelLoadError as exc:\n"
            "    print(exc.message)\n")
    res = subprocess.run([sys.executable, "-c", code, str(siglip_v1)], capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parents[2])
    assert "needs the sentencepiece package" in res.stdout and "imgsearch[worker]" in res.stdout, res.stderr[-2000:]


def _touch_copy(folder: Path, dst: Path) -> Path:
    """A copy with one SentencePiece byte changed: the version must see the tokenizer model."""
    out = shutil.copytree(folder, dst / folder.name)
    data = bytearray((out / "spiece.model").read_bytes())
    data[-1] ^= 1
    (out / "spiece.model").write_bytes(bytes(data))
    return out


# --- imgsearch models check ---

def test_models_check_passes_on_a_good_folder_and_fails_on_a_bad_one(variants) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cli.main import cli

    runner = CliRunner()
    good = runner.invoke(cli, ["models", "check", str(variants["conversion"])])
    assert good.exit_code == 0, good.output
    for what in ("tokenizer", "<eos>=1", "<pad>=0", "padded on the right to 64", "up to 63 text tokens",
                 version_of(variants["conversion"]), "parameters", "memory", "all checks passed",
                 "engines: torch fp32 (set explicitly)"):  # what a worker here runs (tests pin torch fp32)
        assert what in good.output, what
    bad = runner.invoke(cli, ["models", "check", str(variants["bos_post_processor"])])
    assert bad.exit_code == 1, bad.output
    assert "FAIL tokenizer" in bad.output and "tokenizer.json" in bad.output
    missing = runner.invoke(cli, ["models", "check", str(variants["conversion"] / "nope")])
    assert missing.exit_code == 1 and "FAIL" in missing.output


def test_worker_refuses_to_start_on_a_bad_tokenizer(variants) -> None:  # type: ignore[no-untyped-def]
    """Before it connects anywhere: the command exits with the message, rather than start without engines."""
    from engines.kit import KIT_DIR

    env = {**os.environ, "IMGSEARCH_SIGLIP_MODEL": str(variants["bos_post_processor"]),
           "IMGSEARCH_BLIP_MODEL": str(KIT_DIR / "blip"), "REDIS_URL": "redis://127.0.0.1:1/0"}
    res = subprocess.run([sys.executable, "-m", "cli.main", "worker"], capture_output=True, text=True, env=env,
                         timeout=240, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "tokenizer.json" in res.stderr and "post_processor" in res.stderr
