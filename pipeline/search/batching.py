"""Cross-query batching inside one worker process: the jobs a worker runs at once (its threads) hand their
model calls to one Batcher per model, which runs them together: one padded call for several queries.

A call waits for company only while other jobs are running on this worker and have not handed theirs in yet,
and at most ``wait_s``: a lone query goes straight through, and under load each model call carries several
queries. Why threads and a batcher rather than celery-batches: one Celery task stays one job, so
acknowledgement, redelivery and deadlines work per job as before, and the stages that wait on I/O (the
stores, Redis) overlap freely; only the model calls, which release the GIL, are gathered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
In = TypeVar("In")
Out = TypeVar("Out")


class Active:
    """How many jobs this process is running right now (what a batch may wait for)."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    @property
    def n(self) -> int:
        return self._n

    @contextmanager
    def job(self) -> Iterator[None]:
        with self._lock:
            self._n += 1
        try:
            yield
        finally:
            with self._lock:
                self._n -= 1


_STOP = None  # put by ``close``: the thread ends once the calls put before it are answered


class Batcher(Generic[In, Out]):
    def __init__(self, name: str, fn: Callable[[Sequence[In]], Sequence[Out]], *, max_items: int, wait_s: float,
                 active: Active | None = None) -> None:
        self.name, self.fn, self.max_items, self.wait_s = name, fn, max_items, wait_s
        self.active = active or Active()
        self._q: queue.SimpleQueue[tuple[In, Future[Out]] | None] = queue.SimpleQueue()
        self._closed = False
        self._put = threading.Lock()  # a call is put before the stop mark, or refused: none waits forever
        self.sizes: list[int] = []  # the size of each batch run (the last 1,000), for tests and the benchmark
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    def __call__(self, item: In) -> Out:
        fut: Future[Out] = Future()
        with self._put:
            if self._closed:
                raise RuntimeError(f"{self.name}: the batcher is closed")
            self._q.put((item, fut))
        return fut.result()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, once the calls already handed in are answered (waits ``timeout`` at most)."""
        with self._put:
            if not self._closed:
                self._closed = True
                self._q.put(_STOP)
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _gather(self) -> tuple[list[tuple[In, Future[Out]]], bool]:
        """The next batch, and whether the stop mark came after it."""
        first = self._q.get()
        if first is None:  # the stop mark
            return [], True
        batch = [first]
        until = time.monotonic() + self.wait_s
        while len(batch) < self.max_items:
            try:  # whatever is already waiting joins at once
                got = self._q.get_nowait()
            except queue.Empty:
                left = until - time.monotonic()
                if left <= 0 or self.active.n <= len(batch):  # no other running job could add to this batch
                    break
                try:
                    got = self._q.get(timeout=left)
                except queue.Empty:
                    break
            if got is None:  # the stop mark
                return batch, True
            batch.append(got)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._gather()
            if batch:
                self._serve(batch)

    def _serve(self, batch: list[tuple[In, Future[Out]]]) -> None:
        self.sizes = [*self.sizes[-999:], len(batch)]
        try:
            self._run(batch)
        except BaseException:  # noqa: BLE001 - one item broke the batch: each alone, so only it fails
            if len(batch) == 1:
                return
            log.warning("%s: a batch of %d failed; running its items one by one", self.name, len(batch))
            for one in batch:
                try:
                    self._run([one])
                except BaseException:  # noqa: BLE001 - already handed to its caller
                    pass

    def _run(self, batch: list[tuple[In, Future[Out]]]) -> None:
        try:
            outs = list(self.fn([item for item, _ in batch]))
            if len(outs) != len(batch):
                raise RuntimeError(f"{self.name}: {len(outs)} results for {len(batch)} items")
        except BaseException as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
            raise
        for (_, fut), out in zip(batch, outs, strict=True):
            fut.set_result(out)
