"""The training job's command line without Ray: which Ray Train run it starts or resumes.

`train_phase` (the Ray Train part) is replaced by a recorder here; that a run of the same name resumes from its
newest checkpoint is pinned on a real Ray by tests/integration/test_recipe_job.py, which kills one mid-stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import train as train_job


@pytest.fixture
def runs(monkeypatch) -> list[str]:
    """The run name of every `train_phase` call, which returns the record a finished 3-step run would."""
    names: list[str] = []

    def recorded(cfg, init, inputs, out: Path, run_name: str) -> dict:
        names.append(run_name)
        return {"phase": cfg.train.phase, "run_name": run_name, "start_step": 0, "steps": 3, "workers": 1,
                "seconds": 1.0, "first_loss": 1.0, "final_loss": 0.5, "samples_per_s": 10.0,
                "model": str(out / "model"), "loss_csv": str(out / "loss.csv"), "loss_plot": str(out / "loss.png")}

    monkeypatch.setattr(train_job, "train_phase", recorded)
    return names


def align_args(tmp_path: Path) -> list[str]:
    return ["--phase", "align", "--out", str(tmp_path / "out"), "--queries", str(tmp_path / "q.parquet"),
            "--teacher-queries", str(tmp_path / "tq.parquet")]


def test_a_named_run_is_resumed_by_its_name_and_the_summary_says_how(runs, tmp_path, capsys):
    assert train_job.main([*align_args(tmp_path), "--run-name", "resume-me"]) == 0
    assert train_job.main([*align_args(tmp_path), "--run-name", "resume-me"]) == 0
    assert runs == ["resume-me", "resume-me"]
    assert "resume: --run-name resume-me" in capsys.readouterr().out


def test_without_a_name_every_run_is_a_new_one_named_for_its_phase(runs, tmp_path):
    assert train_job.main(align_args(tmp_path)) == 0
    assert train_job.main(align_args(tmp_path)) == 0
    assert len(set(runs)) == 2 and all(name.startswith("align-") for name in runs)
