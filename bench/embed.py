"""Ray Data embedding job vs a plain single-process batched loop: same encoder, same rows, same cores, one run."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from bench.common import threads, write_result
from hlm.catalog import generate_catalog
from hlm.config import ModelRef, load_config
from hlm.data import ADS, write_table
from hlm.embedding import EmbedBatch, embed_plain, validate_inputs
from pipelines.embed import run_embed

logger = logging.getLogger(__name__)


def run(out_dir: Path, *, quick: bool = False, model: str = "teacher-default") -> dict:
    n_ads, batch_size = (200, 32) if quick else (3000, 64)
    cfg = load_config(overrides=[f"embed.batch_size={batch_size}", "embed.num_actors=2", "embed.num_cpus=1"])
    ref = ModelRef(model=model)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_table(generate_catalog(n_ads=n_ads, n_queries=10).ads, Path(tmp) / "ads.parquet", ADS)

        # Plain loop: one process, torch using every core (whatever `bench.run --threads` set), read → encode → write.
        with threads(os.cpu_count() or 1):
            started = time.perf_counter()
            embedder = EmbedBatch(ref, "ads", batch_size, cfg.runtime)
            rows = embed_plain(validate_inputs(src, "ads").rows, embedder, batch_size)
            pq.write_table(rows, Path(tmp) / "plain.parquet")
            plain_s = time.perf_counter() - started

        # Ray Data: 2 single-threaded actors on the same 2 cores, plus a logical CPU for reading and writing.
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        try:
            record = run_embed(cfg, ref, src, "ads", Path(tmp) / "ray")
        finally:
            ray.shutdown()
        ray_s = record["seconds"]
    numbers = {"rows": n_ads, "plain_loop_s": round(plain_s, 2), "ray_data_s": round(ray_s, 2),
               "plain_loop_rows_per_s": round(n_ads / plain_s, 1), "ray_data_rows_per_s": round(n_ads / ray_s, 1),
               "ratio_ray_over_plain": round(plain_s / ray_s, 3), "goal_ratio": 0.85}
    path = write_result(out_dir, "embed", {"model": model, "batch_size": batch_size, "ray_actors": 2,
                                           "plain_loop_threads": os.cpu_count(), "quick": quick}, numbers)
    logger.info("embed benchmark: %s -> %s", numbers, path)
    return numbers
