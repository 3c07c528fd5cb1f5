"""Settings refuse unsafe values in production: an open API, a proxy in front with no trusted proxies, a default
or empty Flower password. In development the same values are accepted (local use). Each deployable reads its own
groups, and every name the settings had before the groups still sets the same value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from pipeline.settings import (
    MIGRATION,
    ApiKey,
    ApiSettings,
    FlowerSettings,
    IngestSettings,
    Settings,
    SharedSettings,
    WorkerSettings,
)

KEY = ApiKey(name="app", sha256="0" * 64)


def test_production_refuses_an_open_api_and_an_unlisted_proxy() -> None:
    with pytest.raises(ValidationError, match="open to anyone"):
        ApiSettings(env="production")
    with pytest.raises(ValidationError, match="TRUSTED_PROXIES"):
        ApiSettings(env="production", api_keys=[KEY], behind_proxy=True)
    ok = ApiSettings(env="production", api_keys=[KEY], behind_proxy=True, trusted_proxies=["10.0.0.0/8"])
    assert ok.trusted_proxies == ["10.0.0.0/8"]
    assert ApiSettings().env == "development" and not ApiSettings().api_keys  # local use: open is fine


@pytest.mark.parametrize("auth", ["ops:admin", "ops:password", "ops:ops"])
def test_production_refuses_a_default_flower_password(auth: str) -> None:
    with pytest.raises(ValidationError, match="FLOWER_BASIC_AUTH"):
        Settings(env="production", flower_basic_auth=auth)  # type: ignore[arg-type]
    assert Settings(flower_basic_auth=auth).flower_basic_auth is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("auth", ["ops:", ":secret-enough", "ops", ""])
def test_an_empty_flower_user_or_password_is_refused_everywhere(auth: str) -> None:
    for env in ("development", "production"):
        with pytest.raises(ValidationError, match="FLOWER_BASIC_AUTH"):
            Settings(env=env, flower_basic_auth=auth)  # type: ignore[arg-type]


def test_production_takes_a_real_flower_password_and_no_flower_at_all() -> None:
    assert Settings(env="production", flower_basic_auth="ops:Zq8-long-random").env == "production"  # type: ignore[arg-type]
    assert Settings(env="production").flower_basic_auth is None


def test_each_deployable_reads_only_its_own_settings() -> None:
    api, worker, ingest = (set(c.model_fields) for c in (ApiSettings, WorkerSettings, IngestSettings))
    shared = set(SharedSettings.model_fields)
    assert {"redis_url", "job_ttl_s", "top_k", "data_dir", "fetch"} <= shared <= api & worker & ingest
    assert {"api_keys", "trusted_proxies", "limits"} <= api - worker - ingest  # a worker holds no key, no limit
    assert {"engines", "batch_max", "caches"} <= worker - api
    assert {"reddit", "ingest_dedup"} <= ingest - worker - api  # the API sees no Reddit secret
    flower = set(FlowerSettings.model_fields)
    assert {"flower_basic_auth"} <= flower - api - worker - ingest  # the API never validates Flower's settings
    assert not {"limits", "engines", "caches", "reddit"} & flower
    assert set(Settings.model_fields) == api | ingest | flower  # the CLI's and the demo's: all of them


def test_production_checks_follow_the_deployable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSEARCH_ENV", "production")
    with pytest.raises(ValidationError, match="open to anyone"):
        ApiSettings()
    assert WorkerSettings().env == "production"  # a worker needs no API keys
    monkeypatch.setenv("IMGSEARCH_ITM_WEIGHT", "-1")
    with pytest.raises(ValidationError, match="itm_weight"):
        WorkerSettings()
    assert ApiSettings(api_keys=[KEY]).env == "production"  # the API does not read the fusion weights


def test_a_refused_setting_never_shows_the_environment_s_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSEARCH_PINECONE_API_KEY", "pc-secret-7f3a")
    monkeypatch.setenv("IMGSEARCH_FLOWER_BASIC_AUTH", "ops:")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "FLOWER_BASIC_AUTH" in str(refused.value) and "pc-secret-7f3a" not in str(refused.value)


# a valid value for every old name (as the environment holds it) and what it reads as; MIGRATION's names and these
# are checked to be the same set, so a name added there needs a value here
OLD_VALUES: dict[tuple[str, str], tuple[str, Any]] = {
    ("fetch", "concurrency"): ("3", 3), ("fetch", "timeout_s"): ("7.5", 7.5), ("fetch", "retries"): ("0", 0),
    ("fetch", "max_bytes"): ("1000", 1000), ("fetch", "deadline_s"): ("9", 9.0),
    ("fetch", "min_bytes_per_s"): ("10", 10), ("fetch", "min_rate_after_s"): ("1.5", 1.5),
    ("fetch", "allow_networks"): ('["127.0.0.1/32"]', ["127.0.0.1/32"]),
    ("fetch", "allow_ports"): ("[80, 8080]", [80, 8080]), ("fetch", "max_pixels"): ("1000000", 1_000_000),
    ("fetch", "user_agent"): ("test-agent/1", "test-agent/1"),
    ("fetch", "image_hosts"): ('["127.0.0.1"]', ["127.0.0.1"]), ("fetch", "max_wait_s"): ("5", 5.0),
    ("limits", "rate_limit_per_min"): ("0", 0), ("limits", "rate_limit_burst"): ("4", 4),
    ("limits", "max_jobs_in_flight"): ("2", 2), ("limits", "max_queue_length"): ("3", 3),
    ("limits", "max_query_chars"): ("100", 100), ("limits", "max_body_bytes"): ("1024", 1024),
    ("limits", "max_upload_bytes"): ("2048", 2048), ("limits", "max_streams_per_caller"): ("1", 1),
    ("limits", "max_streams"): ("5", 5), ("limits", "stream_max_s"): ("30", 30.0),
    ("engines", "siglip_model"): ("/models/siglip", "/models/siglip"),
    ("engines", "blip_model"): ("/models/blip", "/models/blip"), ("engines", "text_max_tokens"): ("32", 32),
    ("engines", "blip_max_tokens"): ("20", 20), ("engines", "blip_cross_attention"): ("plain", "plain"),
    ("engines", "device"): ("cuda", "cuda"), ("engines", "backend"): ("onnxruntime", "onnxruntime"),
    ("engines", "precision"): ("int8", "int8"), ("engines", "dir"): ("/tmp/engines", Path("/tmp/engines")),
    ("engines", "intra_op_threads"): ("2", 2),
    ("caches", "results_ttl_s"): ("0", 0), ("caches", "features"): ("on", "on"),
    ("caches", "features_ttl_s"): ("60", 60), ("caches", "features_max"): ("10", 10), ("caches", "local_mb"): ("1", 1),
    ("reddit", "client_id"): ("app-id", "app-id"), ("reddit", "client_secret"): ("app-secret", "app-secret"),
    ("reddit", "subreddits"): ('{"pics": 5}', {"pics": 5}), ("reddit", "sort"): ("new", "new"),
    ("reddit", "period"): ("week", "week"), ("reddit", "page_size"): ("25", 25), ("reddit", "max_pages"): ("2", 2),
    ("reddit", "public_url"): ("http://127.0.0.1:1", "http://127.0.0.1:1"),
    ("reddit", "oauth_url"): ("http://127.0.0.1:2", "http://127.0.0.1:2"),
    ("reddit", "token_url"): ("http://127.0.0.1:3/token", "http://127.0.0.1:3/token"),
    ("reddit", "max_listing_bytes"): ("65536", 65536),
}


def _read(s: Any, group: str, name: str) -> Any:
    value = getattr(getattr(s, group), name)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_every_old_name_sets_its_group_s_field_in_every_deployable_with_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(MIGRATION.values()) == set(OLD_VALUES)
    classes = (Settings, ApiSettings, WorkerSettings, IngestSettings, FlowerSettings)
    for old, (group, name) in MIGRATION.items():
        raw, want = OLD_VALUES[group, name]
        with monkeypatch.context() as env:
            env.setenv(old, raw)
            for cls in classes:
                if group in cls.model_fields:
                    assert _read(cls(), group, name) == want, (old, cls.__name__)
                else:  # a deployable without the group ignores the name, as it did before the groups
                    cls()
        assert _read(Settings(), group, name) != want, old  # the value was the old name's, not the default


def test_a_new_name_wins_over_an_old_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSEARCH_RATE_LIMIT_PER_MIN", "7")
    monkeypatch.setenv("IMGSEARCH_LIMITS__RATE_LIMIT_PER_MIN", "5")
    monkeypatch.setenv("IMGSEARCH_RATE_LIMIT_BURST", "3")  # an old name beside a new one in the same group
    s = ApiSettings()
    assert (s.limits.rate_limit_per_min, s.limits.rate_limit_burst) == (5, 3)
    # a whole group as JSON wins field by field: the fields it does not name keep the old names' values
    monkeypatch.setenv("IMGSEARCH_FETCH", '{"max_bytes": 1000, "allow_ports": [8080]}')
    monkeypatch.setenv("IMGSEARCH_INGEST_MAX_BYTES", "2000")
    monkeypatch.setenv("IMGSEARCH_INGEST_RETRIES", "0")
    s = ApiSettings()
    assert (s.fetch.max_bytes, s.fetch.allow_ports, s.fetch.retries) == (1000, [8080], 0)
    # ...and a keyword argument wins over both, by its new or its old name (the group's own value first)
    old_name: dict[str, Any] = {"rate_limit_per_min": 9}
    assert ApiSettings(**old_name).limits.rate_limit_per_min == 9
    assert ApiSettings(limits={"rate_limit_per_min": 8}, **old_name).limits.rate_limit_per_min == 8
    assert ApiSettings(limits={"max_streams": 8}).limits.rate_limit_burst == 3  # a group keyword merges, too


def test_the_original_service_s_bare_reddit_names_come_after_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDDIT_CLIENT_SECRET", "bare")
    assert _read(IngestSettings(), "reddit", "client_secret") == "bare"
    monkeypatch.setenv("IMGSEARCH_REDDIT_CLIENT_SECRET", "prefixed")
    assert _read(IngestSettings(), "reddit", "client_secret") == "prefixed"
    monkeypatch.setenv("IMGSEARCH_REDDIT__CLIENT_SECRET", "nested")
    assert _read(IngestSettings(), "reddit", "client_secret") == "nested"


def test_a_group_s_field_is_checked_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="allow_networks"):
        Settings(fetch={"allow_networks": ["not-a-network"]})
    with pytest.raises(ValidationError, match="allow_ports"):
        Settings(**{"ingest_allow_ports": [70000]})  # by the old name too
    monkeypatch.setenv("IMGSEARCH_REDDIT_SUBREDDITS", "secret-not-json-7f3a")
    with pytest.raises(SettingsError) as refused:
        IngestSettings()
    assert "IMGSEARCH_REDDIT_SUBREDDITS" in str(refused.value) and "7f3a" not in str(refused.value)
    monkeypatch.delenv("IMGSEARCH_REDDIT_SUBREDDITS")
    monkeypatch.setenv("IMGSEARCH_REDDIT__PAGE_SIZE", "secret-7f3a")
    with pytest.raises(ValidationError) as refused_too:
        IngestSettings()
    assert "page_size" in str(refused_too.value) and "7f3a" not in str(refused_too.value)


def test_model_copy_changes_a_group_s_fields_and_refuses_an_old_name() -> None:
    s = Settings(engines={"backend": "torch", "precision": "fp32", "device": "cuda"})
    copy = s.model_copy(update={"engines": {"backend": "onnxruntime"}, "top_k": 10})
    assert (copy.engines.backend, copy.engines.precision, copy.engines.device, copy.top_k) == \
        ("onnxruntime", "fp32", "cuda", 10)
    assert s.engines.backend == "torch"  # the original is untouched
    old_name = {"engine_backend": "onnxruntime"}  # before this check, set beside the group and never read
    with pytest.raises(ValueError, match="engine_backend"):
        s.model_copy(update=old_name)
    with pytest.raises(ValueError, match="bakend"):
        s.model_copy(update={"engines": {"bakend": "onnxruntime"}})


def test_the_readme_s_migration_table_lists_every_old_name() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for old, (group, name) in MIGRATION.items():
        assert f"| `{old}` | `IMGSEARCH_{group.upper()}__{name.upper()}` |" in readme, old
