"""The Serve app on a real local Ray against a real redis-server: exact results, batching, hot swap, refused
versions, Redis outages, bad input, the optional API key, a dead encoder tier, autoscaling."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from hlm.encoder import Encoder
from hlm.events import AdEventProducer
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore
from hlm.updater import StreamUpdater

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ADS = [f"{c} {m} {i}" for i, (c, m) in enumerate(
    (c, m) for c in ("cordless drill", "ceiling paint", "brass lamp", "oak door", "bath faucet")
    for m in ("black", "white", "steel", "large", "compact", "18v", "deluxe", "pro"))]
QUERIES = ["cordless drill 18v", "white ceiling paint", "brass floor lamp", "oak front door"]
API_KEY = "test-key-0123456789abcdef"
# A quarter CPU per replica: every app of this module (open, secured, split, autoscaled) fits the session's 4 CPUs.
SMALL = {"replica_cpus": 0.25, "poll_s": 0.3, "max_replicas": 1}


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
    with pytest.MonkeyPatch.context() as env:
        env.delenv("HLM_API_KEY", raising=False)  # this app is the open one, whatever the caller's environment
        serve.run(build_app({**SMALL, "student": {"model": str(tiny_bert_dir)}, "redis_url": own_redis["url"]}),
                  name="hlm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def secured_url(app_url, own_redis, tiny_bert_dir):
    """The same app with an API key, beside the open one on the same Serve instance, under a route prefix."""
    from ray import serve

    from serving.app import build_app

    with pytest.MonkeyPatch.context() as env:
        env.setenv("HLM_API_KEY", API_KEY)  # wins over the key in the args
        serve.run(build_app({**SMALL, "student": {"model": str(tiny_bert_dir)}, "redis_url": own_redis["url"],
                             "api_key": "key-from-args"}), name="hlm-secured", route_prefix="/secured")
    yield f"{app_url}/secured"
    serve.delete("hlm-secured")


@pytest.fixture(scope="module")
def empty_url(app_url, own_redis, tiny_bert_dir):
    """An app whose index has no published version, beside the open one."""
    from ray import serve

    from serving.app import build_app

    serve.run(build_app({**SMALL, "student": {"model": str(tiny_bert_dir)}, "redis_url": own_redis["url"],
                         "index": "nothing-published"}), name="hlm-empty", route_prefix="/empty")
    yield f"{app_url}/empty"
    serve.delete("hlm-empty")


def search(url: str, query: str, k: int = 5) -> requests.Response:
    return requests.post(f"{url}/v1/search", json={"query": query, "k": k}, timeout=30)


def wait_for_version(url: str, prefix: str, timeout: float = 20.0, version: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = search(url, QUERIES[0]).json()
        if body["ads"][0]["ad_id"].startswith(prefix) and body["index_version"] == (version or body["index_version"]):
            return body
        time.sleep(0.2)
    raise AssertionError(f"replicas did not switch to {prefix} within {timeout}s")


def assert_refused_while_serving(url: str, bad: str, serving: str, reason: str, timeout: float = 20.0) -> None:
    """Replicas refuse `bad` with a reason matching `reason` (the line they log; see /v1/index) and answer from
    `serving`. The log line itself is checked in tests/unit/test_live_index.py: reading replica logs back needs the
    dashboard agent, whose fixed port another Ray on the machine may hold."""
    deadline = time.monotonic() + timeout
    while bad not in (status := requests.get(f"{url}/v1/index", timeout=30).json())["refused"]:
        assert time.monotonic() < deadline, f"version {bad} was not refused within {timeout}s: {status}"
        time.sleep(0.2)
    assert re.search(reason, status["refused"][bad]) and status["version"] == serving, status
    assert all(search(url, q).json()["index_version"] == serving for q in QUERIES)


def brute_force_top(encoder: Encoder, ads: list[str], prefix: str, query: str, k: int = 5) -> list[str]:
    """The ids `publish(…, ads, prefix)` gives, ranked by exact inner product with the query."""
    scores = encoder.encode(ads, kind="ad") @ encoder.encode([query])[0]  # (N,)
    return [f"{prefix}-{i}" for i in np.argsort(-scores)[:k]]


def test_search_returns_the_brute_force_top_k(app_url, encoder):
    ad_emb = encoder.encode(ADS, kind="ad")  # (N, d)
    for query in QUERIES:
        body = search(app_url, query, k=5).json()
        scores = ad_emb @ encoder.encode([query])[0]  # (N,)
        assert [a["ad_id"] for a in body["ads"]] == brute_force_top(encoder, ADS, "v1", query)
        np.testing.assert_allclose([a["score"] for a in body["ads"]], np.sort(scores)[::-1][:5], atol=1e-4)
        assert body["index_version"] and body["model_version"]


def test_embed_endpoint_equals_a_direct_encode(app_url, encoder):
    body = requests.post(f"{app_url}/v1/embed", json={"queries": QUERIES}, timeout=30).json()
    np.testing.assert_allclose(np.array(body["embeddings"]), encoder.encode(QUERIES), atol=1e-5)
    assert body["dim"] == encoder.dim and body["space"] == encoder.space


def test_concurrent_searches_are_batched_and_answer_exactly_what_single_searches_do(app_url):
    # Given the answers to searches sent one at a time (the slow reference)
    queries = [f"{q} {i}" for i in range(8) for q in QUERIES]  # 32 distinct texts, of different lengths
    ks = [1 + i % 7 for i in range(len(queries))]
    single = [search(app_url, q, k).json() for q, k in zip(queries, ks, strict=True)]
    before = requests.get(f"{app_url}/v1/index", timeout=30).json()["batches"]
    # When the same searches arrive together
    with ThreadPoolExecutor(len(queries)) as pool:
        together = list(pool.map(lambda qk: search(app_url, *qk).json(), zip(queries, ks, strict=True)))
    # Then each answer is the one its query got alone, and some of them shared a forward pass
    for alone, batched in zip(single, together, strict=True):
        assert [a["ad_id"] for a in batched["ads"]] == [a["ad_id"] for a in alone["ads"]]
        np.testing.assert_allclose([a["score"] for a in batched["ads"]], [a["score"] for a in alone["ads"]],
                                   atol=1e-5)  # padding to the batch's longest text moves the last float bits
        assert batched["index_version"] == alone["index_version"]
    after = requests.get(f"{app_url}/v1/index", timeout=30).json()["batches"]
    assert after["items"] - before["items"] == len(queries)
    assert after["batches"] - before["batches"] < len(queries) and after["largest"] > 1, after


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


def test_a_streamed_delete_and_upsert_reach_the_endpoint_and_index_status_reports_the_delta(app_url, own_redis,
                                                                                            encoder):
    version = publish(own_redis["url"], encoder, ADS, "st")  # a base of its own: later versions have empty logs
    wait_for_version(app_url, "st", version=version)
    client, everything = redis_client(own_redis["url"]), len(ADS) + 1

    def ids(query: str) -> list[str]:
        return [a["ad_id"] for a in search(app_url, query, k=everything).json()["ads"]]

    gone = ids(QUERIES[0])[0]
    sent = AdEventProducer(client, "ads").send([{"op": "delete", "ad_id": gone},
                                                {"op": "upsert", "ad_id": "fresh", "text": QUERIES[1]}])
    updater = StreamUpdater(client, "ads", lambda t: encoder.encode(t, kind="ad"), encoder.space, consumer="t")
    updater.ensure_group()
    updater.process(updater.read())
    try:
        deadline = time.monotonic() + 20
        while gone in ids(QUERIES[0]) or "fresh" not in ids(QUERIES[1]):
            assert time.monotonic() < deadline, "the streamed events never reached the endpoint"
            time.sleep(0.1)
        # The replica samples the updater's lag when it reads the log, and the updater writes the log before it
        # acknowledges the events: a sample between the two counts them pending until the replica's next read
        while (status := requests.get(f"{app_url}/v1/index", timeout=30).json())["stream_lag"]["pending"]:
            assert time.monotonic() < deadline, f"the reported stream lag never drained: {status['stream_lag']}"
            time.sleep(0.1)
        assert status["version"] == version and status["delta"]["upserts"] == 1
        assert status["delta"]["last_applied_event"] == sent[-1] and status["delta"]["refused"] == 0
        assert status["stream_lag"]["undelivered"] == 0
    finally:  # the tests after this one expect a version of ADS with no deltas: publish one, as the module started
        wait_for_version(app_url, "v1", version=publish(own_redis["url"], encoder, ADS, "v1"))


@pytest.mark.reliability
def test_with_no_loadable_index_the_replica_is_up_and_answers_short_503s(empty_url):
    health = requests.get(f"{empty_url}/v1/healthz", timeout=30)
    assert health.status_code == 503 and health.json() == {"ok": False, "index_version": None}
    response = search(empty_url, QUERIES[0])
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.json() == {"detail": "no index version is loaded on this replica yet, retry"}


@pytest.mark.reliability
def test_padding_and_oversized_bodies_are_4xx_before_any_work(app_url):
    padded = search(app_url, " " * 600 + "drill")
    assert padded.status_code == 422 and "at most 512 characters" in padded.text
    from hlm.api import MAX_BODY_BYTES

    huge = requests.post(f"{app_url}/v1/embed", data=b'{"queries": ["' + b"x" * MAX_BODY_BYTES + b'"]}',
                         headers={"content-type": "application/json"}, timeout=30)
    assert huge.status_code == 413


@pytest.mark.reliability
def test_hot_swap_under_load_loses_no_request_and_never_mixes_versions(app_url, own_redis, encoder, record_property):
    # Given a client sending a steady stream of searches to the version serving now (published from ADS)
    before = search(app_url, QUERIES[0]).json()
    results, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            query = QUERIES[len(results) % len(QUERIES)]
            try:
                r = search(app_url, query, k=5)
                results.append((query, r.json())) if r.status_code == 200 else errors.append(r.status_code)
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
    # Then the replicas switch, no request failed, and every response is exactly its version's brute-force top 5
    assert switched["index_version"] == version
    assert not errors
    old_prefix = before["ads"][0]["ad_id"].split("-")[0]
    expected = {before["index_version"]: {q: brute_force_top(encoder, ADS, old_prefix, q) for q in QUERIES},
                version: {q: brute_force_top(encoder, ADS[::-1], "v2", q) for q in QUERIES}}
    for query, body in results:
        assert [a["ad_id"] for a in body["ads"]] == expected[body["index_version"]][query], (query, body)
    seen = Counter(body["index_version"] for _, body in results)
    assert set(seen) == set(expected)
    record_property("requests", len(results))
    record_property("errors", len(errors))
    record_property("answers_per_version", sorted(seen.values()))


def test_an_index_of_another_space_is_refused_and_the_old_one_keeps_serving(app_url, own_redis, encoder):
    before = search(app_url, QUERIES[0]).json()["index_version"]
    bad = publish(own_redis["url"], encoder, ADS, "v9", space="some-other-space")
    assert_refused_while_serving(app_url, bad, before, "space some-other-space does not match the expected space")
    IndexStore(redis_client(own_redis["url"]), "ads").rollback(before)


@pytest.mark.reliability
@pytest.mark.parametrize("damage, reason", [
    (lambda store, v: store.client.delete(store.manifest_key(v)), r"no version '{v}' \(no hlm:ads:v:{v}:manifest\)"),
    (lambda store, v: store.client.setrange(store.chunk_key(v, 0), 64, b"\xff" * 8), r"version {v}: sha256 of its"),
], ids=["missing-manifest", "corrupted-chunk"])
def test_a_damaged_version_is_refused_and_the_old_one_keeps_serving(app_url, own_redis, encoder, damage, reason):
    # Given an older version damaged since (a deleted or evicted manifest, flipped bytes), a newer one serving
    store = IndexStore(redis_client(own_redis["url"]), "ads")
    damaged = publish(own_redis["url"], encoder, ADS, "v7")
    serving = publish(own_redis["url"], encoder, ADS, "v8")
    wait_for_version(app_url, "v8", version=serving)
    damage(store, damaged)
    # When current is pointed back at it by hand (redis-cli SET + PUBLISH: rollback() checks what it can and would
    # refuse a missing manifest)
    store.client.set(store.current_key, damaged)
    store.client.publish(store.channel, damaged)
    # Then the replicas refuse it with a reason that names the damage and keep answering from the newer one
    assert_refused_while_serving(app_url, damaged, serving, reason.format(v=re.escape(damaged)))
    store.rollback(serving)


@pytest.mark.reliability
def test_redis_outage_keeps_serving_and_the_next_version_is_picked_up(app_url, own_redis, encoder, record_property):
    serving = search(app_url, QUERIES[0]).json()["index_version"]
    own_redis["stop"]()
    with pytest.raises(redis.ConnectionError):  # Redis is really down
        redis_client(own_redis["url"]).ping()
    deadline = time.monotonic() + 20
    while not (status := requests.get(f"{app_url}/v1/index", timeout=30).json())["last_error"]:
        assert time.monotonic() < deadline, f"the replica never noticed the outage: {status}"
        time.sleep(0.2)
    for query in QUERIES * 3:  # and the replica has failed to reach it: searches still succeed from memory
        response = search(app_url, query)
        assert response.status_code == 200 and response.json()["index_version"] == serving
    own_redis["start"]()  # no persistence: Redis comes back empty, and a fresh publish must be picked up
    version = publish(own_redis["url"], encoder, ADS, "v3")
    assert wait_for_version(app_url, "v3")["index_version"] == version
    record_property("searches_while_down", len(QUERIES * 3))
    record_property("failed", 0)


# ------------------------------------------------------------------------------------------ API key


def test_without_a_key_every_v1_route_but_healthz_is_a_401_with_a_json_reason(secured_url):
    assert requests.get(f"{secured_url}/v1/healthz", timeout=30).json()["ok"] is True
    for method, path, body in (("POST", "/v1/search", {"query": "drill", "k": 3}),
                               ("POST", "/v1/embed", {"queries": ["drill"]}), ("GET", "/v1/index", None)):
        response = requests.request(method, f"{secured_url}{path}", json=body, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert "Authorization: Bearer <key>" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    # The key is checked before the body is read: malformed JSON without a key is still a 401
    response = requests.post(f"{secured_url}/v1/search", data=b"{not json", timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 401


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer nope"}, {"X-API-Key": "nope"},
                                     {"Authorization": "Bearer key-from-args"}, {"Authorization": API_KEY}])
def test_a_wrong_key_is_a_401_that_does_not_echo_it(secured_url, headers):
    response = requests.post(f"{secured_url}/v1/search", json={"query": "drill", "k": 3}, headers=headers, timeout=30)
    assert response.status_code == 401 and "nope" not in response.text


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}])
def test_the_key_in_either_header_opens_every_route(secured_url, headers):
    search_body = requests.post(f"{secured_url}/v1/search", json={"query": "drill", "k": 3}, headers=headers,
                                timeout=30).json()
    assert len(search_body["ads"]) == 3 and search_body["index_version"]
    assert requests.post(f"{secured_url}/v1/embed", json={"queries": ["drill"]}, headers=headers,
                         timeout=30).status_code == 200
    assert requests.get(f"{secured_url}/v1/index", headers=headers, timeout=30).json()["count"] > 0


def test_an_app_without_a_key_stays_open(app_url):
    assert search(app_url, QUERIES[0]).status_code == 200


# ---------------------------------------------------------------------------------------------- faults, fuzz

FUZZ_EXAMPLES = int(os.environ.get("HLM_FUZZ_EXAMPLES", "25"))  # per operation; `make reliability` runs 200


@pytest.mark.reliability
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_requests_generated_from_the_openapi_schema_never_get_a_5xx(app_url, mode, record_property):
    # positive: requests the schema allows; negative: requests it forbids (wrong types, missing fields, ...)
    schema = schemathesis.openapi.from_url(f"{app_url}/openapi.json")
    statuses: Counter[int] = Counter()

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def answers_without_a_server_error(case) -> None:
        response = case.call(base_url=app_url, timeout=30)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                                             f"{response.text[:300]}")
        response.json()  # every answer, 4xx included, is JSON

    answers_without_a_server_error()
    record_property("statuses", dict(sorted(statuses.items())))
    assert statuses[200 if mode is schemathesis.GenerationMode.POSITIVE else 422] > 0, statuses


@pytest.fixture(scope="module")
def split_url(app_url, own_redis, tiny_bert_dir):
    """The split topology (Api with the index → QueryEncoder tier) beside the one-hop app, with a short timeout."""
    from ray import serve

    from serving.app import build_app

    with pytest.MonkeyPatch.context() as env:
        env.delenv("HLM_API_KEY", raising=False)
        serve.run(build_app({**SMALL, "student": {"model": str(tiny_bert_dir)}, "redis_url": own_redis["url"],
                             "topology": "split", "downstream_timeout_s": SPLIT_TIMEOUT_S}), name="hlm-split",
                  route_prefix="/split")
    yield f"{app_url}/split"
    serve.delete("hlm-split")


SPLIT_TIMEOUT_S = 3.0


def test_the_split_topology_answers_what_the_one_hop_app_answers(app_url, split_url):
    for query in QUERIES:
        one_hop, split = search(app_url, query).json(), search(split_url, query).json()
        assert [a["ad_id"] for a in split["ads"]] == [a["ad_id"] for a in one_hop["ads"]]
        assert split["model_version"] == one_hop["model_version"]


@pytest.mark.reliability
def test_a_killed_encoder_replica_costs_fast_503s_at_most_and_is_replaced(split_url, ray_cluster, record_property):
    from ray.util.state import list_actors

    def encoder_replicas() -> list:
        alive = [("class_name", "=", "ServeReplica:hlm-split:QueryEncoder"), ("state", "=", "ALIVE")]
        return list_actors(ray_cluster["dashboard"], filters=alive)

    wait_for_version(split_url, "v")
    [victim] = encoder_replicas()
    outcomes: list[tuple[float, int | str, float]] = []  # (finished at, status or exception, seconds)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status: int | str = search(split_url, QUERIES[0]).status_code
            except requests.RequestException as e:  # a timeout here is a hung request
                status = type(e).__name__
            outcomes.append((time.monotonic(), status, time.monotonic() - started))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    deadline, replaced_at = killed_at + 120, None
    while time.monotonic() < deadline:
        if replaced_at is None and any(r.actor_id != victim.actor_id for r in encoder_replicas()):
            replaced_at = time.monotonic()
        if replaced_at is not None and any(at > replaced_at and s == 200 for at, s, _ in outcomes):
            break
        time.sleep(0.2)
    stop.set()
    for t in clients:
        t.join(timeout=60)

    statuses = [s for _, s, _ in outcomes]
    assert replaced_at is not None, "Serve did not replace the killed replica within 120 s"
    assert set(statuses) <= {200, 503}, f"only 200 or a fast 503 may come back: {sorted(set(map(str, statuses)))}"
    slowest_503 = max((s for _, status, s in outcomes if status == 503), default=0.0)
    assert slowest_503 <= SPLIT_TIMEOUT_S + 2.0, f"a 503 took {slowest_503:.1f}s, over the {SPLIT_TIMEOUT_S:g}s timeout"
    assert any(at > replaced_at and s == 200 for at, s, _ in outcomes), "no answer from the new replica"
    record_property("requests", len(statuses))
    record_property("503s", statuses.count(503))
    record_property("slowest_503_s", round(slowest_503, 2))
    record_property("replaced_after_s", round(replaced_at - killed_at, 1))


# ---------------------------------------------------------------------------------------------- autoscaling


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_load_adds_a_second_replica_and_it_goes_away_after(app_url, own_redis, tiny_bert_dir, record_property):
    from ray import serve

    from serving.app import build_app

    # Given an app that may scale from 1 to 2 replicas, aiming at 1 request in flight each, with short delays
    with pytest.MonkeyPatch.context() as env:
        env.delenv("HLM_API_KEY", raising=False)
        serve.run(build_app({**SMALL, "student": {"model": str(tiny_bert_dir)}, "redis_url": own_redis["url"],
                             "min_replicas": 1, "max_replicas": 2, "max_batch_size": 1, "target_ongoing_requests": 1,
                             "upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 2}),
                  name="hlm-scale", route_prefix="/scale")
    try:
        assert running_replicas("hlm-scale", "Api") == 1
        # When 8 clients search back to back
        stop, started = threading.Event(), time.monotonic()

        def client() -> None:
            while not stop.is_set():
                search(f"{app_url}/scale", QUERIES[0])

        clients = [threading.Thread(target=client) for _ in range(8)]
        for t in clients:
            t.start()
        try:
            while running_replicas("hlm-scale", "Api") < 2:  # Then a second replica comes up
                assert time.monotonic() - started < 90, "no second replica within 90 s of load"
                time.sleep(0.5)
            scaled_up_s = time.monotonic() - started
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=60)
        # And once the load is gone, it goes away again
        idle_since = time.monotonic()
        while running_replicas("hlm-scale", "Api") > 1:
            assert time.monotonic() - idle_since < 90, "the second replica was still there 90 s after the load"
            time.sleep(0.5)
        record_property("scaled_up_after_s", round(scaled_up_s, 1))
        record_property("scaled_down_after_s", round(time.monotonic() - idle_since, 1))
    finally:
        serve.delete("hlm-scale")
