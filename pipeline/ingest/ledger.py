"""The ingest ledger: what happened to every post id (ingested, duplicate, failed and why, taken down), each
run and its checkpoint. SQLite in the data dir; one run at a time (a file lock).

Idempotent by construction: an id is marked ingested only after its vector is upserted (the last write), so a
run killed at any point leaves ids that are either done (skipped next time) or not marked (redone next time,
and every write of an item is a put or upsert by id: redoing one duplicates nothing)."""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import Unavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    permanent INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, phash BLOB,
    versions TEXT NOT NULL DEFAULT '', run_id TEXT NOT NULL DEFAULT '', updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_status ON items (status);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, started REAL NOT NULL, finished REAL, cursor TEXT,
    report TEXT);
"""

INGESTED, DUPLICATE, FAILED, REJECTED, TAKEN_DOWN = "ingested", "duplicate", "failed", "rejected", "taken_down"


class Ledger:
    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder / "ledger.sqlite3", isolation_level=None, check_same_thread=False,
                                  timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self._lock_fh: Any = None

    # --- one run at a time ---
    def lock(self) -> None:
        fh = open(self.folder / "run.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise Unavailable(f"another ingest run holds {self.folder / 'run.lock'}; try again when it ends",
                              code="ingest_running") from None
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing releases the lock (a killed process releases it too)
            self._lock_fh = None

    # --- runs and checkpoints ---
    def open_run(self, source: str, fresh: bool = False) -> tuple[str, dict[str, Any] | None]:
        """The unfinished run of this source to resume (its id and checkpoint), or a new one."""
        row = self.db.execute("SELECT id, cursor FROM runs WHERE source=? AND finished IS NULL ORDER BY started DESC",
                              (source,)).fetchone()
        if row and not fresh:
            return row[0], json.loads(row[1]) if row[1] else None
        self.db.execute("UPDATE runs SET finished=?, report='{\"abandoned\": true}' WHERE source=? AND finished IS NULL",
                        (time.time(), source))
        run_id = uuid.uuid4().hex[:12]
        self.db.execute("INSERT INTO runs (id, source, started) VALUES (?, ?, ?)", (run_id, source, time.time()))
        return run_id, None

    def checkpoint(self, run_id: str, cursor: dict[str, Any]) -> None:
        self.db.execute("UPDATE runs SET cursor=? WHERE id=?", (json.dumps(cursor), run_id))

    def finish(self, run_id: str, report: dict[str, Any]) -> None:
        self.db.execute("UPDATE runs SET finished=?, report=? WHERE id=?", (time.time(), json.dumps(report), run_id))

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT id, source, started, finished, cursor, report FROM runs ORDER BY started")
        return [{"id": r[0], "source": r[1], "started": r[2], "finished": r[3],
                 "cursor": json.loads(r[4]) if r[4] else None, "report": json.loads(r[5]) if r[5] else None}
                for r in rows]

    # --- items ---
    def settled(self, ids: Sequence[str], versions: str, max_attempts: int) -> dict[str, str]:
        """Of ``ids``, those a run skips, with their status: ingested by these models, duplicates, taken down,
        rejected, and failures that are permanent or out of attempts. Anything else is (re)done."""
        out: dict[str, str] = {}
        for i in range(0, len(ids), 900):
            chunk = list(ids[i:i + 900])
            for pid, status, permanent, attempts, ver in self.db.execute(
                    f"SELECT id, status, permanent, attempts, versions FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk):
                if status == INGESTED and ver != versions:
                    continue  # another model made it: embed again
                if status == FAILED and not permanent and attempts < max_attempts:
                    continue
                out[pid] = status
        return out

    def record(self, rows: Iterable[tuple[str, str, str, str, bool, bytes | None]], versions: str, run_id: str) -> None:
        """(id, source, status, reason, permanent, phash) rows, in one transaction; failures count attempts."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for pid, source, status, reason, permanent, phash in rows:
                self.db.execute(
                    "INSERT INTO items (id, source, status, reason, permanent, attempts, phash, versions, run_id, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status=excluded.status,"
                    " reason=excluded.reason, permanent=excluded.permanent, phash=excluded.phash,"
                    " versions=excluded.versions, run_id=excluded.run_id, updated=excluded.updated,"
                    " attempts=CASE WHEN excluded.status='failed' THEN items.attempts + 1 ELSE items.attempts END"
                    # a takedown is final; a post that is gone from a listing now stays as ingested (a takedown
                    # removes it, not a listing)
                    " WHERE (items.status != 'taken_down' OR excluded.status = 'taken_down')"
                    " AND NOT (items.status = 'ingested' AND excluded.status = 'rejected')",
                    (pid, source, status, reason, int(permanent), int(status == FAILED),
                     phash, versions, run_id, now))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def status(self, pid: str) -> dict[str, Any] | None:
        r = self.db.execute("SELECT status, reason, permanent, attempts, run_id FROM items WHERE id=?", (pid,)).fetchone()
        return None if r is None else {"status": r[0], "reason": r[1], "permanent": bool(r[2]), "attempts": r[3],
                                       "run_id": r[4]}

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, count(*) FROM items GROUP BY status").fetchall())

    def failures(self, run_id: str | None = None) -> dict[str, str]:
        sql, args = "SELECT id, reason FROM items WHERE status='failed'", ()  # type: tuple[str, tuple[str, ...]]
        if run_id:
            sql, args = sql + " AND run_id=?", (run_id,)
        return dict(self.db.execute(sql, args).fetchall())

    def hashes(self) -> tuple[list[str], NDArray[np.uint64]]:
        """The perceptual hashes of ingested posts: ids, and one row of four uint64 words per id."""
        rows = self.db.execute("SELECT id, phash FROM items WHERE status='ingested' AND length(phash)=32").fetchall()
        words = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint64).reshape(len(rows), 4)
        return [r[0] for r in rows], words

    def close(self) -> None:
        self.unlock()
        self.db.close()


class HashIndex:
    """Near-duplicate lookup by Hamming distance over 256-bit hashes (a scan: ~10 ms at a million hashes)."""

    def __init__(self, ids: list[str], hashes: NDArray[np.uint64], max_distance: int) -> None:
        self.ids, self.max_distance = list(ids), max_distance
        self._buf = np.zeros((max(1024, 2 * len(ids)), 4), np.uint64)  # grows by doubling
        self._buf[:len(ids)] = hashes

    def match(self, h: bytes) -> tuple[str, int] | None:
        if not self.ids:
            return None
        q = np.frombuffer(h, dtype=np.uint64)
        dist = np.bitwise_count(self._buf[:len(self.ids)] ^ q).sum(axis=1)
        i = int(np.argmin(dist))
        return (self.ids[i], int(dist[i])) if dist[i] <= self.max_distance else None

    def add(self, pid: str, h: bytes) -> None:
        if len(self.ids) == len(self._buf):
            self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
        self._buf[len(self.ids)] = np.frombuffer(h, dtype=np.uint64)
        self.ids.append(pid)
