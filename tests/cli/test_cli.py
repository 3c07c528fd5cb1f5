"""The entry points: ``imgsearch search`` through the API and in process, the commands' help, and the demo
(through real processes: Redis, a Celery worker, the API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import stack
from tests.conftest import settings_env
from tests.live import Live, demo_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    yield from demo_stack(redis_server, store_dir, tiny_models, 12, tmp_path_factory.mktemp("logs"))


def _imgsearch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=180)


def test_search_prints_a_ranked_table_through_the_api_and_in_process(live: Live, tmp_path: Path) -> None:
    table = _imgsearch(live.env, "search", "a red circle", "--limit", "3", "--api", live.base)
    assert table.returncode == 0, table.stderr[-2000:]
    head, *rows = table.stdout.strip().splitlines()
    assert head.split()[:5] == ["#", "id", "score", "itm", "cosine"] and len(rows) == 3
    as_json = _imgsearch(live.env, "search", "a red circle", "--limit", "3", "--api", live.base, "--json")
    job = json.loads(as_json.stdout)
    assert job["status"] == "done" and [r["id"] for r in job["results"]] == [row.split()[1] for row in rows]
    scores = [float(row.split()[2]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    direct = _imgsearch(live.env, "search", "a red circle", "--limit", "3", "--direct", "--json")
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert [r["id"] for r in json.loads(direct.stdout)["results"]] == [r["id"] for r in job["results"]]
    overlays = tmp_path / "explain"
    explained = _imgsearch(live.env, "search", "a red circle", "--limit", "3", "--api", live.base, "--explain",
                           "--explain-dir", str(overlays))
    assert explained.returncode == 0, explained.stderr[-2000:]
    assert sorted(p.name for p in overlays.iterdir()) == [f"{i:02d}-{r['id']}.png" for i, r in enumerate(job["results"], 1)]
    gone = _imgsearch(live.env, "search", "x", "--api", f"http://127.0.0.1:{stack.free_port()}")
    assert gone.returncode == 1 and "does not answer" in gone.stderr


def test_search_explain_writes_an_overlay_per_result(store_dir, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    env = settings_env(store_dir, tiny_models, f"redis://127.0.0.1:{stack.free_port()}/0")  # in process: no Redis
    out = _imgsearch(env, "search", "a red circle", "--limit", "3", "--direct", "--json", "--explain",
                     "--explain-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    job = json.loads(out.stdout)
    ids = [r["id"] for r in job["results"]]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{i:02d}-{p}.png" for i, p in enumerate(ids, 1)] and len(ids) == 3
    assert {m["method"] for m in job["explain"].values()} == {"gradcam"}
    assert all(Image.open(tmp_path / f).format == "PNG" for f in files)


def test_search_by_a_post_and_by_a_picture_file(live: Live, store_dir: Path, demo_images: Path) -> None:
    like = _imgsearch(live.env, "search", "--like", "demo004", "--limit", "3", "--api", live.base, "--json")
    assert like.returncode == 0, like.stderr[-2000:]
    job = json.loads(like.stdout)
    ids = [r["id"] for r in job["results"]]
    assert job["params"]["like"] == "demo004" and len(ids) == 3 and "demo004" not in ids
    picture = _imgsearch(live.env, "search", "--image", str(demo_images / "demo004.png"), "--limit", "3",
                         "--api", live.base)
    assert picture.returncode == 0, picture.stderr[-2000:]
    head, first, *_ = picture.stdout.strip().splitlines()
    assert head.split()[:5] == ["#", "id", "score", "itm", "cosine"] and first.split()[1] == "demo004"
    assert first.split()[3] == "-"  # no ITM for a search by image
    both = _imgsearch(live.env, "search", "words", "--like", "demo004", "--api", live.base)
    assert both.returncode == 2 and "one of QUERY, --like or --image" in both.stderr


def test_help_has_no_hard_line_breaks_inside_a_paragraph() -> None:
    from cli.main import cli

    def commands(app):  # type: ignore[no-untyped-def]
        yield from app.registered_commands
        for group in app.registered_groups:
            yield from commands(group.typer_instance)

    helps = [c.help for c in commands(cli) if c.help]
    assert len(helps) > 10
    for text in helps:
        assert all("\n" not in para for para in text.split("\n\n")), text
    out = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "search" in out.stdout


@pytest.mark.slow
def test_demo_command_runs_queries_through_the_queue(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--once", "--data-dir", str(tmp_path / "demo"),
                          "--port", str(stack.free_port()), "--images", "24"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("-> job ") == 3 and "API at http://127.0.0.1:" in out.stdout
    # the trained kit by default: each example query describes one of the first three images, in other words
    # than its title, and that image is among the five shown
    for k, block in enumerate(out.stdout.split("\nquery ")[1:4]):
        assert any(f". w{k:04d} " in line for line in block.splitlines()[1:6]), block




@pytest.mark.slow
def _parent(pid: int) -> int | None:
    try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")"
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_the_demo_brings_a_killed_worker_back_and_answers_the_next_query(redis_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import signal

    import httpx

    from pipeline.jobs import fleet
    from pipeline.jobs.store import connect

    url = redis_server.url(12)
    r = connect(url, 5)
    r.flushdb()
    port = stack.free_port()
    out = tmp_path / "demo.out"
    demo = stack._spawn("demo", [sys.executable, "-m", "cli.main", "demo", "--data-dir", str(tmp_path / "demo"),
                                 "--port", str(port), "--images", "8"], {"IMGSEARCH_REDIS_URL": url}, out)
    try:
        stack.wait_for(lambda: "serving; Ctrl-C to stop" in out.read_text() or not demo.alive(), 300, "the demo")
        assert demo.alive(), out.read_text()[-3000:]
        def demo_workers() -> list[dict]:  # the module's other stack shares this Redis database: only the demo's children
            return [b for b in fleet.read(r) if _parent(b["pid"]) == demo.popen.pid]

        stack.wait_for(lambda: len(demo_workers()) == 1, 30, "the demo's worker's heartbeat")
        (first,) = demo_workers()
        os.kill(first["pid"], signal.SIGKILL)
        stack.wait_for(lambda: "the worker exited (signal SIGKILL); starting it again" in out.read_text(), 30,
                       "the demo to say it restarts the worker")
        stack.wait_for(lambda: any(b["pid"] != first["pid"] and b.get("engines_loaded") for b in demo_workers()),
                       180, "a new worker's heartbeat")
        job = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json={"query": "a red circle", "limit": 3}, timeout=10)
        assert job.status_code == 202, job.text
        got: dict = {}

        def ended() -> bool:
            nonlocal got
            got = httpx.get(f"http://127.0.0.1:{port}{job.json()['links']['self']}", timeout=10).json()
            return got["status"] in ("done", "failed")

        stack.wait_for(ended, 60, "the next query")
        assert got["status"] == "done" and len(got["results"]) == 3
        demo.signal_group(signal.SIGTERM)
        assert demo.popen.wait(30) == 0
    finally:
        demo.stop()
    text = out.read_text()
    # readable: the demo's own lines, no library noise
    assert "bos_token_id" not in text and "Loading weights" not in text and "faiss" not in text.lower(), text[:2000]
