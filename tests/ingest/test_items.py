"""The item stages on their own (deterministic stand-in engines, the real local stores and SQLite ledger), and the
typed values that cross a boundary: model versions, ledger rows, the fan-out's queue message, each as the text or
row it was before they were typed."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline import features as featcodec
from pipeline.errors import InvalidRequest
from pipeline.ingest.fanout import BatchTask
from pipeline.ingest.items import Embedders, Item, ItemStages
from pipeline.ingest.ledger import CLAIMED, DUPLICATE, FAILED, INGESTED, Ledger, LedgerRow
from pipeline.ingest.report import IngestReport
from pipeline.ingest.sources import Post
from pipeline.layout import feature_key, post_key
from pipeline.settings import IngestSettings
from pipeline.stores import make_blob_store, make_vector_store
from pipeline.versions import ModelVersions
from standins.reddit import picture

pytestmark = pytest.mark.ingest


class Pixels:
    """A stand-in SigLIP image tower: the picture's mean colour, normalised; it refuses pictures of one width."""

    version, dim = "img-v1", 3

    def __init__(self, refuse_width: int = -1) -> None:
        self.refuse_width = refuse_width

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if any(im.width == self.refuse_width for im in images):
            raise RuntimeError("this engine refuses that picture")
        v = np.stack([np.asarray(im.convert("RGB"), np.float32).mean(axis=(0, 1)) + 1 for im in images])
        return v / np.linalg.norm(v, axis=1, keepdims=True)


class Features:
    """A stand-in BLIP vision tower: four numbers per picture."""

    version = "rr-v1"

    def vision_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([np.full((2, 2), im.width, np.float16) for im in images])


@pytest.fixture
def folder_run(tmp_path: Path) -> Iterator[tuple[IngestSettings, Ledger, list[Post]]]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    posts = []
    for i in range(5):
        f = folder / f"it{i}.jpg"
        f.write_bytes(picture(700 + i, size=(160 + i, 120)))
        posts.append(Post(id=f"it{i}", url=str(f), title=f"t{i}", file=f))
    ledger = Ledger(tmp_path / "ledger")
    yield IngestSettings(data_dir=tmp_path / "data", ingest_batch_size=2), ledger, posts
    ledger.close()


def stages(s: IngestSettings, ledger: Ledger, models: Embedders, **kw: Any) -> ItemStages:
    return ItemStages(s, models, make_vector_store(s), make_blob_store(s), ledger, source="folder", run_id="r1",
                      report=IngestReport(run_id="r1"), **kw)


def test_items_go_through_every_stage_and_are_settled_once_written(folder_run) -> None:  # type: ignore[no-untyped-def]
    s, ledger, posts = folder_run
    heard: list[str] = []
    posts[4].file.write_bytes(b"not a picture")  # type: ignore[union-attr]
    with stages(s, ledger, Embedders(Pixels(), Features()),
                on_settled=lambda items: heard.extend(i.post.id for i in items)) as st:
        st.run([Item(p) for p in posts])
    assert (st.report.downloaded, st.report.ingested) == (4, 4)
    assert sorted(heard) == [f"it{i}" for i in range(5)]  # each once, the failure too
    assert [(ledger.status(p.id) or {}).get("status") for p in posts] == [INGESTED] * 4 + [FAILED]
    assert ledger.versions_of("it0") == ModelVersions("img-v1", "rr-v1")
    blobs, vectors = make_blob_store(s), make_vector_store(s)
    assert json.loads(blobs.get(post_key("it1")))["models"] == "img-v1|rr-v1"
    assert featcodec.decode(blobs.get(feature_key("rr-v1", "it1"))).shape == (2, 2)
    assert vectors.fetch(["it2"])["it2"][1]["model_version"] == "img-v1"


