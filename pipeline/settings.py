"""All settings, read from the environment in one place: one class per deployable on a shared base, the settings
that belong together in groups.

``SharedSettings`` holds what every process needs (Redis, the stores, the jobs' bounds, and the rules for fetching
a picture, ``fetch``); ``ApiSettings`` adds the API's (keys, proxies, ``limits``), ``WorkerSettings`` a search
worker's (``engines``, ``caches``, batching) and ``IngestSettings`` ingest's (sources, ``reddit``, near-duplicates)
on top of the worker's (ingest embeds with the same engines). ``Settings`` is all of them, for the processes that
start every deployable: the CLI and the demo. Each process reads only its own class, so a worker never needs the
API's keys and the API never sees a Reddit secret; env=production checks each class's own unsafe values.

A group's field is set by ``IMGSEARCH_<GROUP>__<FIELD>`` (``IMGSEARCH_LIMITS__RATE_LIMIT_PER_MIN=0``) or the whole
group as JSON (``IMGSEARCH_FETCH='{"max_bytes": 1000000}'``). The flat names the settings had before the groups
(``IMGSEARCH_RATE_LIMIT_PER_MIN``) keep working: ``MIGRATION`` maps each to its group and field, read below the new
names (a new name set too wins), and the same names work as keyword arguments (``Settings(rate_limit_per_min=0)``)."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError


class ApiKey(BaseModel):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    admin: bool = False
    monitor: bool = False  # may read /metrics and /readyz's details (Prometheus's key); admin keys may too


def _env(name: str, *legacy: str) -> AliasChoices:
    # Our prefixed name first, then the original service's bare variable, so old deployments keep working.
    return AliasChoices(f"IMGSEARCH_{name}", *legacy)


class _Group(BaseModel):
    # a refused value is named, never shown, as in the settings classes
    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)


class FetchRules(_Group):
    """How a picture is fetched from the internet and decoded: ingest's downloads, and the API's ``image_url``
    queries (which tighten the time, the size and the tries: ``pipeline.search.image_query.fetch``). A worker decodes a
    query's picture under ``max_pixels`` too."""

    concurrency: int = Field(8, ge=1, le=256)  # downloads in flight
    timeout_s: float = Field(20.0, gt=0)  # per connect and per read of a download
    retries: int = Field(2, ge=0)  # per download, on timeouts, 429 and 5xx
    max_bytes: int = Field(20 << 20, ge=1)  # a larger download is refused (the bytes read count)
    # a download's whole time, every try and redirect included: a slow host can't hold a run (and its lock)
    deadline_s: float = Field(60.0, gt=0)
    # ...and its slowest average rate once it has had min_rate_after_s: a drip is cut off early
    min_bytes_per_s: int = Field(16_384, ge=0)
    min_rate_after_s: float = Field(5.0, ge=0)
    # loopback, private, link-local and other non-public addresses are never fetched from, except inside these
    # networks (CIDRs): for a test's stand-in ("127.0.0.1/32") or a private mirror; keep each as narrow as that
    allow_networks: list[str] = []
    # the only ports a picture is fetched from, redirects included: a URL or a redirect naming another (a Redis's
    # 6379 on a network allowed above) is refused; add a test stand-in's port here, not a range
    allow_ports: list[int] = [80, 443]
    max_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard (width x height)
    # every download's User-Agent, and Reddit's listings'
    user_agent: str = "linux:imgsearch-ingest:0.1 (text-to-image search; by /u/imgsearch)"
    # hosts whose links are taken as direct images (gallery images come from Reddit's own media metadata)
    # ...and the only hosts an image is fetched from, redirects included (a gallery's images too)
    image_hosts: list[str] = ["i.redd.it", "i.imgur.com", "imgur.com", "preview.redd.it"]
    max_wait_s: float = Field(120.0, ge=0)  # the longest Retry-After / rate-limit reset honoured (Reddit's too)

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        for net in nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"fetch.allow_networks: {net!r} is not an address or CIDR") from None
        return nets

    @field_validator("allow_ports")
    @classmethod
    def _ports(cls, ports: list[int]) -> list[int]:
        if any(not 1 <= p <= 65535 for p in ports):
            raise ValueError("fetch.allow_ports: each a TCP port, 1 to 65535")
        return ports


