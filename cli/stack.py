"""Start and stop the local stack's processes (Redis, workers, the API) on loopback.

Used by ``imgsearch demo``, the integration tests and the benchmarks, so all three run the product the
same way a user does: real processes, free ports, and waits on conditions with deadlines.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import redis

from pipeline.jobs import fleet
from pipeline.jobs.store import connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``cond`` until it holds; raise TimeoutError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(5)
        self.signal_group(signal.SIGKILL)  # children that outlived their parent
        if self.log:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a machine loss or the OOM killer would."""
        self.signal_group(signal.SIGKILL)
        self.popen.wait(5)


def _spawn(name: str, argv: list[str], env: Mapping[str, str] | None, log_path: Path | None) -> Proc:
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed by Proc.stop
    popen = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=log or subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(name, popen, log)


def redis_alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def start_redis(port: int, workdir: Path, log_path: Path | None = None, timeout: float = 10.0, *,
                persist: bool = False) -> Proc:
    """A redis-server on loopback; ``persist``: every write in an append-only file (fsync always), so a
    restart keeps jobs and the queue, as a deployment's Redis must."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: `apt-get install redis-server` (or set REDIS_URL)")
    workdir.mkdir(parents=True, exist_ok=True)
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    proc = _spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability,
                            "--dir", str(workdir)], None, log_path)
    wait_for(lambda: redis_alive(f"redis://127.0.0.1:{port}/0") or not proc.alive(), timeout, "redis-server")
    if not proc.alive():
        raise RuntimeError(f"redis-server exited at start (port {port}); see {log_path}")
    return proc


def start_worker(env: Mapping[str, str], log_path: Path | None = None, *, name: str = "worker",
                 pool: str | None = None, concurrency: int | None = None) -> Proc:
    """A worker as ``imgsearch worker`` runs it: the pool and concurrency of its settings unless given."""
    argv = [sys.executable, "-m", "cli.main", "worker", "--name", f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h"]
    if pool:
        argv += ["--pool", pool]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return _spawn(name, argv, env, log_path)


def start_api(env: Mapping[str, str], port: int, log_path: Path | None = None) -> Proc:
    return _spawn("api", [sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(port)],
                  env, log_path)


def live_workers(redis_url: str) -> int:
    return len(fleet.read(connect(redis_url, 1)))


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether ``GET url`` answers 200 now (False for any other status or no answer)."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def api_ready(base_url: str) -> bool:
    return http_ok(f"{base_url}/readyz")
