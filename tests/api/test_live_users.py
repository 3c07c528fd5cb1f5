"""Search parameters through the queue on the embedded store, fleet metrics, Flower, and the search page in
headless Chromium: one live stack (Redis, a worker, the API) over the demo images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli import stack
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = pytest.mark.integration
ARTIFACTS = Path(os.environ.get("IMGSEARCH_TEST_ARTIFACTS", "build/test-artifacts"))


@pytest.fixture(scope="module")
def live(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    data = tmp_path_factory.mktemp("users") / "data"
    shutil.copytree(store_dir, data)
    redis.Redis.from_url(redis_server.url(15)).flushdb()
    env = settings_env(data, tiny_models, redis_server.url(15), IMGSEARCH_CACHE_RESULTS_TTL_S="0")
    running = start_stack(env, tmp_path_factory.mktemp("users-logs"))
    yield running
    running.stop()


def _search(live: Live, **body: Any) -> dict[str, Any]:
    job = live.wait(live.submit("a red circle", **body))
    assert job["status"] == "done", job
    return job


def _all(live: Live, **body: Any) -> list[dict[str, Any]]:
    return _search(live, limit=100, top_k=100, **body)["results"]  # type: ignore[no-any-return]


def test_every_filter_is_honoured_through_the_queue(live) -> None:  # type: ignore[no-untyped-def]
    everything = _all(live, filter={"over_18": None})
    assert len(everything) == 48 and any(r["metadata"]["over_18"] for r in everything)
    default = _all(live)
    assert default and not any(r["metadata"]["over_18"] for r in default)  # NSFW left out unless asked for
    assert len(default) == sum(not r["metadata"]["over_18"] for r in everything)
    only_nsfw = _all(live, filter={"over_18": True})
    assert only_nsfw and all(r["metadata"]["over_18"] for r in only_nsfw)
    memes = _all(live, filter={"subreddit": "memes"})
    assert memes and {r["subreddit"] for r in memes} == {"memes"}
    two = _all(live, filter={"subreddit": ["memes", "meirl"], "over_18": None})
    assert {r["subreddit"] for r in two} == {"memes", "meirl"}
    after, before = 1_700_000_000 + 3600 * 10, 1_700_000_000 + 3600 * 20
    window = _all(live, filter={"created_after": after, "created_before": before, "over_18": None})
    assert len(window) == 10 and all(after <= r["created_utc"] < before for r in window)
    scored = _all(live, filter={"min_post_score": 1100, "over_18": None})
    assert scored and all(r["metadata"]["score"] >= 1100 for r in scored)
    assert len(scored) == sum(r["metadata"]["score"] >= 1100 for r in everything)
    raw = _all(live, filter={"score": {"$lt": 900}, "subreddit": {"$ne": "memes"}})
    assert raw and all(r["metadata"]["score"] < 900 and r["subreddit"] != "memes" for r in raw)


def test_paging_min_score_candidates_and_rerank_off(live) -> None:  # type: ignore[no-untyped-def]
    ten = _search(live, limit=10)["results"]
    page2 = _search(live, limit=5, offset=5)["results"]
    assert [r["id"] for r in page2] == [r["id"] for r in ten[5:]]
    cut = ten[4]["score"]
    above = _search(live, limit=10, min_score=cut)["results"]
    assert [r["id"] for r in above] == [r["id"] for r in ten if r["score"] >= cut]
    few = _search(live, limit=10, candidates=4)["results"]
    assert sum(r.get("itm") is not None for r in few) == 4
    plain = _search(live, limit=10, rerank=False)
    assert all(r.get("itm") is None for r in plain["results"]) and "rerank" not in plain["timings"]
    scores = [r["score"] for r in plain["results"]]
    assert scores == sorted(scores, reverse=True)
    r0 = ten[0]
    assert r0["title"] == r0["metadata"]["title"] and r0["permalink"] and r0["created_utc"]
    assert r0["image_url"] == f"/v1/images/{r0['id']}"
    img = httpx.get(live.base + r0["image_url"] + "?size=256", timeout=10)
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"


def test_metrics_report_stages_jobs_and_caches_from_the_worker(live) -> None:  # type: ignore[no-untyped-def]
    _search(live, limit=3)
    text = httpx.get(f"{live.base}/metrics", timeout=10).text
    assert 'imgsearch_stage_seconds_count{kind="text",stage="rerank"}' in text
    assert 'imgsearch_stage_seconds_bucket{kind="text",le="+Inf",stage="encode"}' in text
    done = [ln for ln in text.splitlines() if ln.startswith('imgsearch_jobs_total{kind="text",outcome="done"}')]
    assert done and float(done[0].split()[-1]) >= 1
    assert 'imgsearch_cache_lookups_total{cache="features",outcome="blob_store"}' in text
    assert "imgsearch_workers_live 1.0" in text


def test_flower_watches_the_workers_behind_basic_auth(live, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = stack.free_port()
    refused = subprocess.run([sys.executable, "-m", "cli.main", "flower"], env={**os.environ, **live.env},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "IMGSEARCH_FLOWER_BASIC_AUTH" in refused.stderr
    env = {**live.env, "IMGSEARCH_FLOWER_BASIC_AUTH": "watch:s3cret-pw"}
    proc = stack._spawn("flower", [sys.executable, "-m", "cli.main", "flower", "--port", str(port)], env,
                        tmp_path / "flower.log")
    base = f"http://127.0.0.1:{port}"
    try:
        stack.wait_for(lambda: stack.http_ok(f"{base}/healthcheck"), 60, "Flower to answer")
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        seen: dict[str, Any] = {}

        def lists_worker() -> bool:
            nonlocal seen
            seen = httpx.get(f"{base}/api/workers?refresh=1", auth=("watch", "s3cret-pw"), timeout=10).json()
            return bool(seen)

        stack.wait_for(lists_worker, 60, "Flower to list the worker", interval=1)
        assert any(name.startswith("w0-") for name in seen)
    finally:
        proc.stop()
    assert "s3cret-pw" not in (tmp_path / "flower.log").read_text()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Headless Chromium through Debian's chromedriver, one for the module's page tests."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_bin):
        pytest.fail("Debian's chromium and chromium-driver are missing: `make setup` installs them")
    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver_bin), options=opts)
    yield browser
    browser.quit()


@pytest.mark.browser
def test_the_search_page_in_headless_chromium(live, chromium) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium
    browser.get(live.base + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys("a red circle")
    browser.find_element(By.ID, "go").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "grid").get_attribute("data-phase") == "results")
    wait.until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
    assert len(cards) == 24
    phases = browser.execute_script("return window.imgsearchPhases")  # what the page rendered, in turn
    assert [p["phase"] for p in phases][:1] == ["candidates"] and phases[-1]["phase"] == "results"
    assert phases[0]["order"] != phases[-1]["order"]  # the order changed when the rerank landed
    assert "reranked" in browser.find_element(By.ID, "status").text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "search-page.png"))
    # the page's CSP let its own script run and blocked nothing it needs; its links go to reddit paths only
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    hrefs = [c.find_element(By.TAG_NAME, "a").get_attribute("href") for c in cards]
    assert all(h.startswith("https://www.reddit.com/r/") for h in hrefs), hrefs
    browser.execute_script("render([{id: 'x1', score: 1, permalink: 'javascript:alert(1)'}, "
                           "{id: 'x2', score: 1, permalink: 'https://evil.example/r/a/comments/b/'}], 'test')")
    assert browser.execute_script("return [...document.querySelectorAll('#grid .card a')]"
                                  ".map(a => a.hasAttribute('href'))") == [False, False]
    # the search is in the URL: a shared link fills the form, filters included, and runs the search
    assert "q=a+red+circle" in browser.current_url
    browser.get(live.base + "/?q=a+blue+square&subreddit=no-such-sub&min_post_score=5&nsfw=1&rerank=0&limit=12")
    wait.until(lambda b: b.find_element(By.ID, "status").text != "" and
               b.find_element(By.ID, "status").text != "searching…")
    assert browser.find_element(By.ID, "q").get_attribute("value") == "a blue square"
    assert browser.find_element(By.ID, "subreddit").get_attribute("value") == "no-such-sub"
    assert browser.find_element(By.ID, "minpost").get_attribute("value") == "5"
    assert browser.find_element(By.ID, "nsfw").is_selected() and not browser.find_element(By.ID, "rerank").is_selected()
    assert browser.find_elements(By.CSS_SELECTOR, "#grid .card") == []  # the filter matched nothing: it was sent
    browser.find_element(By.ID, "subreddit").clear()
    browser.find_element(By.ID, "go").click()  # ...and a new search writes the form back into the URL
    wait.until(lambda b: "subreddit=" not in b.current_url and "min_post_score=5" in b.current_url)
    assert "rerank=0" in browser.current_url and "limit=12" in browser.current_url


def _order_of(live: Live, **kw: Any) -> str:
    r = httpx.post(f"{live.base}/v1/jobs", timeout=30, **kw)
    assert r.status_code == 202, r.text
    job = live.wait(r.json()["id"])
    assert job["status"] == "done", job
    return ",".join(x["id"] for x in job["results"])


@pytest.mark.browser
def test_more_like_this_and_a_dropped_picture_on_the_page(live, chromium) -> None:  # type: ignore[no-untyped-def]
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, wait = chromium, WebDriverWait(chromium, 60)
    grid = lambda b: b.find_element(By.ID, "grid")  # noqa: E731
    browser.get(live.base + "/?q=a+red+circle")
    wait.until(lambda b: grid(b).get_attribute("data-phase") == "results")
    words = grid(browser).get_attribute("data-order")
    card = browser.find_elements(By.CSS_SELECTOR, "#grid .card")[2]
    post = card.get_attribute("data-id")
    card.find_element(By.CSS_SELECTOR, "button.like").click()
    wait.until(lambda b: f"like={post}" in b.current_url and grid(b).get_attribute("data-phase") == "results"
               and grid(b).get_attribute("data-order") != words)
    neighbours = grid(browser).get_attribute("data-order")
    assert post not in neighbours.split(",")
    assert neighbours == _order_of(live, json={"like": post, "limit": 24, "rerank": True})  # that post's neighbours
    # a picture dropped on the search box is uploaded and searched
    picture = httpx.get(f"{live.base}/v1/images/{post}", timeout=10).content
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
        document.getElementById("q").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    """, base64.b64encode(picture).decode())
    wait.until(lambda b: grid(b).get_attribute("data-phase") == "results"
               and grid(b).get_attribute("data-order") != neighbours)
    dropped = grid(browser).get_attribute("data-order")
    assert dropped.split(",")[0] == post  # its own post first: the same picture
    assert dropped == _order_of(live, files={"image": ("d.jpg", picture, "image/jpeg")},
                                data={"options": '{"limit": 24, "rerank": true}'})


