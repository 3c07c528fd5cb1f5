"""A Redis group with high availability for the tests: a primary, replicas and three Sentinels, every one a real
Debian redis-server on a free loopback port, and the moves a failover test makes on them."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cli import stack

MASTER = "imgsearch"


@dataclass
class RedisGroup:
    workdir: Path
    down_after_ms: int = 2000
    sentinel_password: str | None = None
    nodes: dict[int, stack.Proc] = field(default_factory=dict)  # port -> redis-server
    sentinels: dict[int, stack.Proc] = field(default_factory=dict)  # port -> sentinel

    def url(self, db: int = 0) -> str:
        hosts = ";".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"sentinel://{hosts}/{MASTER}/{db}"

    def start(self, replicas: int = 1) -> RedisGroup:
        primary = self.start_node()
        for _ in range(replicas):
            self.start_node(replica_of=primary)
        self.wait_replicas(primary, replicas)
        for _ in range(3):
            port = stack.free_port()
            self.sentinels[port] = stack.start_sentinel(port, self.workdir / f"sentinel{port}", MASTER, primary,
                                                        down_after_ms=self.down_after_ms,
                                                        log_path=self.workdir / f"sentinel{port}.log",
                                                        password=self.sentinel_password)
        stack.wait_for(lambda: all(self.sentinels_seeing(p, replicas) for p in self.sentinels), 30,
                       "the Sentinels to see the primary, its replicas and each other")
        return self

    def start_node(self, replica_of: int | None = None, port: int | None = None) -> int:
        port = port or stack.free_port()
        extra = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
        # the tests' primaries are all replicas' primaries too: no write lands where no replica could follow
        self.nodes[port] = stack.start_redis(port, self.workdir / f"node{port}", self.workdir / f"node{port}.log",
                                             extra=extra + ["--repl-diskless-sync", "yes",
                                                            "--repl-diskless-sync-delay", "0"])
        return port

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.sentinel_password, socket_timeout=1, decode_responses=True)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)

    def sentinels_seeing(self, port: int, replicas: int) -> bool:
        try:
            got = self.sentinel(port).sentinel_master(MASTER)
            return int(got["num-slaves"]) >= replicas and int(got["num-other-sentinels"]) >= 2
        except redis.RedisError:
            return False

    def primary(self) -> int | None:
        """The primary's port as a Sentinel names it now (None if none answers)."""
        for p in self.sentinels:
            try:
                _, port = self.sentinel(p).sentinel_get_master_addr_by_name(MASTER)
                return int(port)
            except (redis.RedisError, TypeError):
                continue
        return None

    def role(self, port: int) -> str:
        try:
            return str(self.client(port).role()[0])
        except redis.RedisError:
            return "down"

    def wait_replicas(self, primary: int, n: int, timeout: float = 30) -> None:
        def synced() -> bool:
            try:
                info = self.client(primary).info("replication")
            except redis.RedisError:
                return False
            states = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            return sum(s.get("state") == "online" for s in states) >= n

        stack.wait_for(synced, timeout, f"{n} replica(s) online on {primary}")

    def kill(self, port: int) -> None:
        self.nodes.pop(port).kill()

    def freeze(self, port: int) -> None:
        self.nodes[port].signal_group(signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        self.nodes[port].signal_group(signal.SIGCONT)

    def wait_promoted(self, old: int, timeout: float = 30) -> int:
        """The new primary's port once the Sentinels promoted a replica in place of ``old``."""
        def moved() -> bool:
            now = self.primary()
            return now is not None and now != old and self.role(now) == "master"

        stack.wait_for(moved, timeout, "the Sentinels to promote a replica")
        return int(self.primary())  # type: ignore[arg-type]

    def stop(self) -> None:
        for proc in [*self.sentinels.values(), *self.nodes.values()]:
            proc.signal_group(signal.SIGCONT)
            proc.stop()
        self.sentinels.clear()
        self.nodes.clear()
