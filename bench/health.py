"""What ``/readyz`` and ``/metrics`` cost with a large keyspace: before (the workers' heartbeats found by scanning
the keyspace, as they were) and after (one script over the workers' set), measured in the same run.

Starts its own redis-server, fills it with ``--keys`` keys (jobs, events, caches: what a busy shared Redis holds),
writes the heartbeats of ``--workers`` workers, and serves the API in-process with keys configured. Each route is
asked ``--repeat`` times with a monitor key (the whole answer), once with the old reader swapped in and once with
the new; the SCAN calls each route made are read from Redis's own command statistics.

    python -m bench.health [--quick] [--keys 300000] [--repeat 30] [--out bench/results/health.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli import stack


def _fill(url: str, n: int) -> None:
    import redis

    r = redis.Redis.from_url(url)
    batch = 10_000
    for start in range(0, n, batch):
        pipe = r.pipeline(transaction=False)
        pipe.mset({f"imgsearch:job:bench{i:08d}": b"{}" for i in range(start, min(n, start + batch))})
        pipe.execute()


def _beats(url: str, workers: int) -> None:
    import redis

    from pipeline.jobs.fleet import Heartbeat

    r = redis.Redis.from_url(url)
    for i in range(workers):
        Heartbeat(r, f"bench-host-{i}:{1000 + i}", 600, {"host": f"bench-host-{i}", "pid": 1000 + i,
                                                          "engines_loaded": True, "queue": "search"}).beat()


async def _scan_read(r: Any) -> list[dict[str, Any]]:
    """The reader as it was: every heartbeat key found by a SCAN of the whole keyspace, then one MGET."""
    import json

    from pipeline.jobs.keys import HEARTBEAT_PATTERN

    keys = [k async for k in r.scan_iter(match=HEARTBEAT_PATTERN, count=100)]
    return [json.loads(b) for b in await r.mget(keys) if b] if keys else []


@contextmanager
def _reader(old: bool) -> Iterator[None]:
    from pipeline.jobs import fleet

    new = fleet.aread
    if old:
        fleet.aread = _scan_read  # type: ignore[assignment]
    try:
        yield
    finally:
        fleet.aread = new  # type: ignore[assignment]


def _scans(url: str) -> int:
    import redis

    stats: Any = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


def _time(client: Any, path: str, key: str, repeat: int, url: str) -> dict[str, float]:
    client.get(path, headers={"X-API-Key": key})  # warm
    before = _scans(url)
    took = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        resp = client.get(path, headers={"X-API-Key": key})
        took.append((time.perf_counter() - t0) * 1000)
        assert resp.status_code == 200, resp.text
    return {"p50_ms": round(statistics.median(took), 2), "max_ms": round(max(took), 2),
            "scan_calls_per_request": round((_scans(url) - before) / repeat, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=300_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="10 requests per route and reader")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    repeat = 10 if args.quick else args.repeat

    from fastapi.testclient import TestClient

    from api.main import create_app
    from pipeline.admission.callers import hash_key
    from pipeline.settings import ApiSettings

    monitor = "isk_bench-monitor"
    with tempfile.TemporaryDirectory() as tmp:
        port = stack.free_port()
        redis_proc = stack.start_redis(port, Path(tmp))
        url = f"redis://127.0.0.1:{port}/0"
        try:
            t0 = time.perf_counter()
            _fill(url, args.keys)
            _beats(url, args.workers)
            filled_s = time.perf_counter() - t0
            settings = ApiSettings(redis_url=url, reaper_interval_s=0, data_dir=Path(tmp) / "data",
                                   api_keys=[{"name": "prometheus", "sha256": hash_key(monitor), "monitor": True}])
            out: dict[str, Any] = {}
            with TestClient(create_app(settings)) as client:
                for path in ("/readyz", "/metrics"):
                    for label, old in (("before", True), ("after", False)):
                        with _reader(old):
                            out[f"{path} {label}"] = _time(client, path, monitor, repeat, url)
                assert len(client.get("/readyz", headers={"X-API-Key": monitor}).json()["workers"]) == args.workers
        finally:
            redis_proc.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {"keys": args.keys, "workers": args.workers, "repeat": repeat, "fill_s": round(filled_s, 1),
              "cpu": cpu, "cores": os.cpu_count(), "routes": out}
    print(f"{args.keys} keys in Redis, {args.workers} workers, {repeat} requests each ({cpu})")
    print(f"{'route':<18} {'p50 ms':>9} {'max ms':>9} {'SCANs/request':>14}")
    for name, row in out.items():
        print(f"{name:<18} {row['p50_ms']:>9} {row['max_ms']:>9} {row['scan_calls_per_request']:>14}")
    for path in ("/readyz", "/metrics"):
        print(f"health_{path.strip('/')}_ms={out[f'{path} before']['p50_ms']}->{out[f'{path} after']['p50_ms']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