def test_request_id_reaches_the_worker_logs(live) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{live.base}/v1/jobs", json={"query": "a blue square", "limit": 3},
                   headers={"X-Request-ID": "trace-me-4242"}, timeout=10)
    job = live.wait(r.json()["id"])
    assert job["status"] == "done" and job["request_id"] == "trace-me-4242"
    log = live.logs / "worker0.log"
    stack.wait_for(lambda: f"request_id=trace-me-4242 job_id={job['id']}" in log.read_text(), 10,
                   "the worker's log lines for the job")


@pytest.mark.browser
def test_the_explain_overlay_lines_up_with_each_picture(live, chromium) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium
    browser.get(live.base + "/")
    assert not browser.find_element(By.ID, "legend").is_displayed()
    browser.find_element(By.ID, "explain").click()
    assert browser.find_element(By.ID, "legend").is_displayed()
    browser.find_element(By.ID, "limit").send_keys("12")
    browser.find_element(By.ID, "q").send_keys("a red circle")
    browser.find_element(By.ID, "go").click()
    wait = WebDriverWait(browser, 90)
    wait.until(lambda b: b.find_element(By.ID, "grid").get_attribute("data-phase") == "results")
    wait.until(lambda b: b.execute_script(
        "const h = [...document.querySelectorAll('#grid img.heat')];"
        "return h.length > 0 && h.every(i => i.complete && i.naturalWidth > 0)"))
    boxes = browser.execute_script(
        "return [...document.querySelectorAll('#grid .card')].map(c => {"
        "  const r = (el) => { const b = el.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; };"
        "  return [r(c.querySelector('img:not(.heat)')), r(c.querySelector('img.heat'))]; })")
    assert boxes and all(pic == heat and pic[2] > 0 for pic, heat in boxes), boxes
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "explain-overlay.png"))
