"""The ingest ledger: what happened to every post id (planned, claimed, ingested, duplicate, failed and why,
taken down), each run and its checkpoint, the lease that lets one run at a time, and the near-duplicate index.

Two backends behind one class: SQLite in the data dir (the default, one box) and PostgreSQL
(``IMGSEARCH_LEDGER_URL=postgresql://...``), which every host of a pool shares. Both speak the same SQL here
(``?`` placeholders, rewritten for psycopg), so nothing above this module knows which one it has.

Idempotent by construction: an id is marked ingested only after its vector is upserted (the last write), so a
run killed at any point leaves ids that are either done (skipped next time) or not marked (redone next time,
and every write of an item is a put or upsert by id: redoing one duplicates nothing). When ingest fans out, a
worker claims a batch's items first (a token and an expiry) and may mark only what it still holds: a worker
that died, or was too slow, loses its claim to the next and its late marks are refused, so no item ends twice.

Why hand-written SQL and not SQLAlchemy Core with Alembic (decided in issue 28): what differs between the two
dialects here is what Core would not hide. The placeholder rewrite and three column types are the part it would
take over (about ten lines); the rest stays per dialect under Core too: the exclusive transaction (``BEGIN
IMMEDIATE`` against an advisory lock), the ledger's clock, ``FOR UPDATE``, and the conditional upsert, which Core
spells with one ``insert`` construct per dialect or as ``text()``, that is, as SQL again. The schema has changed
once (four columns, added in place by ``_Db.migrate`` under the same lock every host takes); Alembic would add a
migrations folder, a version table and three packages (SQLAlchemy, Alembic, its Mako) to the worker image,
and every host would still need that lock to upgrade. Revisit when a change cannot be made by adding columns
(a rename, a type change, a backfill), or when a third database is wanted."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline import vendor
from pipeline.errors import Unavailable
from pipeline.versions import ModelVersions

INGESTED, DUPLICATE, FAILED, REJECTED, TAKEN_DOWN = "ingested", "duplicate", "failed", "rejected", "taken_down"
PLANNED, CLAIMED = "planned", "claimed"  # fanned out: waiting for a worker, held by one
OUTSTANDING = (PLANNED, CLAIMED)
RUN_LEASE = "ingest"

# {float}: REAL in SQLite (8 bytes); PostgreSQL's REAL is 4 bytes, too coarse for a timestamp
# {blob}: BLOB / BYTEA; {serial}: the near-duplicate index's insertion order
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    permanent INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, phash {blob},
    versions TEXT NOT NULL DEFAULT '', run_id TEXT NOT NULL DEFAULT '', updated {float} NOT NULL);
CREATE INDEX IF NOT EXISTS items_status ON items (status);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, started {float} NOT NULL, finished {float}, cursor TEXT,
    report TEXT);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires {float} NOT NULL);
CREATE TABLE IF NOT EXISTS phashes (seq {serial}, id TEXT NOT NULL UNIQUE, phash {blob} NOT NULL);
"""
# added by issue 20 (fan-out): a planned item's post, its claim and the claims it has had
_COLUMNS = {"post": "TEXT", "claim": "TEXT NOT NULL DEFAULT ''", "claim_expires": "{float}",
            "tries": "INTEGER NOT NULL DEFAULT 0"}
