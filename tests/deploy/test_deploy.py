"""The deployment files: the compose file against the Compose specification and what it must hold, the
Dockerfiles through hadolint and against pyproject's extras, the Modal app declared without network, the
Cloud Run services, and the Cloud Function and the worker's health port against a real Redis and worker."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from cli import stack
from tests.conftest import settings_env

pytestmark = pytest.mark.deploy
ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_the_compose_file_follows_the_compose_specification() -> None:
    from compose_spec import PyCompose

    # YAML's merge keys (`<<: *app`) resolved first, as Compose resolves them; then the specification's check
    compose = _compose()
    parsed = PyCompose.from_json(json.dumps(compose))  # ValueError on anything the specification does not allow
    assert sorted(parsed.service_names()) == sorted(compose["services"])
    compose["services"]["redis"]["healthchecks"] = compose["services"]["redis"].pop("healthcheck")
    with pytest.raises(ValueError):  # the check can fail: a key the specification does not know
        PyCompose.from_json(json.dumps(compose))


def test_the_compose_file_has_every_service_with_healthchecks_profiles_and_one_env() -> None:
    services = _compose()["services"]
    assert {"redis", "api", "worker-cpu", "worker-gpu", "worker-ingest", "beat", "flower", "prometheus"} <= set(services)
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["prometheus"]["profiles"] == ["metrics"]
    assert services["flower"]["profiles"] == ["flower"]  # it needs credentials .env.example leaves empty
    # named volumes: the images own /data, no chown (the replica's only under the sentinel profile)
    assert set(_compose()["volumes"]) == {"data", "redis-data", "redis-replica-data"}
    redis_ha = {n for n, svc in services.items() if svc.get("profiles") == ["sentinel"]}
    assert redis_ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}  # optional: `up` starts none
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    apps = [n for n in services if n not in {"redis", "prometheus"} | redis_ha]
    for name in apps:  # one shared .env, and the same Redis and data dir
        svc = services[name]
        assert svc["env_file"] == ".env", name
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0" and "data:/data" in svc["volumes"]
    for name in ("worker-cpu", "worker-gpu", "worker-ingest"):  # `--scale` needs no fixed name or host port
        assert "container_name" not in services[name] and "ports" not in services[name]
    assert "--appendonly" in services["redis"]["command"]  # queued jobs survive a Redis restart
    env_example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#")}
    assert {"IMGSEARCH_FLOWER_BASIC_AUTH", "VECTOR_STORE", "BLOB_STORE", "IMGSEARCH_SIGLIP_MODEL"} <= env_example


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    import subprocess

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([exe, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _extras(dockerfile: Path) -> set[str]:
    found = re.findall(r'pip install [^\n]*"\.\[([a-z,]+)\]"', dockerfile.read_text())
    assert found, f"{dockerfile.name} installs no extras of the product"
    return {e for group in found for e in group.split(",")}


def test_dockerfile_installs_match_the_extras() -> None:
    images = {p.name: _extras(p) for p in DOCKERFILES}
    for name, extras in images.items():
        assert extras <= set(EXTRAS), f"{name} names extras pyproject lacks: {extras - set(EXTRAS)}"
    assert "worker" not in images["api.Dockerfile"]  # the API image holds no model and no torch
    assert {"worker", "cpu"} <= images["worker.Dockerfile"] and "gpu" not in images["worker.Dockerfile"]
    assert {"worker", "gpu"} <= images["worker-gpu.Dockerfile"] and "cpu" not in images["worker-gpu.Dockerfile"]
    assert any(d.startswith("torch") for d in EXTRAS["worker"])
    gpu = (ROOT / "docker" / "worker-gpu.Dockerfile").read_text()
    assert "engines build" in (ROOT / "docker" / "worker-gpu-start.sh").read_text() and "worker-gpu-start" in gpu


def test_every_image_holds_every_package_of_the_product() -> None:
    """One list for every image: .dockerignore's allowlist, and each Dockerfile copies the context whole."""
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["packages"]
    assert set(packages) <= allowed and "cli" in packages
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "\nCOPY . .\n" in text and "ARG BASE_IMAGE=" in text and "\nUSER imgsearch\n" in text, dockerfile.name


