"""The index store against a real redis-server that requires a password and speaks TLS (a private CA): a publish
and load round trip works with the right credentials, and every wrong one is refused with a clear StoreError."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, StoreError
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
PASSWORD = "s3cret-for-tests"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1."""
    p = {name: folder / name for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "san.ext")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hlm-test-ca",
            "-keyout", str(p["ca.key"]), "-out", str(p["ca.crt"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(p["server.key"]), "-out", str(p["server.csr"]))
    p["san.ext"].write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(p["server.csr"]), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(p["san.ext"]), "-out", str(p["server.crt"]))
    return p


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("tls-redis")
    certs, port, tls_port = certificates(folder), free_port(), free_port()
    pid = subprocess.run(
        [str(REPO / "infra/redis/start.sh"), str(port), str(folder / "data"), "--tls-port", str(tls_port),
         "--tls-cert-file", str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"]),
         "--tls-ca-cert-file", str(certs["ca.crt"]), "--tls-auth-clients", "no"],
        check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": PASSWORD},
    ).stdout.strip()
    yield {"tls_url": f"rediss://127.0.0.1:{tls_port}/0", "plain_url": f"redis://127.0.0.1:{port}/0",
           "ca": str(certs["ca.crt"])}
    subprocess.run(["kill", pid], check=False)


def small_index() -> AdIndex:
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    return AdIndex.build([f"ad-{i}" for i in range(200)], x / np.linalg.norm(x, axis=1, keepdims=True), "space-a",
                         "Flat")


def test_publish_and_load_over_tls_with_a_password_and_a_private_ca(secured_redis, monkeypatch):
    monkeypatch.delenv("HLM_REDIS_PASSWORD", raising=False)
    monkeypatch.setenv("HLM_REDIS_CA", secured_redis["ca"])  # how a job or a replica is told about a private CA
    store = IndexStore(redis_client(secured_redis["tls_url"], password=PASSWORD), "tls")
    version = store.publish(small_index())
    assert store.current() == version and store.load().ids == small_index().ids


@pytest.mark.parametrize("url, password, ca, reason", [
    ("tls_url", "wrong-password", "ca", r"WRONGPASS|invalid username-password"),
    ("tls_url", None, "ca", r"AuthenticationError"),
    ("tls_url", PASSWORD, None, r"certificate verify failed"),
    ("plain_url", None, None, r"AuthenticationError"),
], ids=["wrong password", "no password", "CA not trusted", "plain port without password"])
def test_wrong_credentials_are_a_store_error_that_says_why(secured_redis, monkeypatch, url, password, ca, reason):
    monkeypatch.delenv("HLM_REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("HLM_REDIS_CA", raising=False)
    client = redis_client(secured_redis[url], password=password, ssl_ca=secured_redis[ca] if ca else None)
    with pytest.raises(StoreError, match=reason):
        IndexStore(client, "tls").current()
