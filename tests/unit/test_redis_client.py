"""redis_client: defaults, environment, explicit password, TLS."""

from __future__ import annotations

import pytest
import redis

from hlm.redis_client import redis_client


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
