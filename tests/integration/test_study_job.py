"""The study job on a real local Ray: Ray Tune runs the sweep's trials and one report gathers them."""

from __future__ import annotations

import json

import pytest

from pipelines.study import main

pytestmark = pytest.mark.integration


def test_study_runs_every_trial_as_a_tune_trial_and_writes_table_and_pareto_plot(ray_cluster, catalog_split,
                                                                                 tiny_bert_dir, tmp_path, capsys):
    args = ["--out", str(tmp_path / "study")]
    for flag in ("queries", "teacher-queries", "ads-emb", "dev-queries", "dev-labels", "dev-teacher-queries"):
        key = "train_queries" if flag == "queries" else flag.replace("-", "_")
        args += [f"--{flag}", str(catalog_split[key])]
    sets = [f"student.model={tiny_bert_dir}", f"teacher.model={catalog_split['teacher']}", "train.max_steps=4",
            "train.batch_size=8", "study.objectives=[l2, cosine]", "study.widths=[projection]", "study.depths=[2]",
            "study.lrs=[0.003]", "study.latency_queries=5", "study.cpus_per_trial=1"]
    assert main(args + [item for s in sets for item in ("--set", s)]) == 0
    report = json.loads((tmp_path / "study/study.json").read_text())
    assert sorted(t["trial"] for t in report["trials"]) == ["cosine-projection-L2-lr0.003-cosine",
                                                            "l2-projection-L2-lr0.003-cosine"]
    assert all(t["steps"] == 4 and t["dim"] == 48 for t in report["trials"])
    assert report["teacher"]["speed"]["latency_p50_ms"] > 0
    assert (tmp_path / "study/pareto.png").stat().st_size > 0
    assert "2 trials in" in capsys.readouterr().out
