"""Settings refuse unsafe values in production: an open API, a proxy in front with no trusted proxies, a default
or empty Flower password. In development the same values are accepted (local use)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.settings import ApiKey, ApiSettings, FlowerSettings, IngestSettings, Settings, SharedSettings, WorkerSettings

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
    assert {"redis_url", "job_ttl_s", "top_k", "data_dir"} <= shared <= api & worker & ingest
    assert {"api_keys", "trusted_proxies", "rate_limit_per_min"} <= api - worker - ingest  # a worker holds no key
    assert {"blip_model", "batch_max", "cache_local_mb"} <= worker - api
    assert {"reddit_client_secret", "ingest_dedup"} <= ingest - worker - api  # the API sees no Reddit secret
    flower = set(FlowerSettings.model_fields)
    assert {"flower_basic_auth"} <= flower - api - worker - ingest  # the API never validates Flower's settings
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
