"""Align-phase training throughput: Ray Train (a 1-worker TorchTrainer, as `pipelines.train` runs it) vs the plain
`hlm.train.train_align` loop, same model, batch, steps and cores, in one run.

`samples_per_s` is what the loop itself measures (`hlm.train.fit`, from its first step to its last), so the paths
are comparable; `wall_s` adds what each costs around the loop (loading the model; for Ray also starting the worker,
shipping the data and writing the final checkpoint). Ray sets OMP_NUM_THREADS to a worker's CPU reservation, 1 by
default, so the plain loop runs on this process's torch threads (`python -m bench.run --threads`, 1 by default):
at 1 the ratio is Ray Train's own cost; at 2 it includes what the 1-CPU reservation costs. The ratio is over the
mean of a plain run before and one after the Ray run.

The targets are random unit vectors of the teacher's width (768), not real teacher embeddings: the work per step
depends only on the shapes (the student gets its projection head 384 -> 768 as in a real run).
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
import torch

from bench.common import save_figure, write_result
from hlm.catalog import generate_catalog
from hlm.cli import init_ray
from hlm.config import Config, ModelRef, load_config
from hlm.encoder import Encoder
from hlm.phase_data import PhaseData
from hlm.train import train_align
from pipelines.train import run_train

logger = logging.getLogger(__name__)

TEACHER_DIM = 768


def plain(model: str, data: PhaseData, cfg: Config) -> dict:
    """`train_align` in this process."""
    started = time.perf_counter()
    result = train_align(Encoder.load(ModelRef(model=model), cfg.runtime), data.queries, data.teacher_q_emb, cfg.train,
                         teacher_space=data.teacher_space)
    return {"samples_per_s": round(result.samples_per_s, 2), "wall_s": round(time.perf_counter() - started, 2),
            "torch_threads": torch.get_num_threads()}


def ray_train(model: str, data: PhaseData, cfg: Config) -> dict:
    """`pipelines.train.run_train` with one worker; starts (and stops) a local Ray unless one is running."""
    started_ray = not ray.is_initialized()
    init_ray(cfg.cluster.num_workers + 1, include_dashboard=False, log_to_driver=False)  # as pipelines.train does
    try:
        started = time.perf_counter()
        result = run_train(cfg, ModelRef(model=model), data, f"bench-align-{uuid.uuid4().hex[:6]}")
        wall = time.perf_counter() - started
    finally:
        if started_ray:
            ray.shutdown()
    return {"samples_per_s": round(result.metrics["samples_per_s"], 2), "wall_s": round(wall, 2)}


def run(out_dir: Path, *, quick: bool = False, model: str = "student-default") -> dict:
    steps, batch = (6, 16) if quick else (30, 32)
    queries = generate_catalog(n_ads=500, n_queries=steps * batch).queries["text"].to_pylist()
    targets = np.random.default_rng(0).standard_normal((len(queries), TEACHER_DIM), dtype=np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)  # (n, 768) unit rows, like teacher embeddings
    data = PhaseData(queries, targets, teacher_space="bench-teacher")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides=["train.phase=align", f"train.max_steps={steps}", f"train.batch_size={batch}",
                                     f"train.log_every={steps}", "cluster.num_workers=1",
                                     f"cluster.storage_path={tmp}"])
        # plain before and after Ray: a swing in the machine's load between them shows as two different rows
        before, on_ray, after = plain(model, data, cfg), ray_train(model, data, cfg), plain(model, data, cfg)
    local = {k: (before[k] + after[k]) / 2 for k in ("samples_per_s", "wall_s")}
    numbers = {"steps": steps, "batch_size": batch,
               "ratio_ray_over_plain": round(on_ray["samples_per_s"] / local["samples_per_s"], 3),
               "wall_ratio_plain_over_ray": round(local["wall_s"] / on_ray["wall_s"], 3),
               "runs": [{"path": "plain_before", **before}, {"path": "ray_train_1_worker", **on_ray},
                        {"path": "plain_after", **after}]}
    config = {"model": model, "phase": "align", "steps": steps, "batch_size": batch, "workers": 1,
              "teacher_dim": TEACHER_DIM, "quick": quick}
    path = write_result(out_dir, "train_throughput", config, numbers)
    logger.info("train_throughput benchmark: %s -> %s", numbers, path)
    return numbers


def plot(record: dict, out_dir: Path) -> list[Path]:
    """train_throughput.png: in-loop samples/s per path."""
    import matplotlib.pyplot as plt

    runs = record["numbers"]["runs"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["path"] for r in runs], [r["samples_per_s"] for r in runs], color="tab:purple")
    ax.set_ylabel("samples/s (align phase, in the loop)")
    ax.set_title(f"{record['config']['model']}: Ray Train vs a plain loop")
    return save_figure(fig, out_dir, "train_throughput")
