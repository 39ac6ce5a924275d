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

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.slow]


def wait_for_a_registered_checkpoint(run_dir: Path, timeout_s: float = 300) -> int:
    """The step of the first checkpoint the Train controller has registered (its snapshot file lists it).

    A `step-*` folder appears while rank 0 uploads; the controller registers it only when it next polls the
    workers, and a report still pending when a worker dies is lost with it. Killing after registration is the
    case FailureConfig promises to resume from."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            results = []
        if results:
            return min(r["metrics"]["step"] for r in results)
        time.sleep(0.05)
    raise TimeoutError(f"no registered checkpoint in {snapshot} after {timeout_s}s")


def test_a_killed_train_worker_resumes_from_the_last_checkpoint_and_finishes(ray_cluster, tiny_bert_dir,
                                                                           catalog_split, tmp_path, record_property):
    out, run_name = tmp_path / "align", "killed-worker"
    args = [*job_args(catalog_split, "align", out, "cluster.num_workers=2",
                      "train.max_steps=400", "train.checkpoint_every=10", init=tiny_bert_dir, dev=False),
            "--run-name", run_name]
    codes: list[int] = []
    job = threading.Thread(target=lambda: codes.append(main(args)))
    job.start()
    registered = wait_for_a_registered_checkpoint(tmp_path / "ray_results" / run_name)
    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    workers = list_actors(ray_cluster["dashboard"], filters=alive)  # this session's cluster, not another on the box
    assert workers, "no live Ray Train worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    job.join(timeout=600)

    assert codes == [0]
    record = json.loads((out / "metrics.json").read_text())
    assert record["steps"] == 400
    assert registered <= record["start_step"] < 400  # the restarted group began at a checkpoint, not at step 0
    record_property("killed_after_step", registered)
    record_property("resumed_at_step", record["start_step"])
    record_property("final_step", record["steps"])