class Limits(_Group):
    """What the API lets one request, one caller and one API process have: it answers 413, 429 or 503 past them."""

    rate_limit_per_min: int = Field(120, ge=0)  # per API key, or per client address without keys; 0: off
    rate_limit_burst: int = Field(30, ge=1)
    max_jobs_in_flight: int = Field(32, ge=0)  # per caller: queued or running; 0: no cap
    max_queue_length: int = Field(2000, ge=0)  # search jobs waiting; past it, new ones get 503 at once (0: no cap)
    max_query_chars: int = 512
    max_body_bytes: int = Field(16_384, ge=256)
    # an upload's cap (POST /v1/jobs as multipart/form-data; JSON bodies keep max_body_bytes), and an image_url
    # query's download's
    max_upload_bytes: int = Field(10 << 20, ge=1024)
    # event streams (GET /v1/jobs/{id}/events): per caller at once (429 past it; counted in the limits' Redis,
    # so across API processes), in all on one API process (503 past it), and the longest one lasts (the client
    # reconnects with Last-Event-ID); 0: no cap
    max_streams_per_caller: int = Field(8, ge=0)
    max_streams: int = Field(200, ge=1)
    stream_max_s: float = Field(300.0, gt=0)


class Engines(_Group):
    """The models a worker runs and the engines that run them."""

    siglip_model: str = "google/siglip2-base-patch16-512"
    blip_model: str = "Salesforce/blip-itm-large-coco"
    # auto (default): chosen at worker start from this machine's CPU features or GPU, confirmed by a short timed
    # pass, cached per host and model version (engines/auto.py); else torch | onnxruntime | tensorrt
    backend: str = "auto"
    precision: str = "auto"  # auto | torch: fp32 bf16 fp16 int8 (CPU); onnxruntime: fp32 int8; tensorrt: fp16 fp32
    dir: Path | None = None  # built engines; default {data_dir}/engines
    device: str = "cpu"
    text_max_tokens: int = 64
    # BLIP ITM was trained on captions of at most 35 tokens ([CLS] and [SEP] included); longer queries are cut there
    blip_max_tokens: int = Field(35, ge=2, le=512)
    # auto: BLIP's cross-attention reassociated wherever that is cheaper (exact; engines/crossattn.py); plain:
    # transformers' own forward, for comparison and debugging
    blip_cross_attention: Literal["auto", "plain"] = "auto"
    # the torch backend's rerank pass compiled ahead of time for this host (engines/compiled.py; built by `imgsearch
    # engines build --backend torch`): auto uses it where built, on requires it, off runs the eager pass
    compiled: Literal["auto", "on", "off"] = "auto"
    # the query encoder's and the rerank's linear weights packed once for oneDNN where that pays (bf16 on a CPU,
    # engines/packed.py): faster products for a second copy of those weights (about 370 MB for SigLIP and BLIP base)
    packed_weights: Literal["auto", "off"] = "auto"
    # the threads one operator may use, in torch and in ONNX Runtime's sessions alike; 0: each library's default
    intra_op_threads: int = Field(0, ge=0)


class Caches(_Group):
    """A search worker's caches (Redis at redis_url; an outage slows search, never fails it)."""

    results_ttl_s: int = Field(300, ge=0)  # 0 turns the query result cache off
    # the Redis feature cache pays off in front of a remote blob store; a local folder (page-cached) answers a
    # query's 32 x 1.2 MB features faster than Redis does (bench.stores), so "auto" uses it for remote ones only
    features: Literal["auto", "on", "off"] = "auto"
    features_ttl_s: int = Field(3600, ge=0)
    features_max: int = Field(20_000, ge=0)  # feature entries kept in Redis (about 1.2 MB each at full size)
    local_mb: int = Field(256, ge=0)  # each worker's in-process feature LRU


