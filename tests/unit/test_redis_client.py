"""redis_client: defaults, environment, explicit password, TLS; no URL password in a log or a saved config."""

from __future__ import annotations

import argparse
import logging

import pytest
import redis

from hlm.cli import start_job
from hlm.redis_client import redact, redis_client


def test_redis_client_defaults_and_environment(monkeypatch) -> None:
    monkeypatch.delenv("HLM_REDIS_URL", raising=False)
    monkeypatch.delenv("HLM_REDIS_PASSWORD", raising=False)
    kw = redis_client().connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw.get("password")) == ("127.0.0.1", 6379, 0, None)
    assert kw["socket_timeout"] == 5 and kw["socket_connect_timeout"] == 5 and kw["decode_responses"] is False
    monkeypatch.setenv("HLM_REDIS_URL", "redis://:inurl@cache.internal:6380/2")
    monkeypatch.setenv("HLM_REDIS_PASSWORD", "fromenv")
    kw = redis_client().connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["password"]) == ("cache.internal", 6380, 2, "fromenv")
    assert redis_client(password="explicit").connection_pool.connection_kwargs["password"] == "explicit"


def test_redis_client_rediss_enables_tls(monkeypatch) -> None:
    monkeypatch.delenv("HLM_REDIS_PASSWORD", raising=False)
    pool = redis_client("rediss://cache.internal:6380/0", ssl_ca="/etc/ssl/ca.pem").connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert redis_client("redis://h:1/0").connection_pool.connection_class is redis.Connection
    with pytest.raises(ValueError, match="not a rediss://"):
        redis_client("redis://h:1/0", ssl_ca="/etc/ssl/ca.pem")


def test_redact_hides_every_url_password_and_nothing_else() -> None:
    assert redact("redis://hlm-writer:s3cret@redis:6379/0") == "redis://hlm-writer:***@redis:6379/0"
    assert redact("rediss://:s3cret@redis:6380/0 and https://u:p@x/y") == "rediss://:***@redis:6380/0 and https://u:***@x/y"
    assert redact("redis://hlm-reader:p@ss@redis/0") == "redis://hlm-reader:***@redis/0"  # unescaped '@' in it
    for clean in ("redis://redis:6379/0", "redis://hlm-reader@redis:6379/0", "at 10:30 see a@b"):
        assert redact(clean) == clean


def test_the_config_echo_and_the_saved_config_never_hold_a_redis_password(tmp_path, caplog) -> None:
    # Given a job whose config names a Redis URL with a password in it
    url = "redis://hlm-writer:s3cret-in-url@redis.internal:6379/0"
    args = argparse.Namespace(config=None, overrides=[f"refresh.redis_url={url}"])
    # When the job starts (echoes its config and saves it beside its outputs)
    with caplog.at_level(logging.INFO, logger="hlm"):
        cfg = start_job("refresh_index", args, out_dir=tmp_path)
    # Then it runs with the URL as given, and neither the log nor the saved config has the password
    assert cfg.refresh.redis_url == url
    saved = (tmp_path / "refresh_index.config.yaml").read_text()
    assert "redis://hlm-writer:***@redis.internal:6379/0" in caplog.text and "hlm-writer:***@" in saved
    assert "s3cret-in-url" not in caplog.text + saved