def test_the_api_and_workers_never_validate_flowers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import settings

    monkeypatch.setenv("IMGSEARCH_FLOWER_BASIC_AUTH", "")  # .env.example as shipped
    settings.clear_cached()
    try:
        settings.get_api_settings(), settings.get_worker_settings(), settings.get_ingest_settings()
        with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH"):
            settings.get_flower_settings()
    finally:
        settings.clear_cached()


def test_the_api_runs_without_the_worker_extra() -> None:
    """What the slim image lacks, made unimportable here: the API still starts and answers."""
    import subprocess

    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'faiss', 'onnx', 'onnxruntime', 'tokenizers', 'safetensors'):\n"
            "    sys.modules[m] = None\n"
            "from fastapi.testclient import TestClient\n"
            "from api.main import create_app\n"
            "from pipeline.settings import Settings\n"
            "with TestClient(create_app(Settings(redis_url='redis://127.0.0.1:1/0'))) as c:\n"
            "    assert c.get('/healthz').status_code == 200\n"
            "    assert c.post('/v1/jobs', json={'query': 'x'}).status_code == 503\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_modal_app_declares_its_functions_without_network() -> None:
    import modal

    modal_app = _load(ROOT / "deploy" / "modal_app.py", "modal_app")

    assert isinstance(modal_app.app, modal.App) and modal_app.app.name == "imgsearch"
    assert isinstance(modal_app.Search, modal.Cls)  # the GPU class, its engines loaded in @modal.enter
    assert isinstance(modal_app.web, modal.Function)  # the web endpoint with POST /search


def test_the_modal_endpoint_has_production_defaults_and_a_rate_limit() -> None:
    """Production by default (keys required), and a rate limit that can't be on with nowhere to keep its buckets:
    off only by IMGSEARCH_RATE_LIMIT_PER_MIN=0, said on purpose."""
    from pipeline.settings import ApiSettings

    modal_app = _load(ROOT / "deploy" / "modal_app.py", "modal_app")
    text = (ROOT / "deploy" / "modal_app.py").read_text()
    assert '"IMGSEARCH_ENV": os.environ.get("IMGSEARCH_ENV", "production")' in text and modal_app.MAX_GPUS >= 1
    with pytest.raises(RuntimeError, match="IMGSEARCH_LIMITS_REDIS_URL"):
        modal_app.limits_store(ApiSettings())  # the default: 120 a minute
    assert modal_app.limits_store(ApiSettings(limits={"rate_limit_per_min": 0})) is None
    assert modal_app.limits_store(ApiSettings(limits_redis_url="redis://127.0.0.1:1/0")) is not None