class Reddit(_Group):
    """Ingest's Reddit source: app-only OAuth when both credentials are set, the public JSON listings otherwise."""

    client_id: str | None = None
    client_secret: SecretStr | None = None
    # subreddit -> minimum score, as the original service had them (JSON in the environment)
    subreddits: dict[str, int] = {"memes": 1000, "dankmemes": 1000, "me_irl": 800, "meirl": 800}
    sort: Literal["top", "hot", "new", "rising", "controversial"] = "top"
    period: Literal["hour", "day", "week", "month", "year", "all"] = "day"
    page_size: int = Field(100, ge=1, le=100)
    max_pages: int = Field(10, ge=1)  # per subreddit and run (Reddit serves about 1,000 items a listing)
    public_url: str = "https://www.reddit.com"
    oauth_url: str = "https://oauth.reddit.com"
    token_url: str = "https://www.reddit.com/api/v1/access_token"
    # a listing's (or token's) answer is read up to this many bytes (decoded), then refused: a 100-post page of
    # raw JSON is well under 1 MiB
    max_listing_bytes: int = Field(8 << 20, ge=4096)


def _moved(group: str, fields: str, prefix: str = "") -> dict[str, tuple[str, str]]:
    return {f"IMGSEARCH_{prefix}{f}".upper(): (group, f) for f in fields.split()}


# The flat names before the groups -> (group, field). The environment's old names keep working (below the new
# ones: a new name set too wins), and so do the same names, lower-case and without IMGSEARCH_, as keyword arguments.
MIGRATION: dict[str, tuple[str, str]] = {
    **_moved("fetch", "concurrency timeout_s retries max_bytes deadline_s min_bytes_per_s min_rate_after_s "
                      "allow_networks allow_ports max_pixels", prefix="ingest_"),
    "IMGSEARCH_REDDIT_USER_AGENT": ("fetch", "user_agent"),
    "IMGSEARCH_REDDIT_IMAGE_HOSTS": ("fetch", "image_hosts"),
    "IMGSEARCH_REDDIT_MAX_WAIT_S": ("fetch", "max_wait_s"),
    **_moved("limits", "rate_limit_per_min rate_limit_burst max_jobs_in_flight max_queue_length max_query_chars "
                       "max_body_bytes max_upload_bytes max_streams_per_caller max_streams stream_max_s"),
    **_moved("engines", "siglip_model blip_model text_max_tokens blip_max_tokens blip_cross_attention device"),
    "IMGSEARCH_ENGINE_BACKEND": ("engines", "backend"),
    "IMGSEARCH_ENGINE_PRECISION": ("engines", "precision"),
    "IMGSEARCH_ENGINE_DIR": ("engines", "dir"),
    "IMGSEARCH_TORCH_THREADS": ("engines", "intra_op_threads"),
    **_moved("caches", "results_ttl_s features features_ttl_s features_max local_mb", prefix="cache_"),
    **_moved("reddit", "client_id client_secret subreddits sort period page_size max_pages public_url oauth_url "
                       "token_url max_listing_bytes", prefix="reddit_"),
    "REDDIT_CLIENT_ID": ("reddit", "client_id"),  # the original service's bare names
    "REDDIT_CLIENT_SECRET": ("reddit", "client_secret"),
}
# the same as keyword arguments: Settings(rate_limit_per_min=0) is Settings(limits={"rate_limit_per_min": 0})
_OLD_KEYWORDS = {old.removeprefix("IMGSEARCH_").lower(): where for old, where in MIGRATION.items()
                 if old.startswith("IMGSEARCH_")}


def _group_field(settings_cls: type[BaseSettings], group: str, name: str) -> FieldInfo | None:
    field = settings_cls.model_fields.get(group)
    model = field.annotation if field is not None else None
    return model.model_fields[name] if isinstance(model, type) and issubclass(model, _Group) else None


