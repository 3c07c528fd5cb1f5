"""The Docker path as a user takes it: the project's own Dockerfiles built, `docker compose up` on the model kit,
queries from the host. The test starts its own dockerd (own socket, data root, no firewall rules, no default
bridge), builds local stand-ins for the base images (no registry is reachable here: tests/deploy/stand_ins.sh),
and builds the images with build args only (a local base, host-network builds, the torch CPU wheel from disk).
Local runs keep the engine's data under build/compose (layers and stand-ins reused); CI (CI set) starts bare.
It skips where the engine can't start, and every wait has a deadline."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli import stack

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
PROJECT = "imgsearch-ct"
DEBIAN_BIN = "/usr/bin:/usr/sbin:/bin:/sbin"  # Debian's docker client (the one with BuildKit's RUN --mount)
QUERY = "a red car parked next to a tree"
FLOWER_AUTH = ("watch", "s3cret-pw-7q")
FIGURES: dict[str, Any] = {}


def _run(args: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


class Engine:
    """A dockerd of the test's own, and compose against it."""

    def __init__(self, work: Path, project: Path) -> None:
        self.work, self.project = work, project
        self.sock = f"/tmp/imgsearch-ct-{os.getpid()}.sock"
        self.env = {**os.environ, "PATH": f"{DEBIAN_BIN}:{os.environ.get('PATH', '')}",
                    "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "1", "COMPOSE_DOCKER_CLI_BUILD": "1",
                    "COMPOSE_PROJECT_NAME": PROJECT}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.work / "docker").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.work / "docker"), "--exec-root", f"/tmp/imgsearch-ct-exec-{os.getpid()}",
             "-H", f"unix://{self.sock}", "--pidfile", f"/tmp/imgsearch-ct-{os.getpid()}.pid", "--iptables=false",
             "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"],
            stdout=open(self.work / "dockerd.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115 - the engine's log

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (self.work / "dockerd.log").read_text()[-2000:]
            return _run(["docker", "info"], self.env, 10, check=False).returncode == 0
        stack.wait_for(up, 30, "dockerd", interval=0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["docker", *args], self.env, timeout, check=check)

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = ["-f", "docker-compose.yml", "-f", "docker-compose.kit.yml", "-f", "compose.test.yml"]
        profiles = ["--profile", "flower", "--profile", "metrics"]
        return _run(["docker-compose", *files, *profiles, *args], self.env, timeout, cwd=self.project, check=check)


def _torch_wheels() -> Path | None:
    for folder in filter(None, [os.environ.get("IMGSEARCH_TORCH_WHEELS"), "/opt/wheels"]):
        if any(Path(folder).glob("torch-2.13.0+cpu-*.whl")):
            return Path(folder)
    return None


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    """The wheel folder over HTTP on the host: a host-network build reaches it, and the wheel never enters the
    build context (nor an image layer)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a, directory=str(folder))

        def log_message(self, *_: Any) -> None:
            pass

    try:  # one port run after run: the URL is a build arg, part of the pip layer's cache key
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 47311), Quiet)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _project_copy(dest: Path) -> None:
    """What a user has after a clone: the tracked files compose and the builds read (the worktree's .env and
    data stay out)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        top = name.split("/")[0]
        if (ROOT / name).is_file() and top in {"api", "cli", "engines", "pipeline", "workers", "docker", "deploy"} \
                or name in {"pyproject.toml", "README.md", "docker-compose.yml", "docker-compose.kit.yml", ".env.example",
                ".dockerignore"}:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    missing = [t for t in ("dockerd", "docker-compose", "debootstrap") if not shutil.which(t, path=DEBIAN_BIN)]
    if missing:
        pytest.skip(f"needs Debian's docker.io, docker-compose and debootstrap (`make docker`): missing {missing}")
    if os.geteuid() != 0:
        pytest.skip("dockerd and debootstrap need root")
    work = tmp_path_factory.mktemp("engine") if os.environ.get("CI") else ROOT / "build" / "compose"
    project = tmp_path_factory.mktemp("project")
    _project_copy(project)
    eng = Engine(work, project)
    try:
        eng.start()
    except (AssertionError, TimeoutError, OSError) as exc:
        eng.stop()
        pytest.skip(f"dockerd could not start here: {str(exc)[:300]}")
    try:
        t0 = time.monotonic()
        _run(["sh", str(ROOT / "tests/deploy/stand_ins.sh"), str(work)], eng.env, 420)
        FIGURES["stand_ins_s"] = round(time.monotonic() - t0, 1)
        yield eng
    finally:
        (work / "figures.json").write_text(json.dumps(FIGURES, indent=1))  # what the note reports, even on failure
        eng.compose("down", "-v", "--remove-orphans", timeout=120, check=False)
        eng.stop()


def _results(body: dict[str, Any]) -> list[tuple[str, float]]:
    return [(r[0], r[1]) if isinstance(r, list) else (r["id"], r["score"]) for r in body["results"]]


def _submit(base: str, query: str) -> str | None:
    """The job's id if admitted; None if refused or the API did not answer in time (Redis coming back)."""
    try:
        r = httpx.post(f"{base}/v1/jobs", json={"query": query, "limit": 10}, timeout=10)
    except httpx.HTTPError:
        return None
    return str(r.json()["id"]) if r.status_code == 202 else None


def _ends(base: str, ids: list[str], timeout: float) -> dict[str, str]:
    """Each job's last status, waiting until every one is done or failed (or the deadline)."""
    seen: dict[str, str] = {}

    def ended() -> bool:
        for i in ids:
            if seen.get(i) not in ("done", "failed"):
                try:
                    r = httpx.get(f"{base}/v1/jobs/{i}", timeout=5)
                    seen[i] = r.json().get("status", "lost") if r.status_code == 200 else "lost"
                except httpx.HTTPError:
                    pass
        return all(seen.get(i) in ("done", "failed") for i in ids)
    try:
        stack.wait_for(ended, timeout, "the accepted jobs", interval=0.5)
    except TimeoutError:
        pass
    return seen


def _counts(ids: list[str], seen: dict[str, str]) -> dict[str, int]:
    done = sum(seen.get(i) == "done" for i in ids)
    failed = sum(seen.get(i) == "failed" for i in ids)
    return {"accepted": len(ids), "done": done, "failed": failed, "lost": len(ids) - done - failed}


def _process_stack_top10(tmp: Path) -> list[tuple[str, float]]:
    """The same query on the process stack: `imgsearch demo` over the same generated images."""
    port = stack.free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("REDIS_URL", "IMGSEARCH_REDIS_URL"):
        env.pop(k, None)
    log = open(tmp / "demo.log", "wb")  # noqa: SIM115
    demo = subprocess.Popen([str(Path(sys.executable).parent / "imgsearch"), "demo", "--port", str(port),
                             "--images", "48", "--data-dir", str(tmp / "demo")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert demo.poll() is None, (tmp / "demo.log").read_text()[-2000:]
            return stack.api_ready(base)
        stack.wait_for(answers, 240, "the process stack's demo", interval=0.5)
        r = httpx.post(f"{base}/search", json={"query": QUERY, "limit": 10}, timeout=60)
        assert r.status_code == 200, r.text
        return _results(r.json())
    finally:
        # SIGTERM, not SIGINT: a test run started as a background job inherits SIGINT ignored
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(60)  # it stops its API, worker and Redis (each may take up to 15 s)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)


def test_the_stack_builds_starts_answers_and_survives_faults(engine: Engine, tmp_path: Path) -> None:
    # the test-only override: build args and host-network builds, nothing else
    wheels = _torch_wheels()
    server, wport = _serve(wheels) if wheels else (None, 0)
    torch_args = {"TORCH_INDEX": "https://pypi.org/simple", "TORCH_FIND_LINKS": f"http://127.0.0.1:{wport}/"} if wheels else {}
    override = {"services": {
        "api": {"build": {"context": ".", "dockerfile": "docker/api.Dockerfile", "network": "host"}},
        "worker-cpu": {"build": {"context": ".", "dockerfile": "docker/worker.Dockerfile", "network": "host",
                                 "args": torch_args}}}}
    (engine.project / "compose.test.yml").write_text(json.dumps(override))
    # no .env: compose stops at once and names the file
    missing = engine.compose("up", "--no-start", check=False)
    said = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode != 0 and len(said) == 1 and "cp .env.example .env" in said[0], missing.stderr
    env_text = (engine.project / ".env.example").read_text().replace(
        "IMGSEARCH_FLOWER_BASIC_AUTH=\n", f"IMGSEARCH_FLOWER_BASIC_AUTH={':'.join(FLOWER_AUTH)}\n")
    # the process stack runs torch fp32 (tests pin it): so do the containers, or `auto` may time bf16 faster
    # here and the scores compared below differ by bf16's rounding
    env_text += "IMGSEARCH_ENGINE_BACKEND=torch\nIMGSEARCH_ENGINE_PRECISION=fp32\n"
    # one client sends every job here, and polling costs tokens: with the rate limit on, the restart phase got 3 of
    # its 20 jobs admitted (< 5); the test counts lost jobs, not the limiter (tests/faults covers that)
    env_text += "IMGSEARCH_RATE_LIMIT_PER_MIN=0\n"
    (engine.project / ".env").write_text(env_text)  # `cp .env.example .env`, Flower's credentials filled in

    try:
        t0 = time.monotonic()
        engine.compose("build", "--parallel", timeout=600)
        FIGURES["build_s"] = round(time.monotonic() - t0, 1)
    finally:
        if server:
            server.shutdown()
    for image in ("imgsearch-api", "imgsearch-worker"):
        size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", image).stdout.strip())
        FIGURES[f"{image}_GB"] = round(size / 1e9, 2)

    # a worker whose models can't load: one line and exit 2, no traceback
    bad = engine.compose("run", "--rm", "-T", "--no-deps", "-e", "IMGSEARCH_SIGLIP_MODEL=/nonexistent", "worker-cpu",
                         timeout=120, check=False)
    said = [line for line in (bad.stdout + bad.stderr).splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(said) == 1 and "Traceback" not in bad.stdout + bad.stderr, bad.stderr[-2000:]

    # the kit's demo images, ingested through a container (the worker image, on the stack's data volume)
    engine.compose("up", "-d", "redis", timeout=120)
    gen = ("from pathlib import Path; from engines.kit.world import make_split, write_images; "
           "write_images(Path('/data/demo/images'), make_split(48, held_out=True, seed=5, unique=True))")
    engine.compose("run", "--rm", "-T", "--no-deps", "worker-cpu", "sh", "-c",
                   f'python -c "{gen}" && imgsearch ingest /data/demo/images', timeout=300)

    t_up = time.monotonic()
    engine.compose("up", "-d", timeout=180)
    base = "http://127.0.0.1:8000"

    def first_answer() -> bool:
        try:
            return httpx.post(f"{base}/search", json={"query": QUERY, "limit": 10}, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False
    stack.wait_for(first_answer, 240, "the first answered query", interval=0.5)
    FIGURES["up_to_first_answer_s"] = round(time.monotonic() - t_up, 1)
    containers = _results(httpx.post(f"{base}/search", json={"query": QUERY, "limit": 10}, timeout=30).json())

    processes = _process_stack_top10(tmp_path)
    FIGURES["top10_containers"], FIGURES["top10_processes"] = containers, processes
    assert [i for i, _ in containers] == [i for i, _ in processes] and len(containers) == 10
    assert all(abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(containers, processes, strict=True))

    # two workers, one killed under load: every accepted job ends, none lost
    engine.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", "worker-cpu=2", "worker-cpu", timeout=120)
    names = lambda: engine.compose("ps", "-q", "worker-cpu").stdout.split()  # noqa: E731
    stack.wait_for(lambda: len(names()) == 2 and all(
        engine.docker("inspect", "-f", "{{.State.Health.Status}}", c).stdout.strip() == "healthy" for c in names()),
        180, "two healthy workers", interval=1)
    # Flower: 401 without credentials; with them, both live workers (before one is killed: a `docker kill`ed
    # container stays down, as Docker treats it as stopped by hand)
    flower = "http://127.0.0.1:5555"
    stack.wait_for(lambda: _status(f"{flower}/api/workers") == 401, 60, "Flower", interval=0.5)

    def flower_lists_workers() -> bool:
        try:
            r = httpx.get(f"{flower}/api/workers?refresh=1", auth=FLOWER_AUTH, timeout=20)
        except httpx.HTTPError:
            return False
        FIGURES["flower_workers"] = len(r.json()) if r.status_code == 200 else -r.status_code
        return r.status_code == 200 and len(r.json()) >= 2
    stack.wait_for(flower_lists_workers, 90, "Flower listing both workers", interval=2)

    ids = [i for i in (_submit(base, f"{QUERY} {n}") for n in range(30)) if i]  # under the caller's cap (32)
    engine.docker("kill", names()[0])
    seen = _ends(base, ids, 180)
    FIGURES["kill"] = _counts(ids, seen)
    # admission may refuse some (the caller's rate limit and in-flight cap); failed is an end (a job's deadline)
    assert FIGURES["kill"]["lost"] == 0 and len(ids) >= 10, FIGURES["kill"]

    # Redis stopped and started (AOF on): jobs accepted before end; new ones are admitted once it is back
    ids = [i for i in (_submit(base, f"a blue house {n}") for n in range(20)) if i]
    engine.compose("stop", "redis", timeout=120)
    # Redis down: the API refuses new work with 503, as on the process stack
    down = httpx.post(f"{base}/v1/jobs", json={"query": QUERY}, timeout=30)
    FIGURES["redis_down_status"] = down.status_code
    assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable", down.text
    engine.compose("start", "redis", timeout=120)
    seen = _ends(base, ids, 180)
    FIGURES["redis_restart"] = _counts(ids, seen)
    assert FIGURES["redis_restart"]["lost"] == 0 and len(ids) >= 5, FIGURES["redis_restart"]
    stack.wait_for(lambda: _submit(base, "after the restart") is not None, 60, "admission after the restart",
                   interval=0.5)

    # Prometheus scrapes the API: the target up, the backlog gauge there
    prom = "http://127.0.0.1:9090"

    def scraped() -> bool:
        try:
            targets = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            q = httpx.get(f"{prom}/api/v1/query", params={"query": "imgsearch_queue_backlog"}, timeout=5).json()
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return any(t["health"] == "up" for t in targets) and bool(q["data"]["result"])
    stack.wait_for(scraped, 120, "Prometheus scraping the API", interval=2)

    # down: nothing of the stack is left
    engine.compose("down", "-v", timeout=120)
    left = engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
    assert left == []
    print("FIGURES", json.dumps(FIGURES))


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0
