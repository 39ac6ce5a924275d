"""The recipe job on a real local Ray with tiny models: a full run, a rerun that skips every stage, then a changed
refine setting whose run is killed mid-refine: the rerun resumes refine-L2's Ray Train run from its last checkpoint
and reruns only the refine stages and what follows them, not align, prune or the baselines upstream or beside them.

Fixture: the built-in catalogue split (45 train / 15 dev queries, 120 ads), the tiny 48-d teacher and the session's
tiny 2-layer 32-d student; depths [2, 1], a few steps per phase.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hlm.checkpoint import load_checkpoint
from hlm.encoder import Encoder
from hlm.loss_log import LOSS_CSV, LossLog
from hlm.staging import SUCCESS
from hlm.trec import run_name
from pipelines.recipe import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]  # the module fixture runs 16 stages
REPO = Path(__file__).resolve().parents[2]
STAGES = ["teacher", "ads", "queries", "dev-queries", "init-L1", "align", "prune", "refine-L2", "refine-L1",
          "direct-L2", "direct-L2-ads", "paper-L2", "direct-L1", "direct-L1-ads", "paper-L1", "evaluate"]


def recipe_config(folder: Path, split: dict, student: Path, **recipe) -> Path:
    root = split["root"]
    fast = {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "log_every": 1}
    cfg = {"teacher": {"model": str(split["teacher"])}, "student": {"model": str(student)},
           "embed": {"batch_size": 16}, "train": {"hard_negatives": 2, "hard_negative_ranks": [2, 20]},
           "recipe": {"data": {"train": str(root / "train"), "dev": str(root / "dev")}, "out": str(folder / "out"),
                      "depths": [2, 1], "teacher": {**fast, "hard_negatives": 0}, "align": fast,
                      "prune": {**fast, "steps_per_prune": 3}, "refine": fast, "direct_baseline": fast,
                      "paper_baseline": fast, "parallel_stages": 2, **recipe}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def statuses(printed: str) -> dict[str, str]:
    """The stage table's status column, by stage."""
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] and line.split()[0] in STAGES]
    return {row[0]: row[1] for row in rows if len(row) >= 2 and row[1] in ("ran", "skipped")}


@pytest.fixture(scope="module")
def finished(ray_cluster, catalog_split, tiny_bert_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("recipe")
    config = recipe_config(folder, catalog_split, tiny_bert_dir)
    return {"config": config, "out": folder / "out", "code": main(["--config", str(config)])}


def test_a_full_run_writes_every_stage_and_a_report_with_every_family(finished, catalog_split, capsys):
    assert finished["code"] == 0
    out = finished["out"]
    assert all((out / stage / SUCCESS).exists() for stage in STAGES)
    # the students are in the fine-tuned teacher's space, at the depths asked for
    teacher = Encoder.load(out / "teacher" / "model")
    assert teacher.space != catalog_split["space"]  # phase 1 changed the weights, hence the space
    for depth in (2, 1):
        student = Encoder.load(out / f"refine-L{depth}" / "model")
        assert student.space == teacher.space and student.backbone.config.num_hidden_layers == depth
    report = {r["name"]: r for r in json.loads((out / "evaluate" / "report.json").read_text())}
    assert list(report) == ["teacher (fine-tuned)", "direct dual encoder L2", "paper baseline L2", "HLM L2",
                            "HLM L2 int8", "direct dual encoder L1", "paper baseline L1", "HLM L1", "HLM L1 int8"]
    assert report["direct dual encoder L1"]["index"] == "own" and report["HLM L1"]["index"] == "teacher"
    assert report["teacher (fine-tuned)"]["recovery"]["R@100"] == 1.0
    assert all(r["speed"]["latency_p50_ms"] > 0 and 0 <= r["quality"]["R@100"] <= 1 for r in report.values())
    assert (out / "evaluate" / "quality_vs_latency.png").stat().st_size > 0
    # one TREC run per report row, with the dev labels as qrels
    assert sorted(p.name for p in (out / "evaluate" / "runs").iterdir()) == sorted(
        f"{run_name(name)}.trec" for name in report)
    assert (out / "evaluate" / "qrels.trec").stat().st_size > 0
    # every training stage (teacher fine-tune, align, prune, refine) left its loss per step, as CSV and plot
    for stage in ("teacher", "align", "prune", "refine-L2", "refine-L1"):
        lines = (out / stage / "loss.csv").read_text().splitlines()
        assert lines[0].startswith("step,phase,loss,lr") and len(lines) > 1, stage
        assert (out / stage / "loss.png").read_bytes()[:4] == b"\x89PNG", stage


def test_a_rerun_skips_every_stage_and_changes_nothing(finished, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished["out"].rglob("model.safetensors")}
    capsys.readouterr()
    assert main(["--config", str(finished["config"])]) == 0
    assert set(statuses(capsys.readouterr().out).values()) == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in finished["out"].rglob("model.safetensors")} == before


