"""A Ray Train worker SIGKILLed mid-phase: FailureConfig restarts the worker group, which resumes from the last
checkpoint (the step count goes on from there) and finishes the phase."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from ray.util.state import list_actors

from pipelines.train import main
from tests.integration.test_train_job import job_args

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def wait_for_checkpoint(run_dir: Path, timeout_s: float = 300) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(run_dir.glob("step-*")) if run_dir.is_dir() else []
        if found:
            return found[0]
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint under {run_dir} after {timeout_s}s")


def test_a_killed_train_worker_resumes_from_the_last_checkpoint_and_finishes(ray_cluster, tiny_bert_dir,
                                                                           catalog_split, tmp_path, record_property):
    out, run_name = tmp_path / "align", "killed-worker"
    args = [*job_args(catalog_split, "align", out, "cluster.num_workers=2", "cluster.max_failures=1",
                      "train.max_steps=120", "train.checkpoint_every=5", init=tiny_bert_dir, dev=False),
            "--run-name", run_name]
    codes: list[int] = []
    job = threading.Thread(target=lambda: codes.append(main(args)))
    job.start()
    wait_for_checkpoint(tmp_path / "ray_results" / run_name)
    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    workers = list_actors(ray_cluster["dashboard"], filters=alive)  # this session's cluster, not another on the box
    assert workers, "no live Ray Train worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    job.join(timeout=600)

    assert codes == [0]
    record = json.loads((out / "metrics.json").read_text())
    assert record["steps"] == 120
    assert 5 <= record["start_step"] < 120  # the restarted group began at a checkpoint, not at step 0
    record_property("resumed_at_step", record["start_step"])
    record_property("final_step", record["steps"])
