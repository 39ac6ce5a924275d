"""The `gpu` profile end to end where CUDA exists: the one-hop replica takes a GPU, runs bf16, and ranks like the
fp32 encoder on CPU. Skipped on machines without CUDA (CI, the 2-core dev box)."""

from __future__ import annotations

import pytest
import requests
import torch

from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the gpu profile needs CUDA")]
ADS = [f"{c} {m}" for c in ("cordless drill", "ceiling paint", "brass lamp", "oak door") for m in ("black", "steel")]


def test_the_gpu_profile_serves_bf16_on_a_gpu_replica_and_ranks_like_fp32(ray_cluster, redis_url, tiny_bert_dir):
    from ray import serve

    from serving.app import build_app
    from tests.conftest import free_port

    encoder = Encoder.load(tiny_bert_dir)  # fp32 on CPU: the reference
    index = AdIndex.build([f"gpu-{i}" for i in range(len(ADS))], encoder.encode(ADS, kind="ad"), encoder.space)
    IndexStore(redis_client(redis_url), "ads-gpu").publish(index, source="gpu-smoke")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"profile": "gpu", "student": {"model": str(tiny_bert_dir)}, "redis_url": redis_url,
                         "index": "ads-gpu", "replica_cpus": 0.25, "max_replicas": 1}), name="hlm-gpu",
              route_prefix="/gpu")
    try:
        body = requests.post(f"http://127.0.0.1:{port}/gpu/v1/search", json={"query": "cordless drill", "k": 3},
                             timeout=60).json()
        expected = index.search_ids(encoder.encode(["cordless drill"]), 3)[0]
        assert body["ads"][0]["ad_id"] == expected[0][0]
        assert abs(body["ads"][0]["score"] - expected[0][1]) < 0.05  # bf16 vs fp32
    finally:
        serve.delete("hlm-gpu")
