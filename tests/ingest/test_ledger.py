"""The ledger's contract on both backends: SQLite in a folder and a real PostgreSQL server started by the
tests. The run lease (one run at a time across hosts), claims (no item ends twice), the shared near-duplicate
index, and the refusals that keep a takedown final."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cli import stack
from pipeline.errors import Unavailable
from pipeline.ingest.ledger import CLAIMED, FAILED, INGESTED, PLANNED, TAKEN_DOWN, Ledger, LedgerRow

pytestmark = pytest.mark.ingest


@pytest.fixture(params=["sqlite", "postgres"])
def where(request, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield str(tmp_path)
    else:
        yield request.getfixturevalue("postgres_server").database(f"ledger_{uuid.uuid4().hex[:8]}")


def _hash(seed: int, flip: int = 0) -> bytes:
    words = np.random.default_rng(seed).integers(0, 2**63, 4, dtype=np.uint64)
    words[0] ^= np.uint64((1 << flip) - 1)  # ``flip`` low bits differ
    return words.tobytes()


def test_one_run_holds_the_lease_until_it_lets_go_or_it_expires(where: str) -> None:
    a, b = Ledger(where, lease_ttl=1.5), Ledger(where, lease_ttl=1.5)
    a.lock()
    with pytest.raises(Unavailable) as err:
        b.lock()
    assert err.value.code == "ingest_running"
    a.unlock()
    b.lock()  # released: taken at once
    b._lease._stop.set()  # type: ignore[union-attr]  # b's renewals stop, as a host that froze
    stack.wait_for(lambda: _takes(a), 10, "the unrenewed lease to expire")
    assert not b.renew() and b.lease_lost()  # the frozen holder, back, learns it lost the lease
    with pytest.raises(Unavailable):
        b.hold()  # and a run stops at its next checkpoint
    a.close()
    b.close()


def _takes(ledger: Ledger) -> bool:
    try:
        ledger.lock()
        return True
    except Unavailable:
        return False


def test_a_renewed_lease_outlives_its_time(where: str) -> None:
    a, b = Ledger(where, lease_ttl=0.6), Ledger(where, lease_ttl=0.6)
    a.lock()
    deadline = stack.time.monotonic() + 1.8  # three lease times: renewals keep it
    while stack.time.monotonic() < deadline:
        assert not _takes(b)
    assert not a.lease_lost()
    a.close()
    b.close()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(where: str) -> None:
    """A run killed on one box: its successor does not wait out the lease (the holder's pid is gone)."""
    code = ("import sys; from pipeline.ingest.ledger import Ledger; "
            "l = Ledger(sys.argv[1], lease_ttl=600); l.lock(); print('held', flush=True)")
    out = subprocess.run([sys.executable, "-c", code, where], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True)
    assert "held" in out.stdout  # it exited holding a 10-minute lease
    b = Ledger(where)
    b.lock()
    b.close()


def test_claims_let_one_worker_end_an_item(where: str) -> None:
    ledger = Ledger(where)
    ledger.plan("r1", "folder", [("p1", '{"id": "p1"}'), ("p2", '{"id": "p2"}')])
    slow, got = ledger.claim("r1", ["p1", "p2"], ttl=0.2, max_tries=3)
    assert set(got) == {"p1", "p2"} and got["p1"] == '{"id": "p1"}'
    assert ledger.claim("r1", ["p1", "p2"], ttl=60, max_tries=3)[1] == {}  # held
    stack.wait_for(lambda: all(o["expired"] for o in ledger.outstanding("r1")), 5, "the claims to expire")
    fast, got = ledger.claim("r1", ["p1", "p2"], ttl=60, max_tries=3)
    assert set(got) == {"p1", "p2"}
    rows = [LedgerRow("p1", "folder", INGESTED, "", False, None), LedgerRow("p2", "folder", INGESTED, "", False, None)]
    assert ledger.record(rows, "v", "r1", claim=slow) == []  # the slow worker's marks are refused
    assert ledger.record(rows[:1], "v", "r1", claim=fast) == ["p1"]
    assert ledger.record(rows[:1], "v", "r1", claim=fast) == []  # and it ends once
    ledger.release(fast, ["p2"], "store down")
    assert [(o["id"], o["status"], o["reason"]) for o in ledger.outstanding("r1")] == [("p2", PLANNED, "store down")]
    assert ledger.counts("r1") == {INGESTED: 1, PLANNED: 1}
    ledger.close()


def test_an_item_out_of_claims_fails_with_the_last_reason(where: str) -> None:
    ledger = Ledger(where)
    ledger.plan("r1", "folder", [("p1", "{}")])
    for _ in range(2):
        token, got = ledger.claim("r1", ["p1"], ttl=60, max_tries=2)
        assert got
        ledger.release(token, ["p1"], "decoder crashed")
    assert ledger.claim("r1", ["p1"], ttl=60, max_tries=2)[1] == {}  # out of claims
    ledger.give_up("r1", "folder", ["p1"], max_tries=2)
    st = ledger.status("p1") or {}
    assert st["status"] == FAILED and st["reason"] == "gave up after 2 claims: decoder crashed"
    assert ledger.settled(["p1"], "v", max_attempts=3) == {}  # transient: a later run tries it again
    ledger.close()


def test_a_takedown_is_never_planned_again(where: str) -> None:
    ledger = Ledger(where)
    ledger.record([LedgerRow("gone", "admin", TAKEN_DOWN, "taken down", True, None)], "", "takedown")
    ledger.plan("r2", "folder", [("gone", "{}")])
    assert (ledger.status("gone") or {})["status"] == TAKEN_DOWN
    ledger.plan("r2", "folder", [("p3", "{}")])
    token, _ = ledger.claim("r2", ["p3"], ttl=60, max_tries=3)
    ledger.plan("r3", "folder", [("p3", "{}")])  # a second plan never takes a held item from its worker
    assert ledger.outstanding("r2")[0]["status"] == CLAIMED
    ledger.close()


def test_the_near_duplicate_index_is_one_for_every_host(where: str) -> None:
    a, b = Ledger(where), Ledger(where)
    assert a.near_duplicates([("x1", _hash(1))], max_distance=10) == {}
    assert b.near_duplicates([("x2", _hash(1, flip=3)), ("x3", _hash(2))], max_distance=10) == {"x2": ("x1", 3)}
    assert a.near_duplicates([("x4", _hash(2, flip=1))], max_distance=10) == {"x4": ("x3", 1)}  # seen b's
    assert a.near_duplicates([("x1", _hash(1))], max_distance=10) == {}  # an item is no duplicate of itself
    assert a.hashes()[0] == ["x1", "x3"]
    a.close()
    b.close()


def test_fanout_needs_a_shared_vector_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.settings import Settings

    with pytest.raises(ValueError, match="IMGSEARCH_INGEST_FANOUT needs a vector store every worker shares"):
        Settings(data_dir=tmp_path, ingest_fanout=True)
    assert Settings(data_dir=tmp_path, ingest_fanout=True, vector_store="pinecone").ingest_fanout


def test_a_planned_post_goes_through_the_ledger_whole_and_a_bad_one_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.errors import InvalidRequest
    from pipeline.ingest.fanout import post_from_json, post_json
    from pipeline.ingest.sources import Post
    from pipeline.settings import IngestSettings

    s = IngestSettings(data_dir=tmp_path, ingest_folder=tmp_path)
    post = Post(id="abc12", url=str(tmp_path / "a.jpg"), title="t", score=3, extra={"k": "v"}, file=tmp_path / "a.jpg")
    assert post_from_json(post_json(post), s, "folder") == post
    # the batch's folder (the coordinator's task names it) where the worker has none configured
    assert post_from_json(post_json(post), IngestSettings(data_dir=tmp_path), "folder", str(tmp_path)) == post
    with pytest.raises(InvalidRequest):
        post_from_json('{"id": "../../etc/passwd", "url": "x"}', s, "folder")  # an id names keys and rows: checked again
    # the ledger is shared input: a post read back is checked as a fresh one from its source would be
    reddit = Post(id="abc13", url="https://i.redd.it/a.jpg")
    assert post_from_json(post_json(reddit), s, "reddit") == reddit
    for source, bad in (("reddit", Post(id="abc14", url="https://i.redd.it/a.jpg", file=tmp_path / "a.jpg")),
                        ("folder", Post(id="abc15", url="/etc/x.jpg", file=Path("/etc/x.jpg"))),
                        ("folder", Post(id="abc16", url="x", file=tmp_path / ".." / "a.jpg")),
                        ("folder", Post(id="abc17", url="x", file=tmp_path / "a.txt")),
                        ("reddit", Post(id="abc18", url="http://i.redd.it:6379/a.jpg")),
                        ("reddit", Post(id="abc19", url="https://evil.example/a.jpg"))):
        with pytest.raises(InvalidRequest, match="refused"):
            post_from_json(post_json(bad), s, source)
