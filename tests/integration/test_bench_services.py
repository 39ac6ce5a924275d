"""The benchmarks that need a real Redis (faiss_scale) or a real Ray (train_throughput), in quick mode.

Like tests/unit/test_bench.py they pin the record's shape, never a speed.
"""

from __future__ import annotations

import json

import pytest

from bench import faiss_scale, train_throughput
from bench.common import threads

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):  # as `python -m bench.run` runs them
        yield


def test_faiss_scale_benchmark_builds_searches_and_publishes_each_index(tmp_path, redis_url):
    numbers = faiss_scale.run(tmp_path, quick=True, redis_url=redis_url)
    record = json.loads((tmp_path / "faiss_scale.json").read_text())
    rows = record["numbers"]["rows"]
    assert record["name"] == "faiss_scale" and rows == numbers["rows"]
    assert [r["index"] for r in rows] == ["Flat", "HNSW32", "IVF-PQ", "IVF-PQ+SQ8"]
    recall = {r["index"]: r["recall@100"] for r in rows}
    assert recall["Flat"] == 1.0  # the reference
    assert recall["IVF-PQ+SQ8"] > recall["IVF-PQ"]  # re-scoring the PQ candidates with SQ8 codes
    for row in rows:
        assert row["bytes"] > 0 and row["publish_s"] > 0 and row["load_s"] > 0 and 0 < row["recall@100"] <= 1


def test_train_throughput_benchmark_compares_ray_train_with_the_plain_loop(tmp_path, ray_cluster, tiny_bert_dir):
    numbers = train_throughput.run(tmp_path, quick=True, model=str(tiny_bert_dir))
    record = json.loads((tmp_path / "train_throughput.json").read_text())
    assert record["name"] == "train_throughput" and record["numbers"] == numbers
    assert [r["path"] for r in numbers["runs"]] == ["plain_before", "ray_train_1_worker", "plain_after"]
    assert all(r["samples_per_s"] > 0 and r["wall_s"] > 0 for r in numbers["runs"])
    assert numbers["ratio_ray_over_plain"] > 0 and numbers["runs"][0]["torch_threads"] == 1
