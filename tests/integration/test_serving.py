"""The Serve app on a real local Ray against a real redis-server: exact results, hot swap, Redis outages, bad input."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.store import IndexStore, redis_client

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ADS = [f"{c} {m} {i}" for i, (c, m) in enumerate(
    (c, m) for c in ("cordless drill", "ceiling paint", "brass lamp", "oak door", "bath faucet")
    for m in ("black", "white", "steel", "large", "compact", "18v", "deluxe", "pro"))]
QUERIES = ["cordless drill 18v", "white ceiling paint", "brass floor lamp", "oak front door"]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A redis-server this module may stop and restart (the session one is shared by other tests)."""
    from tests.conftest import free_port

    port, folder = free_port(), tmp_path_factory.mktemp("serve-redis")

    def start() -> str:
        return subprocess.run([str(REPO / "infra/redis/start.sh"), str(port), str(folder)], check=True,
                              capture_output=True, text=True).stdout.strip()

    state = {"pid": start(), "url": f"redis://127.0.0.1:{port}/0"}
    state["stop"] = lambda: subprocess.run(["kill", state["pid"]], check=False) and time.sleep(0.5)
    state["start"] = lambda: state.update(pid=start())
    yield state
    subprocess.run(["kill", state["pid"]], check=False)


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir) -> Encoder:
    return Encoder.load(tiny_bert_dir)


def publish(url: str, encoder: Encoder, ads: list[str], prefix: str, space: str | None = None) -> str:
    ids = [f"{prefix}-{i}" for i in range(len(ads))]
    index = AdIndex.build(ids, encoder.encode(ads, kind="ad"), space or encoder.space, "Flat")
    return IndexStore(redis_client(url), "ads").publish(index, source=prefix)


@pytest.fixture(scope="module")
def app_url(ray_cluster, own_redis, encoder, tiny_bert_dir):
    from ray import serve

    from serving.app import build_app
    from tests.conftest import free_port

    publish(own_redis["url"], encoder, ADS, "v1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"student": {"model": str(tiny_bert_dir)}, "redis_url": own_redis["url"], "poll_s": 0.3,
                         "max_replicas": 1}), name="hlm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def search(url: str, query: str, k: int = 5) -> requests.Response:
    return requests.post(f"{url}/v1/search", json={"query": query, "k": k}, timeout=30)


def wait_for_version(url: str, prefix: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = search(url, QUERIES[0]).json()
        if body["ads"][0]["ad_id"].startswith(prefix):
            return body
        time.sleep(0.2)
    raise AssertionError(f"replicas did not switch to {prefix} within {timeout}s")


def test_search_returns_the_brute_force_top_k(app_url, encoder):
    ad_emb = encoder.encode(ADS, kind="ad")  # (N, d)
    for query in QUERIES:
        body = search(app_url, query, k=5).json()
        scores = ad_emb @ encoder.encode([query])[0]  # (N,)
        expected = [f"v1-{i}" for i in np.argsort(-scores)[:5]]
        assert [a["ad_id"] for a in body["ads"]] == expected
        np.testing.assert_allclose([a["score"] for a in body["ads"]], np.sort(scores)[::-1][:5], atol=1e-4)
        assert body["index_version"] and body["model_version"]


def test_embed_endpoint_equals_a_direct_encode(app_url, encoder):
    body = requests.post(f"{app_url}/v1/embed", json={"queries": QUERIES}, timeout=30).json()
    np.testing.assert_allclose(np.array(body["embeddings"]), encoder.encode(QUERIES), atol=1e-5)
    assert body["dim"] == encoder.dim and body["space"] == encoder.space


@pytest.mark.parametrize("payload", [
    {"query": "", "k": 5}, {"query": "   ", "k": 5}, {"query": "x" * 5000, "k": 5}, {"query": "drill", "k": 0},
    {"query": "drill", "k": 100000}, {"query": "drill", "k": "ten"}, {"k": 5}, {"query": 42, "k": 5},
    {"query": "drill", "k": 5, "extra": 1}, [1, 2, 3],
])
def test_bad_search_input_is_a_4xx_naming_the_field(app_url, payload):
    response = requests.post(f"{app_url}/v1/search", json=payload, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]


def test_malformed_json_is_a_4xx(app_url):
    response = requests.post(f"{app_url}/v1/search", data=b"{not json", timeout=30,
                             headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def test_index_status_reports_version_space_and_count(app_url, encoder):
    status = requests.get(f"{app_url}/v1/index", timeout=30).json()
    assert status["space"] == encoder.space and status["count"] == len(ADS) and status["version"]
    assert requests.get(f"{app_url}/v1/healthz", timeout=30).json()["ok"] is True


def test_hot_swap_under_load_loses_no_request_and_never_mixes_versions(app_url, own_redis, encoder):
    # Given a client sending a steady stream of searches
    results, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = search(app_url, QUERIES[len(results) % len(QUERIES)], k=5)
                results.append(r.json()) if r.status_code == 200 else errors.append(r.status_code)
            except requests.RequestException as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    # When a new version with other ad ids is published
    time.sleep(1.0)
    version = publish(own_redis["url"], encoder, ADS[::-1], "v2")
    switched = wait_for_version(app_url, "v2")
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    # Then the replicas switch, no request failed, and every response is wholly one version
    assert switched["index_version"] == version
    assert not errors
    by_version = {}
    for body in results:
        prefixes = {a["ad_id"].split("-")[0] for a in body["ads"]}
        assert len(prefixes) == 1
        by_version.setdefault(body["index_version"], set()).update(prefixes)
    assert all(len(p) == 1 for p in by_version.values()) and len(by_version) >= 2


def test_an_index_of_another_space_is_refused_and_the_old_one_keeps_serving(app_url, own_redis, encoder):
    before = search(app_url, QUERIES[0]).json()["index_version"]
    bad = publish(own_redis["url"], encoder, ADS, "v9", space="some-other-space")
    time.sleep(2.0)
    assert search(app_url, QUERIES[0]).json()["index_version"] == before
    assert bad in requests.get(f"{app_url}/v1/index", timeout=30).json()["refused"]
    IndexStore(redis_client(own_redis["url"]), "ads").rollback(before)


def test_redis_outage_keeps_serving_and_the_next_version_is_picked_up(app_url, own_redis, encoder):
    serving = search(app_url, QUERIES[0]).json()["index_version"]
    own_redis["stop"]()
    for query in QUERIES * 3:  # Redis is down: searches still succeed from memory
        response = search(app_url, query)
        assert response.status_code == 200 and response.json()["index_version"] == serving
    own_redis["start"]()  # no persistence: Redis comes back empty, and a fresh publish must be picked up
    version = publish(own_redis["url"], encoder, ADS, "v3")
    assert wait_for_version(app_url, "v3")["index_version"] == version
