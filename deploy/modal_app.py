"""imgsearch on Modal: a GPU class that holds the engines (built once per GPU type into a Volume) and a web
endpoint with the API's ``POST /search`` contract. No Redis: Modal's own queue and autoscaling stand in for
Celery, and each container batches its concurrent queries' model calls as a worker does.

    modal volume create imgsearch-data            # the stores and the engines live here
    modal volume put imgsearch-data data/ /        # an ingested data dir (vectors/, blobs/), or use Pinecone/GCS
    modal secret create imgsearch IMGSEARCH_API_KEYS='[...]' IMGSEARCH_LIMITS_REDIS_URL=rediss://... \
        PINECONE_API_KEY=... IMGSEARCH_GCS_BUCKET=...
    modal deploy deploy/modal_app.py              # prints the endpoint's URL

Settings come from the ``imgsearch`` secret and the environment below (IMGSEARCH_*; see pipeline/settings.py).
Production defaults: ``IMGSEARCH_ENV=production``, so the endpoint refuses to start without API keys, and the
rate limit (120 a minute per key, as the API's) is on: it needs a Redis for its buckets
(``IMGSEARCH_LIMITS_REDIS_URL``), and the endpoint refuses to start without one unless
``IMGSEARCH_RATE_LIMIT_PER_MIN=0`` turns the limit off on purpose. ``max_containers`` caps what a flood can
spend on GPUs whatever the limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import modal

ROOT = Path(__file__).resolve().parents[1]
GPU = os.environ.get("IMGSEARCH_MODAL_GPU", "L4")
DATA = "/data"

image = (
    modal.Image.debian_slim(python_version="3.11")
    # PyPI's Linux torch wheel is the CUDA build: what a GPU container wants
    .pip_install_from_pyproject(str(ROOT / "pyproject.toml"), optional_dependencies=["worker", "gpu", "pinecone", "gcs"])
    .env({"IMGSEARCH_DATA_DIR": DATA, "IMGSEARCH_DEVICE": "cuda",
          "IMGSEARCH_ENGINE_BACKEND": os.environ.get("IMGSEARCH_ENGINE_BACKEND", "tensorrt"),
          "IMGSEARCH_ENGINE_PRECISION": os.environ.get("IMGSEARCH_ENGINE_PRECISION", "fp16"),
          "IMGSEARCH_CACHE_RESULTS_TTL_S": "0",  # no Redis here: nothing to cache results in
          "IMGSEARCH_ENV": os.environ.get("IMGSEARCH_ENV", "production")})  # keys required (pipeline.settings)
    .add_local_python_source("api", "pipeline", "workers", "engines")
)
volume = modal.Volume.from_name("imgsearch-data", create_if_missing=True)
app = modal.App("imgsearch", image=image, secrets=[modal.Secret.from_name("imgsearch", required_keys=[])])


MAX_GPUS = int(os.environ.get("IMGSEARCH_MODAL_MAX_GPUS", "4"))  # the most GPU containers a flood can start


@app.cls(gpu=GPU, volumes={DATA: volume}, scaledown_window=300, timeout=900, max_containers=MAX_GPUS)
@modal.concurrent(max_inputs=16)  # concurrent queries share batched model calls (pipeline.search.batching)
class Search:
    @modal.enter()
    def load(self) -> None:
        """Once per container: build this GPU type's engines into the Volume if they are not there yet (the
        first container of a GPU type pays it, never a request), then load them and warm up."""
        from engines.build import build_engines
        from engines.registry import load_engines, preflight
        from pipeline.errors import ImgSearchError
        from pipeline.search.searcher import Searcher
        from pipeline.settings import get_worker_settings
        from pipeline.stores.bundle import Stores

        s = get_worker_settings()
        try:
            preflight(s)
        except ImgSearchError:
            build_engines(s, s.engines.backend, s.engines.precision)
            volume.commit()
        engines = load_engines(s)
        self.searcher = Searcher.over(s, engines.text, engines.reranker, Stores.build(s, caches=False))
        self.searcher.warm_up()

    @modal.method()
    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        from api.schemas import SearchRequest
        from pipeline.types import SearchParams

        req = SearchRequest.model_validate(body)
        params = SearchParams.model_validate(req.model_dump(exclude={"deadline_s"}, exclude_unset=True))
        outcome = self.searcher.search(params)
        return {"results": [r.model_dump(mode="json") for r in outcome.results],
                "degraded": bool(outcome.not_reranked), "timings": outcome.timings}


def limits_store(s: Any) -> Any:
    """The rate limit's Redis (``IMGSEARCH_LIMITS_REDIS_URL``), or None where the limit is off on purpose
    (``IMGSEARCH_RATE_LIMIT_PER_MIN=0``). A limit with nowhere to keep its buckets is refused at start: the
    endpoint would be open to any rate (the limit is on by default, as the API's)."""
    if s.limits.rate_limit_per_min <= 0:
        return None
    if not s.limits_redis_url:
        raise RuntimeError("the Modal endpoint's rate limit (IMGSEARCH_RATE_LIMIT_PER_MIN) needs a Redis for its "
                           "buckets: set IMGSEARCH_LIMITS_REDIS_URL, or IMGSEARCH_RATE_LIMIT_PER_MIN=0 to serve "
                           "without a limit")
    from pipeline.jobs.store import aconnect

    return aconnect(s.limits_redis_url, 0.5, sentinel_password=s.redis_sentinel_password)


@app.function()
@modal.asgi_app()
def web() -> Any:
    """``POST /search`` as the API answers it (api.contract): ``{"results": [[post_id, score], ...]}``, after the
    API's admission (keys, query and filter checks, the rate limit in IMGSEARCH_LIMITS_REDIS_URL's Redis: Modal's
    own queue stands in for ours, so there is no queue or in-flight count to cap)."""
    from fastapi import FastAPI, Request
    from pydantic import ValidationError

    from api import auth, contract, errors
    from api.limits import BodyLimit
    from api.schemas import SearchRequest
    from pipeline.admission.admit import Admission, validate
    from pipeline.errors import InvalidRequest
    from pipeline.settings import get_api_settings
    from pipeline.types import Result

    s = get_api_settings()
    limits = limits_store(s)
    admission = Admission(s, None, limits)
    api = FastAPI(title="imgsearch on Modal")
    errors.install(api)  # errors as the API gives them: {"error": {"code", "message"}}
    api.add_middleware(BodyLimit, max_bytes=s.limits.max_body_bytes)  # the API's body cap, 413 in the same shape

    @api.post("/search")
    async def search(body: SearchRequest, request: Request) -> Any:
        caller = auth.caller(admission, request)
        if limits is not None:
            await admission.limit(caller)
        validate(s, *contract.params_of(body))
        try:
            out = await Search().search.remote.aio(body.model_dump(exclude_unset=True))
        except ValidationError as exc:  # what the GPU side refused (it validates too)
            raise InvalidRequest(str(exc)) from None
        return contract.results_body([Result.model_validate(r) for r in out["results"]])

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return api
