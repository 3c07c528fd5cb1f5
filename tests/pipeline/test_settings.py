"""Settings refuse unsafe values in production: an open API, a proxy in front with no trusted proxies, a default
or empty Flower password. In development the same values are accepted (local use)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.settings import ApiKey, ApiSettings, Settings

KEY = ApiKey(name="app", sha256="0" * 64)


def test_production_refuses_an_open_api_and_an_unlisted_proxy() -> None:
    with pytest.raises(ValidationError, match="open to anyone"):
        ApiSettings(env="production")
    with pytest.raises(ValidationError, match="TRUSTED_PROXIES"):
        ApiSettings(env="production", api_keys=[KEY], behind_proxy=True)
    ok = ApiSettings(env="production", api_keys=[KEY], behind_proxy=True, trusted_proxies=["10.0.0.0/8"])
    assert ok.trusted_proxies == ["10.0.0.0/8"]
    assert ApiSettings().env == "development" and not ApiSettings().api_keys  # local use: open is fine


@pytest.mark.parametrize("auth", ["ops:", "ops:admin", "ops:password", "ops:ops", "ops"])
def test_production_refuses_a_default_or_empty_flower_password(auth: str) -> None:
    with pytest.raises(ValidationError, match="FLOWER_BASIC_AUTH"):
        Settings(env="production", flower_basic_auth=auth)  # type: ignore[arg-type]
    assert Settings(flower_basic_auth=auth).flower_basic_auth is not None  # type: ignore[arg-type]


def test_production_takes_a_real_flower_password_and_no_flower_at_all() -> None:
    assert Settings(env="production", flower_basic_auth="ops:Zq8-long-random").env == "production"  # type: ignore[arg-type]
    assert Settings(env="production").flower_basic_auth is None
