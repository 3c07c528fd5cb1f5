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

from pipeline import redisconn
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


def redis_alive(url: str, sentinel_password: object = None) -> bool:
    """Whether the Redis the URL names (a Sentinel group's primary too) answers a ping now."""
    return redisconn.alive(url, 0.5, sentinel_password=sentinel_password)


def start_redis(port: int, workdir: Path, log_path: Path | None = None, timeout: float = 10.0, *,
                persist: bool = False, extra: list[str] | None = None) -> Proc:
    """A redis-server on loopback; ``persist``: every write in an append-only file (fsync always), so a
    restart keeps jobs and the queue, as a deployment's Redis must; ``extra``: more of its options
    (``--replicaof`` ...)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: `apt-get install redis-server` (or set REDIS_URL)")
    workdir.mkdir(parents=True, exist_ok=True)
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    proc = _spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--databases", "64",
                            *durability, "--dir", str(workdir), *(extra or [])], None, log_path)
    wait_for(lambda: redis_alive(f"redis://127.0.0.1:{port}/0") or not proc.alive(), timeout, "redis-server")
    if not proc.alive():
        raise RuntimeError(f"redis-server exited at start (port {port}); see {log_path}")
    return proc


def start_sentinel(port: int, workdir: Path, master: str, master_port: int, *, down_after_ms: int = 2000,
                   quorum: int = 2, log_path: Path | None = None, timeout: float = 10.0,
                   password: str | None = None) -> Proc:
    """A Sentinel (Debian's redis-server --sentinel) on loopback watching the primary at ``master_port`` as
    ``master``; it rewrites its own config file (in ``workdir``) as failovers happen. ``password``: the one
    clients (and the other Sentinels) must give it."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: `apt-get install redis-server`")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"sentinel-{port}.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                    f"sentinel monitor {master} 127.0.0.1 {master_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
                    f"sentinel failover-timeout {master} {max(down_after_ms * 5, 10000)}\n"
                    f"sentinel parallel-syncs {master} 1\n"
                    + (f"requirepass {password}\nsentinel sentinel-pass {password}\n" if password else ""))
    proc = _spawn("sentinel", [exe, str(conf), "--sentinel"], None, log_path)

    def up() -> bool:
        try:
            return bool(redis.Redis(port=port, password=password, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    wait_for(lambda: up() or not proc.alive(), timeout, "redis-sentinel")
    if not proc.alive():
        raise RuntimeError(f"redis-server --sentinel exited at start (port {port}); see {log_path}")
    return proc


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's versioned folder (the newest there)."""
    exe = shutil.which(name)
    if exe:
        return exe
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError(f"{name} is not installed: `apt-get install postgresql` (or set IMGSEARCH_LEDGER_URL)")
    return str(found[-1])


def postgres_alive(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@dataclass
class Postgres:
    proc: Proc
    url: str
    workdir: Path

    def stop(self) -> None:
        """Fast shutdown (SIGINT: connections are ended), then whatever is left; the data goes with it."""
        self.proc.signal_group(signal.SIGINT)
        try:
            self.proc.popen.wait(15)
        except subprocess.TimeoutExpired:
            pass
        self.proc.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_postgres(port: int, log_path: Path | None = None, timeout: float = 30.0) -> Postgres:
    """A throwaway PostgreSQL server on loopback (``initdb`` then ``postgres`` in the foreground, so the
    process group is the server), trusting local connections; its URL names user ``imgsearch`` and database
    ``postgres``. PostgreSQL refuses to run as root: as root, both run as the ``postgres`` user,
    in a folder of their own under the system's temp dir (a root-only parent would hide it from them).
    Durability is off: a test's ledger need not survive a power cut."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="imgsearch-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres", "postgres")
    data = workdir / "data"
    init = subprocess.run([*as_user, postgres_bin("initdb"), "-D", str(data), "-U", "imgsearch", "--auth=trust",
                           "--no-sync", "-E", "UTF8"], capture_output=True, timeout=120, check=False)
    if init.returncode:
        raise RuntimeError(f"initdb failed: {init.stderr.decode(errors='replace')[-2000:]}")
    proc = _spawn("postgres", [*as_user, postgres_bin("postgres"), "-D", str(data), "-p", str(port),
                               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={workdir}",
                               "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                               "-c", "max_connections=200"], None, log_path)
    url = f"postgresql://imgsearch@127.0.0.1:{port}/postgres"
    wait_for(lambda: postgres_alive(url) or not proc.alive(), timeout, "PostgreSQL", interval=0.2)
    if not proc.alive():
        raise RuntimeError(f"postgres exited at start (port {port}); see {log_path}")
    return Postgres(proc, url, workdir)


def start_worker(env: Mapping[str, str], log_path: Path | None = None, *, name: str = "worker",
                 pool: str | None = None, concurrency: int | None = None, queue: str | None = None) -> Proc:
    """A worker as ``imgsearch worker`` runs it: the pool, concurrency and queue of its settings unless given."""
    argv = [sys.executable, "-m", "cli.main", "worker", "--name", f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h"]
    if queue:
        argv += ["--queue", queue]
    if pool:
        argv += ["--pool", pool]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return _spawn(name, argv, env, log_path)


def start_api(env: Mapping[str, str], port: int, log_path: Path | None = None) -> Proc:
    return _spawn("api", [sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(port)],
                  env, log_path)


def live_workers(redis_url: str, sentinel_password: object = None) -> int:
    return len(fleet.read(connect(redis_url, 1, sentinel_password=sentinel_password)))


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether ``GET url`` answers 200 now (False for any other status or no answer)."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def api_ready(base_url: str) -> bool:
    return http_ok(f"{base_url}/readyz")
