"""The first serve works: the Serve config `make demo` leaves and `serve run serving.app:build_app student=PATH` both
serve a student in the published index's space; a student of another space (student-default's case) is a 503 that
says why. On a real local Ray and a real redis-server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import yaml

from hlm.config import ModelRef
from hlm.data import read_embeddings
from hlm.deployment import AppArgs
from hlm.encoder import Encoder, space_of
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore
from hlm.tiny import save_tiny_encoder
from pipelines.demo import write_serve_config
from tests.conftest import assert_valid_serve_config, free_port

pytestmark = pytest.mark.integration
INDEX = "first-serve"  # not "ads": other modules publish their own spaces there on the session Redis
SMALL = {"replica_cpus": 0.25, "poll_s": 0.3, "min_replicas": 1, "max_replicas": 1, "index": INDEX}


@pytest.fixture(scope="module")
def published(catalog_split, redis_url, tmp_path_factory) -> dict:
    """The teacher's ad index published to Redis, a student aligned to that teacher (the recipe's refine output
    records the teacher's space) and an off-the-shelf student in its own space, as student-default is."""
    root = tmp_path_factory.mktemp("first-serve")
    student = Encoder.load(save_tiny_encoder(root / "raw", "bert", hidden=48, seed=7))
    student.settings.target_space = catalog_split["space"]
    aligned = student.save(root / "runs/refine/model")
    own_space = save_tiny_encoder(root / "student-default", "bert", hidden=48, seed=8)
    ids, emb, space = read_embeddings(catalog_split["ads_emb"])
    version = IndexStore(redis_client(redis_url), INDEX).publish(AdIndex.build(ids, emb, space["fingerprint"]))
    return {"root": root, "aligned": Path(aligned), "own_space": own_space, "version": version,
            "space": space["fingerprint"]}


@pytest.fixture(scope="module")
def serve_url(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def run_app(args: dict, name: str, redis_url: str) -> None:
    from ray import serve

    from serving.app import build_app

    serve.run(build_app({**args, **SMALL, "redis_url": redis_url}), name=name, route_prefix=f"/{name}")


def search(url: str, timeout: float = 20.0) -> requests.Response:
    """POST /v1/search until the replica has polled Redis once (a fresh replica may answer 503 for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        r = requests.post(f"{url}/v1/search", json={"query": "cordless drill", "k": 3}, timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.3)


def test_the_config_the_demo_leaves_serves_its_student_against_the_published_index(published, serve_url,
                                                                                   redis_url, tmp_path):
    # Given the Serve config the demo writes for its refined student
    config = yaml.safe_load(write_serve_config(tmp_path, published["aligned"]).read_text())
    assert_valid_serve_config(config)
    args = config["applications"][0]["args"]
    # Then its student is in the published index's space
    assert space_of(ModelRef.model_validate(args["student"])) == published["space"]
    # And, served, it answers from the published version
    run_app(args, "demo", redis_url)
    r = search(f"{serve_url}/demo")
    assert r.status_code == 200, r.text
    assert r.json()["index_version"] == published["version"] and len(r.json()["ads"]) == 3


def test_a_student_path_arg_serves_like_the_mapping(published, serve_url, redis_url, monkeypatch):
    # Given `serve run serving.app:build_app student=runs/refine/model` (Serve passes the value as a string),
    # started from the folder the path is relative to
    monkeypatch.chdir(published["root"])
    assert AppArgs.model_validate({"student": "runs/refine/model"}).student.model == str(published["aligned"])
    # When it is served
    run_app({"student": "runs/refine/model"}, "path", redis_url)
    # Then it searches the published index
    r = search(f"{serve_url}/path")
    assert r.status_code == 200, r.text
    assert r.json()["index_version"] == published["version"]


def test_a_student_of_another_space_is_a_503_that_names_the_refused_space(published, serve_url, redis_url):
    # Given a student in its own space (student-default's case), not the teacher's
    run_app({"student": str(published["own_space"])}, "other", redis_url)
    # When a query comes in
    r = search(f"{serve_url}/other", timeout=3)
    # Then it is a 503 that says which version was refused, both spaces, and which student to serve instead
    assert r.status_code == 503
    detail = r.json()["detail"]
    assert f"refused version {published['version']}" in detail and published["space"] in detail
    assert "not student-default" in detail
    status = requests.get(f"{serve_url}/other/v1/index", timeout=30).json()
    assert status["version"] is None and published["version"] in status["refused"]