@pytest.fixture(scope="module")
def killed_then_rerun(finished, ray_cluster) -> dict:
    """The finished run's refine changed to 60 steps with a checkpoint every 2, killed (SIGKILL of the job's process
    group) once refine-L2 has reported a checkpoint, then run again to the end: what the rerun printed and wrote.
    The killed run goes one stage at a time, the rerun two at a time: how many run at once is in no stage's key."""
    changed = ["--set", "recipe.refine.max_steps=60", "--set", "recipe.refine.checkpoint_every=2"]
    cmd = [sys.executable, "-m", "pipelines.recipe", "--config", str(finished["config"]), *changed]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs_address"]}
    out, started = finished["out"], time.time()
    proc = subprocess.Popen([*cmd, "--set", "recipe.parallel_stages=1"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300

    def checkpointed() -> bool:
        return any(p.stat().st_mtime > started for p in (out / "ray_results").glob("refine-L2-*/checkpoint_*"))

    while not checkpointed() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    refine_after_kill = json.loads((out / "refine-L2" / "metrics.json").read_text())["steps"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the rerun needs no process of its own: only the kill did
        code = main(cmd[3:])
    assert code == 0, printed.getvalue()[-3000:]
    return {"killed_while_checkpointed": checkpointed(), "refine_steps_after_kill": refine_after_kill,
            "status": statuses(printed.getvalue()),
            "refine": json.loads((out / "refine-L2" / "metrics.json").read_text()),
            "refine_loss_steps": [int(row["step"])
                                  for row in LossLog.read_csv(out / "refine-L2" / LOSS_CSV, "refine").rows]}


def test_a_changed_refine_setting_reruns_only_refine_and_what_follows(killed_then_rerun):
    status = killed_then_rerun["status"]
    ran = {stage for stage, s in status.items() if s == "ran"}
    assert ran == {"refine-L2", "refine-L1", "evaluate"}
    # upstream (the models refine starts from) and beside it (the paper baseline trains with its own settings)
    assert {status[s] for s in ("teacher", "ads", "align", "prune", "direct-L1", "paper-L2", "paper-L1")} == {"skipped"}


def test_a_run_killed_mid_stage_resumes_from_its_last_checkpoint(killed_then_rerun):
    # Given the killed run had reported a checkpoint of the changed refine-L2 but not finished it
    assert killed_then_rerun["killed_while_checkpointed"]
    assert killed_then_rerun["refine_steps_after_kill"] == 4  # the finished run's folder was still in place
    # Then the rerun resumed refine-L2 past step 0 instead of starting over, and finished it
    refine = killed_then_rerun["refine"]
    assert refine["start_step"] > 0 and refine["steps"] == 60
    # in the one Ray run the killed run had started, whose last checkpoint is step 60
    assert load_checkpoint(Path(refine["run_path"]) / "step-0000060")[2] == 60
    # and its loss record has every step exactly once: the killed run's up to its checkpoint, then the resumed run's
    assert killed_then_rerun["refine_loss_steps"] == list(range(1, 61))