_DIALECTS = {"sqlite": {"float": "REAL", "blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
             "postgres": {"float": "DOUBLE PRECISION", "blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"}}
_DEDUP_LOCK = 0x1A6E5E4C  # PostgreSQL advisory lock: the near-duplicate index is checked and grown by one at a time



@dataclass(frozen=True)
class LedgerRow:
    """What happened to one post: written by ``Ledger.record`` (the run, the models and the time come with the
    call). ``phash`` is the image's 256-bit hash once it was downloaded, for the near-duplicate index."""

    id: str
    source: str
    status: str
    reason: str = ""
    permanent: bool = False
    phash: bytes | None = None


class _Db:
    """One connection (SQLite or psycopg) used from several threads: every statement and every transaction
    holds one lock, so a lease renewal never lands inside another thread's transaction."""

    def __init__(self, where: Path | str) -> None:
        self.lock = threading.RLock()
        self.depth = 0
        if isinstance(where, str) and where.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg
            except ImportError as exc:  # pragma: no cover - the extra is part of dev and the worker image
                raise RuntimeError(vendor.needs_extra("IMGSEARCH_LEDGER_URL is PostgreSQL and needs psycopg",
                                                      "postgres")) from exc
            self.kind = "postgres"
            self.conn: Any = psycopg.connect(where, autocommit=True, connect_timeout=10)
            self.where = "PostgreSQL"  # never the URL: it holds a password
        else:
            folder = Path(where)
            folder.mkdir(parents=True, exist_ok=True)
            self.kind = "sqlite"
            self.conn = sqlite3.connect(folder / "ledger.sqlite3", isolation_level=None, check_same_thread=False,
                                        timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a crashed process loses nothing committed
            self.where = str(folder / "ledger.sqlite3")

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.kind == "postgres" else text

    def execute(self, text: str, args: Sequence[Any] = ()) -> Any:
        with self.lock:
            return self.conn.execute(self.sql(text), tuple(args))

    def all(self, text: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.execute(text, args).fetchall())

    def one(self, text: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self.lock:
            row = self.execute(text, args).fetchone()
            return tuple(row) if row is not None else None

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = False) -> Iterator[None]:
        """One transaction; ``exclusive``: one at a time across every process that shares the ledger (SQLite
        takes the write lock at BEGIN; PostgreSQL an advisory lock held to the commit)."""
        with self.lock:
            if self.depth:  # nested: part of the outer one
                yield
                return
            self.depth += 1
            try:
                if self.kind == "postgres":
                    with self.conn.transaction():
                        if exclusive:
                            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DEDUP_LOCK,))
                        yield
                else:
                    self.conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield
                        self.conn.execute("COMMIT")
                    except BaseException:
                        self.conn.execute("ROLLBACK")
                        raise
            finally:
                self.depth -= 1

    def now(self) -> float:
        """The ledger's clock: hosts' clocks may differ, a lease's expiry must not."""
        if self.kind == "postgres":
            row = self.one("SELECT extract(epoch from clock_timestamp())::float8")
            return float(row[0]) if row else time.time()
        return time.time()

    def migrate(self) -> None:
        d = _DIALECTS[self.kind]
        with self.lock:
            if self.kind == "postgres":
                with self.conn.transaction():
                    self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DEDUP_LOCK,))  # one host creates
                    for stmt in _SCHEMA.format(**d).split(";"):
                        if stmt.strip():
                            self.conn.execute(stmt)
                    have = {r[0] for r in self.conn.execute(
                        "SELECT column_name FROM information_schema.columns WHERE table_name='items'").fetchall()}
                    self._add_columns(have, d)
            else:
                self.conn.executescript(_SCHEMA.format(**d))
                self._add_columns({r[1] for r in self.conn.execute("PRAGMA table_info(items)")}, d)

    def _add_columns(self, have: set[str], d: dict[str, str]) -> None:
        for name, decl in _COLUMNS.items():
            if name not in have:
                self.conn.execute(f"ALTER TABLE items ADD COLUMN {name} {decl.format(**d)}")

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class Lease:
    """A named lease in the ledger: held by one holder until it expires, renewed from a daemon thread every
    third of its time. A holder on this host whose process is gone is taken over at once (a killed run on one
    box need not wait out the lease); one on another host, once the lease expired."""

    def __init__(self, db: _Db, name: str, ttl: float, host: str) -> None:
        self.db, self.name, self.ttl, self.host = db, name, ttl, host
        self.holder = f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = threading.Event()  # set when a renewal found the lease taken or gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        with self.db.transaction(exclusive=True):
            self.db.execute("INSERT INTO leases (name, holder, expires) VALUES (?, '', 0) ON CONFLICT (name) DO NOTHING",
                            (self.name,))
            lock = " FOR UPDATE" if self.db.kind == "postgres" else ""
            row = self.db.one(f"SELECT holder, expires FROM leases WHERE name=?{lock}", (self.name,))
            now = self.db.now()
            if row and row[0] and row[1] > now and not _gone(row[0], self.host):
                raise Unavailable(f"another ingest run holds the ledger's lease ({row[0]}, {row[1] - now:.0f} s "
                                  "left); try again when it ends", code="ingest_running")
            self.db.execute("UPDATE leases SET holder=?, expires=? WHERE name=?", (self.holder, now + self.ttl, self.name))
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        try:
            n = self.db.execute("UPDATE leases SET expires=? WHERE name=? AND holder=?",
                                (self.db.now() + self.ttl, self.name, self.holder)).rowcount
        except Exception:  # noqa: BLE001 - the ledger away: the next renewal tries again before expiry
            return True
        if n == 0:
            self.lost.set()
        return n > 0

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.renew():
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with contextlib.suppress(Exception):
            self.db.execute("UPDATE leases SET holder='', expires=0 WHERE name=? AND holder=?", (self.name, self.holder))