class _OldNames(PydanticBaseSettingsSource):
    """The environment's flat names (``MIGRATION``) of the groups this class has, as nested values; read below the
    new names' source, so a new name set too wins."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads MIGRATION's names

    def __call__(self) -> dict[str, Any]:
        environ = {k.upper(): v for k, v in os.environ.items()}  # names match in any case, as the new ones do
        found: dict[str, dict[str, Any]] = {}
        for old, (group, name) in MIGRATION.items():
            field = _group_field(self.settings_cls, group, name)
            if field is None or old not in environ or name in found.get(group, {}):
                continue
            try:
                value = self.prepare_field_value(name, field, environ[old], False)
            except ValueError:  # the value is not shown: it may be a secret
                raise SettingsError(f"{old}: not valid JSON") from None
            found.setdefault(group, {})[name] = value
        return found


class _OldKeywords(PydanticBaseSettingsSource):
    """Keyword arguments by their flat names, folded into their groups (a group's own value given too wins)."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.init = init

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ folds the init source's answer

    def __call__(self) -> dict[str, Any]:
        values = dict(self.init())
        for key in [k for k in values if k in _OLD_KEYWORDS]:
            group, name = _OLD_KEYWORDS[key]
            if group not in self.settings_cls.model_fields:
                continue  # extra="ignore", as before: a class without the group never read the name
            given = values.get(group) or {}
            given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else dict(given)
            values[group] = {name: values.pop(key), **given}
        return values


# hide_input_in_errors: a refused value is named, never shown (the input holds every IMGSEARCH_* variable, secrets too)
_CONFIG = SettingsConfigDict(env_prefix="IMGSEARCH_", env_nested_delimiter="__", extra="ignore", populate_by_name=True,
                             hide_input_in_errors=True)
_DEFAULT_PASSWORDS = {"password", "admin", "flower", "changeme", "secret", "123456", "imgsearch"}


class SharedSettings(BaseSettings):
    """What every deployable reads (env prefix ``IMGSEARCH_``)."""

    model_config = _CONFIG

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # keyword arguments, then the new names, then MIGRATION's old names
        return (_OldKeywords(settings_cls, init_settings), env_settings, _OldNames(settings_cls), dotenv_settings,
                file_secret_settings)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update``; a group's value may be a dict of the fields it changes
        (``update={"engines": {"backend": "torch"}}``). A name that is no setting is refused, not set on the side
        (an old flat name, or a group's field given at the top)."""
        changes = dict(update or {})
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no setting {', '.join(unknown)} (see MIGRATION for the "
                             "groups' fields)")
        for name, value in changes.items():
            group = getattr(self, name)
            if isinstance(group, _Group) and isinstance(value, Mapping):
                if extra := sorted(set(value) - set(type(group).model_fields)):
                    raise ValueError(f"{name} has no field {', '.join(extra)}")
                changes[name] = group.model_copy(update=value, deep=deep)
        return super().model_copy(update=changes, deep=deep)

    # --- services ---
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL", "REDIS_URL"))
    search_queue: str = "search"
    embed_queue: str = "embed"  # a fanned-out ingest run's batches, for any worker that serves it
    ingest_queue: str = "ingest"  # its own queue: a run never holds a search worker
    redis_socket_timeout_s: float = 5.0
    # redis_url may name a Sentinel group: sentinel://h1:26379;h2:26379;h3:26379/<master name>/<db> (every client,
    # the queue's too, finds the primary through them and again after a failover); this is the Sentinels' own
    # password, if they have one (the data nodes' goes in the URL, as in redis://)
    redis_sentinel_password: SecretStr | None = None
    # acknowledged means replicated: a job's creation and its end wait (WAIT) for this many replicas to confirm
    # them, up to replica_wait_ms; fewer in time and the creation is undone and refused (503 not_replicated).
    # 0: no waiting (one Redis with no replica, or a managed one that replicates synchronously)
    replica_acks: int = Field(0, ge=0, le=16)
    replica_wait_ms: int = Field(50, ge=1, le=10_000)
    limits_redis_url: str | None = None  # where buckets live; default redis_url
    # this host's name in heartbeats, jobs and the ledger's lease; empty: the machine's (a test runs two "hosts")
    host_name: str = Field("", max_length=200)

    # --- storage ---
    data_dir: Path = Path("data")
    vector_store: str = Field("local", validation_alias=_env("VECTOR_STORE", "VECTOR_STORE"))
    # at 1M x 768 (bench.stores): recall@32 1.00 on data structured at every scale, 0.91 on the isotropic stress
    # data, p50 3.5 to 4 ms; each doubling of the lists scanned costs about 1.7x the time
    local_nprobe: int = Field(16, ge=1, le=65536)  # inverted lists the embedded index scans per query
    blob_store: str = Field("local", validation_alias=_env("BLOB_STORE", "BLOB_STORE"))
    namespace: str = ""
    pinecone_api_key: SecretStr | None = Field(None, validation_alias=_env("PINECONE_API_KEY", "PINECONE_API_KEY"))
    pinecone_index_name: str | None = Field(None, validation_alias=_env("PINECONE_INDEX_NAME", "PINECONE_INDEX_NAME"))
    google_cloud_project: str | None = Field(
        None, validation_alias=_env("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_PROJECT"))
    pinecone_host: str | None = None  # the index's data-plane host; skips the name lookup
    gcs_bucket: str | None = None
    gcs_prefix: str = ""
    store_timeout_s: float = Field(10.0, gt=0)  # per call to a vector or blob store
    store_retries: int = Field(3, ge=0)
    # the ingest ledger (items, runs, the run lease, the near-duplicate index; a takedown writes it too): empty for
    # SQLite in ingest_dir (one box); postgresql://user:password@host/db for one ledger shared by every host
    ledger_url: SecretStr | None = Field(None, validation_alias=_env("LEDGER_URL"))
    # one run at a time across every host: a lease row in the ledger, renewed every third of this
    ingest_lease_ttl_s: float = Field(30.0, ge=1)
    # thumbnails (`GET /v1/images/{id}?size=`) come in these sizes only, each made once by the API and kept in the
    # blob store under the post's folder (a takedown deletes every size it finds there, whatever this list says)
    thumbnail_sizes: list[int] = [128, 256, 512]

    # --- fetching pictures from the internet: ingest's downloads and the API's image_url queries ---
    fetch: FetchRules = FetchRules()

    # --- a search's bounds and defaults (the API checks requests against them, workers apply them) ---
    top_k: int = Field(32, ge=1, le=1000)
    rerank_k: int = Field(32, ge=0, le=1000)
    limit: int = Field(32, ge=1, le=100)

    # --- jobs ---
    job_ttl_s: int = Field(3600, ge=10)
    job_deadline_s: float = Field(60.0, gt=0)  # also the cap on a request's own deadline_s
    events_maxlen: int = Field(256, ge=16)
    visibility_timeout_s: int = Field(0, ge=0)  # 0: derived from the job deadline
    # the API ends jobs still open this long past their deadline (every reaper_interval_s; 0: no reaper)
    reaper_grace_s: float = Field(5.0, ge=0)
    reaper_interval_s: float = Field(5.0, ge=0)
    # ...and sends again, before their deadline, jobs stranded: still queued this long with the queue empty (the
    # message was lost with a Redis restart), or running on a worker whose heartbeat is gone (the worker died)
    rescue_after_s: float = Field(10.0, gt=0)
    rescue_max: int = Field(2, ge=0)  # times one job is sent again
    heartbeat_ttl_s: int = Field(15, ge=2)

    # --- logging ---
    log_level: str = "INFO"
    log_json: bool = False

    env: Literal["development", "production"] = "development"

    @model_validator(mode="after")
    def _check_shared(self) -> "SharedSettings":
        if self.rerank_k > self.top_k:
            raise ValueError(f"rerank_k ({self.rerank_k}) cannot exceed top_k ({self.top_k})")
        if any(not 16 <= n <= 1024 for n in self.thumbnail_sizes):
            raise ValueError("thumbnail_sizes: each between 16 and 1024 pixels")
        from pipeline.redisconn import is_sentinel, parse_sentinel

        for name, url in (("redis_url", self.redis_url), ("limits_redis_url", self.limits_redis_url)):
            if url and is_sentinel(url):
                try:
                    parse_sentinel(url)
                except ValueError as exc:  # its text names the form wanted, never the URL (it may hold a password)
                    raise ValueError(f"{name}: {exc}") from None
        return self

    @property
    def visibility_timeout(self) -> int:
        """Seconds before an unacknowledged job is redelivered: past any job's deadline, so a live job is
        never run twice, but short enough that a dead worker's job is picked up again."""
        return self.visibility_timeout_s or int(self.job_deadline_s * 2 + 30)

    @property
    def vector_dir(self) -> Path:
        return self.data_dir / "vectors"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def ingest_dir(self) -> Path:
        return self.data_dir / "ingest"

    @property
    def host(self) -> str:
        return self.host_name or socket.gethostname()


class _ApiFields(SharedSettings):
    # --- keys, the limits (413, 429 and 503 past them), proxies ---
    # API keys as SHA-256 hashes (`imgsearch keys new` makes one): none configured, the API is open (local use)
    # and its admin routes closed; configured, every /v1 route and /search need a key, admin routes an admin's
    api_keys: list[ApiKey] = []
    limits: Limits = Limits()
    trusted_proxies: list[str] = []  # addresses or CIDRs whose X-Forwarded-For is believed
    behind_proxy: bool = False  # the API is reached through a proxy or load balancer (production needs trusted_proxies)
    search_wait_s: float = Field(30.0, gt=0)  # how long POST /search waits for its job

    # --- search by image: {"like": id}, an uploaded picture, {"image_url": ...} ---
    # an image_url query's download: its whole time (every try and redirect); the hosts, the networks and the pixel
    # cap are the fetching rules (fetch), the size cap limits.max_upload_bytes
    image_query_fetch_s: float = Field(10.0, gt=0)
    # a query picture's decode may take this much memory: its pixel cap follows from the format's decoded mode
    # (pipeline.search.image_query.pixel_cap: an RGBA PNG or WebP gets about budget / 7 bytes, a JPEG is counted at the
    # size its draft mode decodes to); at most fetch.max_pixels in any case
    image_query_decode_mib: int = Field(64, ge=8)
    # the API's own thread lanes (api.lanes), none of them anyio's shared 40: image_url downloads, picture decodes
    # (each at most image_query_decode_mib: 2 x 64 MiB), and Celery's sends; a call waits lane_wait_s at most
    # for a place, then gets 503 "busy", so slow image hosts never hold a thread a text query needs
    image_fetch_threads: int = Field(8, ge=1, le=64)
    image_decode_threads: int = Field(2, ge=1, le=16)
    queue_send_threads: int = Field(8, ge=1, le=64)
    blob_io_threads: int = Field(8, ge=1, le=64)  # image and thumbnail reads and writes of the blob store
    lane_wait_s: float = Field(2.0, gt=0)

    # --- the API's Redis pools, images ---
    # the API's Redis connections: requests share redis_max_connections, streams and POST /search's waits
    # their own pool (limits.max_streams + 32), so a flood of streams never starves the other routes, and the API
    # never holds more of Redis's clients (which it shares with the workers) than these two
    redis_max_connections: int = Field(64, ge=4)
    # images need a key when keys are configured, unless this makes them public (an <img> tag sends no key)
    public_images: bool = False

    @property
    def stream_pool_size(self) -> int:
        """The API's Redis connections for event streams and POST /search's waits."""
        return self.limits.max_streams + 32


class ApiSettings(_ApiFields):
    """The API's settings (and its other edges': the Cloud Function, the Modal endpoint). With ``env=production``
    they refuse an open API (no keys) and a proxy in front without the list of proxies whose X-Forwarded-For is
    believed."""

    @model_validator(mode="after")
    def _production(self) -> "ApiSettings":
        if self.env != "production":
            return self
        if not self.api_keys:
            raise ValueError("IMGSEARCH_ENV=production with no IMGSEARCH_API_KEYS: the API would be open to anyone")
        if self.behind_proxy and not self.trusted_proxies:
            raise ValueError("IMGSEARCH_BEHIND_PROXY with no IMGSEARCH_TRUSTED_PROXIES: every caller would share the "
                             "proxy's address (one rate limit for all), or X-Forwarded-For would have to be believed "
                             "from anyone")
        return self


class WorkerSettings(SharedSettings):
    """A search worker's settings: the models, their engines, the caches and the batching."""

    # --- models and engines ---
    engines: Engines = Engines()

    # --- search ---
    image_url: str = "/v1/images/{id}"  # each result's image link ({id}: the post id); a CDN's URL works too
    itm_weight: float = 0.7
    cosine_weight: float = 0.3
    fetch_timeout_s: float = Field(5.0, gt=0)  # all of a query's feature fetches together
    # a store that fails this many calls in a row (a slow fetch counts) is not called for breaker_reset_s
    breaker_failures: int = Field(5, ge=1)
    breaker_reset_s: float = Field(10.0, gt=0)

    # --- caches ---
    caches: Caches = Caches()

    # --- the worker process ---
    # a worker process runs worker_concurrency jobs at once on threads (the stores' waits overlap), and their
    # model calls are batched together: up to batch_max queries per call, gathered for at most batch_wait_ms
    # while other jobs are running (a lone query does not wait); batch_max 1 turns batching off
    worker_pool: Literal["threads", "prefork", "solo"] = "threads"
    worker_concurrency: int = Field(4, ge=1)
    batch_max: int = Field(8, ge=1, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    warm_up: bool = True  # a worker runs one query through every stage before it reports ready
    # rolling restarts: on SIGTERM a worker stops taking jobs and gives those it holds this long to finish
    # (Celery's soft shutdown), then hands back the rest; keep it under the platform's grace period (30 s on
    # Kubernetes by default). Celery waits this whole time whenever a job is in hand at the signal.
    worker_soft_shutdown_s: float = Field(20.0, ge=0)

    @model_validator(mode="after")
    def _check_worker(self) -> "WorkerSettings":
        if self.itm_weight < 0 or self.cosine_weight < 0 or self.itm_weight + self.cosine_weight <= 0:
            raise ValueError("itm_weight and cosine_weight must be >= 0 and not both 0")
        return self

    @property
    def feature_cache_on(self) -> bool:
        if self.caches.features == "auto":
            return self.blob_store != "local" and self.caches.features_ttl_s > 0
        return self.caches.features == "on" and self.caches.features_ttl_s > 0

    @property
    def engines_path(self) -> Path:
        return self.engines.dir or self.data_dir / "engines"


class IngestSettings(WorkerSettings):
    """Ingest's settings: a worker's (ingest embeds with the same engines and writes the same stores) plus the
    sources (Reddit's among them) and the near-duplicate checks; the downloads follow the shared ``fetch`` rules."""

    # --- ingest ---
    ingest_source: Literal["reddit", "folder"] = "reddit"
    ingest_folder: Path | None = None  # the folder source's directory
    # when beat starts a run: a crontab line ("m h dom mon dow", UTC) or a number of seconds between runs
    ingest_schedule: str = "0 6 * * *"
    ingest_batch_size: int = Field(16, ge=1, le=512)  # images per write, vector upsert and ledger transaction
    # images per call of each tower; 0: 1 on a CPU (the full-size towers run 10 to 15% slower per image in
    # batches of 8 there, bench.ingest), the whole batch on a GPU
    ingest_embed_batch: int = Field(0, ge=0, le=512)
    # parallel embed streams, each with its own engines; 0: one per core with ONNX Runtime on a CPU, else one
    ingest_embed_streams: int = Field(0, ge=0, le=16)
    ingest_max_attempts: int = Field(3, ge=1)  # runs that retry an item whose failure was transient
    # near-duplicates: "phash" (256-bit difference hash, before embedding), "embedding" (SigLIP cosine against
    # the store, after the SigLIP pass and before the BLIP one) or "off"
    ingest_dedup: Literal["phash", "embedding", "off"] = "phash"
    ingest_phash_max_distance: int = Field(10, ge=0, le=256)  # bits that may differ for a near-duplicate
    ingest_dedup_cosine: float = Field(0.97, gt=0, le=1)

    # --- ingest across the pool ---
    # a run plans batches as tasks on embed_queue for any number of workers, instead of embedding in-process
    ingest_fanout: bool = False
    # a batch's items are claimed for this long: a worker that dies with them frees them when it runs out
    ingest_claim_ttl_s: float = Field(300.0, ge=1)
    ingest_batch_tries: int = Field(3, ge=1)  # claims of an item before it is recorded failed for the run

    # --- Reddit ---
    reddit: Reddit = Reddit()

    @model_validator(mode="after")
    def _check_ingest(self) -> "IngestSettings":
        if self.ingest_fanout and self.vector_store == "local":
            # each worker process would write its own copy of the embedded index
            raise ValueError("IMGSEARCH_INGEST_FANOUT needs a vector store every worker shares "
                             "(IMGSEARCH_VECTOR_STORE=pinecone), not the embedded one")
        return self


class FlowerSettings(SharedSettings):
    """Flower's settings (``imgsearch flower``, which watches the workers). Only Flower reads them: the API and
    the workers start whatever ``IMGSEARCH_FLOWER_BASIC_AUTH`` holds."""

    # basic auth "user:password"; Flower refuses to start without one
    flower_basic_auth: SecretStr | None = None
    flower_port: int = 5555

    @model_validator(mode="after")
    def _check_flower(self) -> "FlowerSettings":
        if self.flower_basic_auth is not None:
            user, sep, password = self.flower_basic_auth.get_secret_value().partition(":")
            if not sep or not user.strip() or not password.strip():
                raise ValueError("IMGSEARCH_FLOWER_BASIC_AUTH must be \"user:password\", both non-empty")
            if self.env == "production" and (password.lower() in _DEFAULT_PASSWORDS or password == user):
                raise ValueError("IMGSEARCH_FLOWER_BASIC_AUTH: a default password is refused in production (Flower "
                                 "shows every job's arguments)")
        return self


class Settings(IngestSettings, _ApiFields, FlowerSettings):
    """Every deployable's settings at once, for the processes that start them all (the CLI, the demo) and for
    tests. A deployed process reads its own class instead (``get_api_settings``, ``get_worker_settings``,
    ``get_ingest_settings``)."""


@lru_cache
def get_settings() -> Settings:
    """All settings (the CLI's); ``clear_cached()`` forgets them after the environment changed."""
    return Settings()


@lru_cache
def get_api_settings() -> ApiSettings:
    """The API process's settings (``create_app`` reads these): they refuse unsafe values in production."""
    return ApiSettings()


@lru_cache
def get_worker_settings() -> WorkerSettings:
    """A search worker's settings."""
    return WorkerSettings()


@lru_cache
def get_ingest_settings() -> IngestSettings:
    """An ingest worker's settings."""
    return IngestSettings()


@lru_cache
def get_flower_settings() -> FlowerSettings:
    """Flower's settings."""
    return FlowerSettings()


def clear_cached() -> None:
    """Forget every class's cached settings: the next call reads the environment again (tests use it)."""
    for get in (get_settings, get_api_settings, get_worker_settings, get_ingest_settings, get_flower_settings):
        get.cache_clear()