def test_a_near_duplicate_is_settled_as_one_and_never_embedded(folder_run) -> None:  # type: ignore[no-untyped-def]
    s, ledger, posts = folder_run
    posts[1].file.write_bytes(posts[0].file.read_bytes())  # type: ignore[union-attr]
    with stages(s, ledger, Embedders(Pixels(), Features())) as st:
        st.run([Item(p) for p in posts[:3]])
    assert (st.report.ingested, st.report.duplicates) == (2, 1)
    row = ledger.status("it1") or {}
    assert row["status"] == DUPLICATE and "near-duplicate of it0" in row["reason"] and row["permanent"]
    assert set(make_vector_store(s).fetch(["it0", "it1", "it2"])) == {"it0", "it2"}


def test_an_item_that_breaks_its_batch_fails_alone(folder_run) -> None:  # type: ignore[no-untyped-def]
    s, ledger, posts = folder_run
    with stages(s, ledger, Embedders(Pixels(refuse_width=161), Features())) as st:
        st.run([Item(p) for p in posts[:3]])
    assert st.report.ingested == 2
    row = ledger.status("it1") or {}
    assert row["status"] == FAILED and "embedding failed" in row["reason"]


def test_under_a_claim_only_what_the_claim_holds_is_settled(folder_run) -> None:  # type: ignore[no-untyped-def]
    s, ledger, posts = folder_run
    ledger.plan("r1", "folder", [(p.id, "{}") for p in posts[:2]])
    token, claimed = ledger.claim("r1", ["it0", "it1"], ttl=60, max_tries=3)
    assert set(claimed) == {"it0", "it1"}
    with stages(s, ledger, Embedders(Pixels(), Features()), claim="another") as st:
        st.run([Item(posts[0])])
    assert (ledger.status("it0") or {})["status"] == CLAIMED  # written, but the marks of a claim it lost are refused
    with stages(s, ledger, Embedders(Pixels(), Features()), claim=token) as st:
        st.run([Item(posts[1])])
    assert (ledger.status("it1") or {})["status"] == INGESTED


def test_every_embed_stream_must_run_the_same_models() -> None:
    other = Features()
    other.version = "rr-v2"
    with pytest.raises(ValueError, match="same models"):
        Embedders(Pixels(), Features(), [(Pixels(), Features()), (Pixels(), other)])
    assert Embedders(Pixels(), Features()).versions == ModelVersions("img-v1", "rr-v1")


@pytest.mark.parametrize("text", ["img-v1|rr-v1", "google/siglip2@abc|Salesforce/blip:fp16", "a|b|c", "|"])
def test_model_versions_read_back_as_the_text_they_were_written_as(text: str) -> None:
    versions = ModelVersions.parse(text)
    assert versions is not None and str(versions) == text
    assert ModelVersions.parse(str(versions)) == versions


def test_text_naming_no_models_reads_as_none() -> None:
    assert ModelVersions.parse("") is None  # a takedown's row
    assert ModelVersions.parse("v1") is None


def test_a_ledger_row_reads_back_as_written(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    h = bytes(range(32))
    assert ledger.record([LedgerRow("r0", "reddit", FAILED, "http 500", False, h), LedgerRow("r1", "reddit", INGESTED)],
                         "a|b", "run1") == ["r0", "r1"]
    assert ledger.status("r0") == {"status": FAILED, "reason": "http 500", "permanent": False, "attempts": 1,
                                   "run_id": "run1", "claims": 0}
    assert ledger.versions_of("r1") == ModelVersions("a", "b")
    ledger.close()


def test_a_batch_message_is_the_json_it_was_before_it_was_typed() -> None:
    task = BatchTask("0123456789ab", "folder", ["p1", "p2"], ModelVersions("img", "rr"), "/data/imgs")
    payload = task.payload()
    # the queue's wire format: these keys, in this order, versions as text (what older workers read)
    assert json.dumps(payload) == ('{"run_id": "0123456789ab", "source": "folder", "ids": ["p1", "p2"], '
                                   '"versions": "img|rr", "folder": "/data/imgs"}')
    assert BatchTask.from_payload(json.loads(json.dumps(payload))) == task
    with pytest.raises(InvalidRequest, match="names no models"):
        BatchTask.from_payload({**payload, "versions": "img"})