def _gone(holder: str, here: str) -> bool:
    """Whether a lease holder ``host:pid:token`` is a process of this host (``here``) that no longer runs."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != here or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Ledger:
    def __init__(self, where: Path | str, *, lease_ttl: float = 30.0, host: str = "") -> None:
        """``where``: a folder (SQLite) or a ``postgresql://`` URL; ``host``: this host's name in the lease."""
        self._db = _Db(where)
        self._db.migrate()
        self.lease_ttl, self.host = lease_ttl, host or socket.gethostname()
        self._lease: Lease | None = None
        self._index: HashIndex | None = None
        self._index_seq = 0

    @classmethod
    def open(cls, settings: Any) -> Ledger:
        """The ledger the settings name: PostgreSQL at ``ledger_url``, else SQLite in ``ingest_dir``."""
        url = settings.ledger_url.get_secret_value() if settings.ledger_url else ""
        return cls(url or settings.ingest_dir, lease_ttl=settings.ingest_lease_ttl_s, host=settings.host)

    @property
    def shared(self) -> bool:
        return self._db.kind == "postgres"

    # --- one run at a time ---
    def lock(self) -> None:
        """Take the run lease, or raise Unavailable(ingest_running) while another live run holds it."""
        lease = Lease(self._db, RUN_LEASE, self.lease_ttl, self.host)
        lease.acquire()
        self._lease = lease

    def lease_lost(self) -> bool:
        """Whether a renewal found the run lease taken by another run (this one must stop)."""
        return self._lease is not None and self._lease.lost.is_set()

    def hold(self) -> None:
        """Raise Unavailable(ingest_running) if this run froze past its lease and another run took it."""
        if self.lease_lost():
            raise Unavailable("this ingest run lost the ledger's lease to another; it stops", code="ingest_running")

    def renew(self) -> bool:
        """Renew the run lease now (its thread does every third of its time); False once it is lost."""
        return self._lease is not None and self._lease.renew()

    def unlock(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    # --- runs and checkpoints ---
    def open_run(self, source: str, fresh: bool = False) -> tuple[str, dict[str, Any] | None]:
        """The unfinished run of this source to resume (its id and checkpoint), or a new one."""
        row = self._db.one("SELECT id, cursor FROM runs WHERE source=? AND finished IS NULL ORDER BY started DESC",
                           (source,))
        if row and not fresh:
            return row[0], json.loads(row[1]) if row[1] else None
        self._db.execute("UPDATE runs SET finished=?, report='{\"abandoned\": true}' WHERE source=? AND finished IS NULL",
                         (time.time(), source))
        run_id = uuid.uuid4().hex[:12]
        self._db.execute("INSERT INTO runs (id, source, started) VALUES (?, ?, ?)", (run_id, source, time.time()))
        return run_id, None

    def checkpoint(self, run_id: str, cursor: dict[str, Any]) -> None:
        self._db.execute("UPDATE runs SET cursor=? WHERE id=?", (json.dumps(cursor), run_id))

    def finish(self, run_id: str, report: dict[str, Any]) -> None:
        self._db.execute("UPDATE runs SET finished=?, report=? WHERE id=?", (time.time(), json.dumps(report), run_id))

    def runs(self) -> list[dict[str, Any]]:
        rows = self._db.all("SELECT id, source, started, finished, cursor, report FROM runs ORDER BY started")
        return [{"id": r[0], "source": r[1], "started": r[2], "finished": r[3],
                 "cursor": json.loads(r[4]) if r[4] else None, "report": json.loads(r[5]) if r[5] else None}
                for r in rows]

    # --- items ---
    def settled(self, ids: Sequence[str], versions: str, max_attempts: int,
                outstanding: bool = False) -> dict[str, str]:
        """Of ``ids``, those a run skips, with their status: ingested by these models, duplicates, taken down,
        rejected, and failures that are permanent or out of attempts; with ``outstanding``, also those planned
        or claimed (a fanned-out run hands them out from the ledger). Anything else is (re)done."""
        out: dict[str, str] = {}
        for i in range(0, len(ids), 900):
            chunk = list(ids[i:i + 900])
            for pid, status, permanent, attempts, ver in self._db.all(
                    f"SELECT id, status, permanent, attempts, versions FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk):
                if status == INGESTED and ver != versions:
                    continue  # another model made it: embed again
                if status == FAILED and not permanent and attempts < max_attempts:
                    continue
                if status in OUTSTANDING and not outstanding:
                    continue
                out[pid] = status
        return out

    def record(self, rows: Iterable[LedgerRow], versions: str, run_id: str, claim: str = "") -> list[str]:
        """Rows, in one transaction, made by ``versions`` (``str(ModelVersions)``, or '' for none); failures
        count attempts. With ``claim``, only items this claim still holds change. Returns the ids written."""
        now = time.time()
        written: list[str] = []
        with self._db.transaction():
            for row in rows:
                n = self._db.execute(
                    "INSERT INTO items (id, source, status, reason, permanent, attempts, phash, versions, run_id, updated,"
                    " claim) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status=excluded.status,"
                    " reason=excluded.reason, permanent=excluded.permanent, phash=excluded.phash,"
                    " versions=excluded.versions, updated=excluded.updated,"
                    # a claimed item stays its run's (a run that adopted it counts it), whoever settles it
                    " run_id=CASE WHEN excluded.claim = '' THEN excluded.run_id ELSE items.run_id END,"
                    " attempts=CASE WHEN excluded.status='failed' THEN items.attempts + 1 ELSE items.attempts END"
                    # a takedown is final; a post that is gone from a listing now stays as ingested (a takedown
                    # removes it, not a listing)
                    " WHERE (items.status != 'taken_down' OR excluded.status = 'taken_down')"
                    " AND NOT (items.status = 'ingested' AND excluded.status = 'rejected')"
                    # a claimed item is the claim holder's to settle (a late worker's marks are refused)
                    " AND (excluded.claim = '' OR (items.status = 'claimed' AND items.claim = excluded.claim))",
                    (row.id, row.source, row.status, row.reason, int(row.permanent), int(row.status == FAILED),
                     row.phash, versions, run_id, now, claim)).rowcount
                if n:
                    written.append(row.id)
        return written

    def status(self, pid: str) -> dict[str, Any] | None:
        r = self._db.one("SELECT status, reason, permanent, attempts, run_id, tries FROM items WHERE id=?", (pid,))
        return None if r is None else {"status": r[0], "reason": r[1], "permanent": bool(r[2]), "attempts": r[3],
                                       "run_id": r[4], "claims": r[5]}

    def versions_of(self, pid: str) -> ModelVersions | None:
        """The models that made ``pid``'s stored artifacts, or None (no row, or a row that names none)."""
        r = self._db.one("SELECT versions FROM items WHERE id=?", (pid,))
        return ModelVersions.parse(str(r[0])) if r else None

    def counts(self, run_id: str | None = None) -> dict[str, int]:
        if run_id:
            return dict(self._db.all("SELECT status, count(*) FROM items WHERE run_id=? GROUP BY status", (run_id,)))
        return dict(self._db.all("SELECT status, count(*) FROM items GROUP BY status"))

    def failures(self, run_id: str | None = None) -> dict[str, str]:
        sql, args = "SELECT id, reason FROM items WHERE status='failed'", ()  # type: tuple[str, tuple[str, ...]]
        if run_id:
            sql, args = sql + " AND run_id=?", (run_id,)
        return dict(self._db.all(sql, args))

    # --- fanned out: plan, claim, release ---
    def plan(self, run_id: str, source: str, posts: Sequence[tuple[str, str]]) -> None:
        """Items (id, the post as JSON) waiting for a worker, in one transaction. A takedown stays final."""
        now = time.time()
        with self._db.transaction():
            for pid, post in posts:
                self._db.execute(
                    "INSERT INTO items (id, source, status, run_id, updated, post, claim, tries)"
                    " VALUES (?, ?, 'planned', ?, ?, ?, '', 0) ON CONFLICT (id) DO UPDATE SET status='planned',"
                    " run_id=excluded.run_id, updated=excluded.updated, post=excluded.post, claim='', tries=0"
                    " WHERE items.status NOT IN ('taken_down', 'claimed')",
                    (pid, source, run_id, now, post))

    def adopt(self, run_id: str) -> int:
        """Outstanding items of any earlier run become this run's (a run abandoned with work planned)."""
        return int(self._db.execute("UPDATE items SET run_id=? WHERE status IN ('planned', 'claimed') AND run_id != ?",
                                    (run_id, run_id)).rowcount)

    def claim(self, run_id: str, ids: Sequence[str], ttl: float, max_tries: int) -> tuple[str, dict[str, str]]:
        """Claim those of ``ids`` that are planned, or claimed by a claim that expired, and have had fewer than
        ``max_tries`` claims: a fresh claim token, and the claimed ids with their posts (JSON)."""
        token = uuid.uuid4().hex
        if not ids:
            return token, {}
        now = self._db.now()
        marks = ",".join("?" * len(ids))
        with self._db.transaction():
            rows = self._db.all(
                f"UPDATE items SET status='claimed', claim=?, claim_expires=?, tries=tries + 1, updated=?"
                f" WHERE id IN ({marks}) AND run_id=? AND tries < ?"
                f" AND (status='planned' OR (status='claimed' AND claim_expires < ?)) RETURNING id, post",
                (token, now + ttl, time.time(), *ids, run_id, max_tries, now))
        return token, {r[0]: r[1] for r in rows}

    def release(self, token: str, ids: Sequence[str], reason: str) -> None:
        """Hand claimed items back (planned again), with why: the batch could not finish them."""
        if ids:
            self._db.execute(f"UPDATE items SET status='planned', claim='', reason=? WHERE claim=? AND status='claimed'"
                             f" AND id IN ({','.join('?' * len(ids))})", (reason, token, *ids))

    def outstanding(self, run_id: str) -> list[dict[str, Any]]:
        """The run's items not yet settled: id, status, whether a claim on it expired, its claims, the last
        reason a worker gave one back."""
        now = self._db.now()
        rows = self._db.all("SELECT id, status, claim_expires, tries, reason FROM items"
                            " WHERE run_id=? AND status IN ('planned', 'claimed') ORDER BY id", (run_id,))
        return [{"id": r[0], "status": r[1], "expired": r[1] == CLAIMED and (r[2] or 0) < now, "tries": r[3],
                 "reason": r[4]} for r in rows]

    def give_up(self, run_id: str, source: str, ids: Sequence[str], max_tries: int) -> None:
        """Items out of claims (planned after their last, or its claim expired): failed for this run, with the
        last reason a worker gave; a later run tries them again (a transient failure)."""
        now = self._db.now()
        with self._db.transaction():
            for pid in ids:
                self._db.execute(
                    "UPDATE items SET status='failed', permanent=0, attempts=attempts + 1, updated=?, reason=? ||"
                    " CASE WHEN reason = '' THEN 'no worker finished it' ELSE reason END"
                    " WHERE id=? AND run_id=? AND tries >= ?"
                    " AND (status='planned' OR (status='claimed' AND claim_expires < ?))",
                    (time.time(), f"gave up after {max_tries} claims: ", pid, run_id, max_tries, now))

    # --- the near-duplicate index, shared by every host ---
    def near_duplicates(self, items: Sequence[tuple[str, bytes]], max_distance: int) -> dict[str, tuple[str, int]]:
        """Check ``(id, 256-bit hash)`` items against every hash seen so far and add the new ones, atomically
        across hosts: two near-duplicates checked at once on two workers are never both new. Returns the
        near-duplicates: id -> (the id it resembles, bits that differ). An id already indexed is itself."""
        out: dict[str, tuple[str, int]] = {}
        with self._db.transaction(exclusive=True):
            index = self._refresh(max_distance)
            for pid, h in items:
                hit = index.match(h, exclude=pid)
                if hit is not None:
                    out[pid] = hit
                elif pid not in index:
                    self._db.execute("INSERT INTO phashes (id, phash) VALUES (?, ?) ON CONFLICT (id) DO NOTHING", (pid, h))
                    index.add(pid, h)
        return out

    def _refresh(self, max_distance: int) -> HashIndex:
        if self._index is None:
            self._index = HashIndex([], np.zeros((0, 4), np.uint64), max_distance)
            if self._db.one("SELECT 1 FROM phashes LIMIT 1") is None:  # a ledger from before the shared index
                self._db.execute("INSERT INTO phashes (id, phash) SELECT id, phash FROM items WHERE status='ingested'"
                                 " AND length(phash)=32 ORDER BY updated ON CONFLICT (id) DO NOTHING")
        self._index.max_distance = max_distance
        rows = self._db.all("SELECT seq, id, phash FROM phashes WHERE seq > ? ORDER BY seq", (self._index_seq,))
        for seq, pid, h in rows:
            self._index.add(pid, bytes(h))
            self._index_seq = max(self._index_seq, int(seq))
        return self._index

    def hashes(self) -> tuple[list[str], NDArray[np.uint64]]:
        """The near-duplicate index: ids, and one row of four uint64 words per id."""
        rows = self._db.all("SELECT id, phash FROM phashes ORDER BY seq")
        words = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.uint64).reshape(len(rows), 4)
        return [r[0] for r in rows], words

    def close(self) -> None:
        self.unlock()
        self._db.close()


class HashIndex:
    """Near-duplicate lookup by Hamming distance over 256-bit hashes (a scan: ~10 ms at a million hashes)."""

    def __init__(self, ids: list[str], hashes: NDArray[np.uint64], max_distance: int) -> None:
        self.ids, self.max_distance = list(ids), max_distance
        self._pos = {pid: i for i, pid in enumerate(self.ids)}
        self._buf = np.zeros((max(1024, 2 * len(ids)), 4), np.uint64)  # grows by doubling
        self._buf[:len(ids)] = hashes

    def __contains__(self, pid: str) -> bool:
        return pid in self._pos

    def match(self, h: bytes, exclude: str | None = None) -> tuple[str, int] | None:
        if not self.ids:
            return None
        q = np.frombuffer(h, dtype=np.uint64)
        dist = np.bitwise_count(self._buf[:len(self.ids)] ^ q).sum(axis=1)
        if exclude is not None and exclude in self._pos:
            dist[self._pos[exclude]] = 1 << 20  # an item is no duplicate of itself
        i = int(np.argmin(dist))
        return (self.ids[i], int(dist[i])) if dist[i] <= self.max_distance else None

    def add(self, pid: str, h: bytes) -> None:
        if pid in self._pos:
            return
        if len(self.ids) == len(self._buf):
            self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
        self._buf[len(self.ids)] = np.frombuffer(h, dtype=np.uint64)
        self._pos[pid] = len(self.ids)
        self.ids.append(pid)