def test_cloud_run_services_use_the_images_and_probe_health() -> None:
    api = yaml.safe_load((ROOT / "deploy" / "cloudrun" / "api.yaml").read_text())
    worker = yaml.safe_load((ROOT / "deploy" / "cloudrun" / "worker-gpu.yaml").read_text())
    (a,) = api["spec"]["template"]["spec"]["containers"]
    (w,) = worker["spec"]["template"]["spec"]["containers"]
    assert a["image"].endswith("/api:latest") and a["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert w["image"].endswith("/worker-gpu:latest") and "--health-port" in w["command"]
    assert w["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["spec"]["template"]["metadata"]["annotations"]["run.googleapis.com/cpu-throttling"] == "false"


def test_the_cloud_run_api_runs_in_production_with_keys_and_trusted_proxies(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The manifest's environment is one the API's production checks accept: keys (from Secret Manager), the
    Google front end as the one proxy believed; and the API refuses it without the keys."""
    from pipeline.admission.callers import hash_key
    from pipeline.settings import ApiSettings

    api = yaml.safe_load((ROOT / "deploy" / "cloudrun" / "api.yaml").read_text())
    (a,) = api["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in a["env"]}
    assert env["IMGSEARCH_ENV"]["value"] == "production" and env["IMGSEARCH_BEHIND_PROXY"]["value"] == "true"
    assert "secretKeyRef" in env["IMGSEARCH_API_KEYS"]["valueFrom"]  # never a literal in the manifest
    for name, e in env.items():
        if "value" in e:
            monkeypatch.setenv(name, str(e["value"]))
    with pytest.raises(ValueError, match="IMGSEARCH_API_KEYS"):
        ApiSettings()
    monkeypatch.setenv("IMGSEARCH_API_KEYS", json.dumps([{"name": "app", "sha256": hash_key("isk_x")}]))
    s = ApiSettings()
    assert s.env == "production" and s.trusted_proxies and s.api_keys


def _load(path: Path, name: str) -> Any:
    """A deploy/ file as a module (deploy/ is folders of platform files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cloud_function() -> Any:
    return _load(ROOT / "deploy" / "cloudfunctions" / "main.py", "cf_main")


@pytest.mark.integration
def test_the_cloud_function_answers_post_search_through_a_worker(redis_server, store_dir, tiny_models, tmp_path,  # type: ignore[no-untyped-def]
                                                                  monkeypatch) -> None:
    db = 9
    redis.Redis.from_url(redis_server.url(db)).flushdb()
    env = settings_env(store_dir, tiny_models, redis_server.url(db))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from pipeline.settings import clear_cached

    clear_cached()
    port = stack.free_port()  # the worker answers GET /healthz there, as Cloud Run's probe asks it
    worker_cli = [sys.executable, "-m", "cli.main", "worker", "--health-port", str(port), "--name", "probed@%h"]
    worker = stack._spawn("probed", worker_cli, env, tmp_path / "worker.log")
    cf = _cloud_function()
    try:
        stack.wait_for(lambda: stack.live_workers(redis_server.url(db)) >= 1, 120, "a worker")
        status, body = cf.handle({"query": "a red circle", "limit": 3})
        assert status == 200 and len(body["results"]) == 3 and isinstance(body["results"][0][1], float)
        status, body = cf.handle({"query": ""})
        assert status == 422 and body["error"]["code"] == "invalid_request"

        class Request:
            method = "POST"

            def get_json(self, silent: bool = False) -> dict[str, Any]:
                return {"query": "a blue square", "limit": 2}

        text, status, headers = cf.search(Request())
        assert status == 200 and headers["Content-Type"] == "application/json" and '"results"' in text

        stack.wait_for(lambda: stack.http_ok(f"http://127.0.0.1:{port}/healthz"), 120,
                       "the worker's health port to say ready")
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=2).status_code == 503
    finally:
        worker.stop()
        if "celery" in cf._clients:
            cf._clients["celery"].close()
        clear_cached()
    monkeypatch.setenv("IMGSEARCH_REDIS_URL", "redis://127.0.0.1:1/0")
    clear_cached()
    cf._clients.clear()
    try:
        status, body = cf.handle({"query": "a red circle"})
    finally:
        clear_cached()
    assert status == 503 and body["error"]["code"] == "unavailable"


def test_the_cloud_function_refuses_a_filter_300_deep_with_422(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The nesting is checked by a loop before any walk recurses: a 422, not an uncaught RecursionError (a 500).
    Refused before Redis is asked anything (none listens at this address)."""
    from pipeline.settings import clear_cached

    monkeypatch.setenv("IMGSEARCH_REDIS_URL", "redis://127.0.0.1:1/0")
    clear_cached()
    cf = _cloud_function()
    deep: dict[str, Any] = {"subreddit": "memes"}
    for _ in range(300):
        deep = {"$or": [deep]}
    try:
        status, body = cf.handle({"query": "a cat", "filter": deep})

        class Request:
            method = "POST"

            def get_json(self, silent: bool = False) -> Any:
                return json.loads('{"query": "x", "filter": ' + '{"$and": [' * 5000 + "{}" + "]}" * 5000 + "}")

        text, status2, _ = cf.search(Request())
    finally:
        if "celery" in cf._clients:
            cf._clients["celery"].close()
        clear_cached()
    assert status == 422 and body["error"]["code"] == "invalid_request" and "deep" in body["error"]["message"]
    assert status2 == 422 and json.loads(text)["error"]["code"] == "invalid_request"
