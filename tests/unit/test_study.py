"""The study's pure pieces (trial layout, Pareto front) and one trial run in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlm.config import load_config
from hlm.metrics import PRIMARY_METRIC
from hlm.study import (
    StudyConfig,
    StudyInputs,
    StudySweep,
    Trial,
    pareto_front,
    run_trial,
    teacher_quality,
    trials,
    write_study_report,
)


def test_one_at_a_time_varies_exactly_one_axis_from_the_base_point():
    sweep = StudySweep(objectives=["l2", "cosine", "score_kl"], widths=["projection", "truncate"], depths=[6, 3],
                       lrs=[1e-4, 3e-4])
    layout = trials(sweep)
    base = Trial("l2", "projection", 6, 1e-4)
    assert layout[0] == base
    assert len(layout) == 1 + 2 + 1 + 1 + 1
    for t in layout[1:]:
        assert sum(a != b for a, b in zip(vars(t).values(), vars(base).values(), strict=True)) == 1


def test_grid_design_is_the_full_product_and_names_are_unique():
    layout = trials(StudySweep(design="grid", objectives=["l2", "cosine"], widths=["projection", "truncate"],
                               depths=[2], lrs=[1e-4, 1e-3]))
    assert len(layout) == 8
    assert len({t.name for t in layout}) == 8


def test_pareto_front_keeps_points_no_other_point_beats_on_both_axes():
    # (latency, recovery): b dominates a; c is faster but worse; d is dominated by c
    points = [(10.0, 0.90), (8.0, 0.95), (3.0, 0.80), (4.0, 0.70)]
    assert pareto_front(points) == [1, 2]


def test_a_trial_aligns_a_student_and_reports_quality_recovery_and_speed(catalog_split, tiny_bert_dir, tmp_path):
    cfg = load_config(None, [f"student.model={tiny_bert_dir}", f"teacher.model={catalog_split['teacher']}",
                             "train.max_steps=6", "train.batch_size=8", "train.lr=3e-3", "study.latency_queries=5"],
                      StudyConfig)
    inputs = StudyInputs(*(catalog_split[k] for k in ("train_queries", "teacher_queries", "ads_emb", "dev_queries",
                                                       "dev_labels", "dev_teacher_queries")))
    teacher = teacher_quality(inputs)
    results = [run_trial(Trial(objective, width, 1, 3e-3), cfg, inputs, teacher)
               for objective, width in (("l2", "projection"), ("cosine", "truncate"))]
    projection, truncated = results
    assert projection["dim"] == 48 and truncated["dim"] == 32  # the tiny student is 32 wide, the teacher 48
    assert projection["layers"] == truncated["layers"] == 1
    assert projection["steps"] == 6 and projection["final_loss"] > 0
    for r in results:
        assert 0 <= r["quality"]["R@100"] <= 1
        assert r["recovery"][PRIMARY_METRIC] == pytest.approx(r["quality"][PRIMARY_METRIC] / teacher[PRIMARY_METRIC])
        assert r["speed"]["latency_p50_ms"] > 0
    report = write_study_report(results, {"quality": teacher, "speed": {"latency_p50_ms": 1.0}}, tmp_path)
    assert report["plot"].stat().st_size > 0
    assert "l2-projection-L1" in report["md"].read_text()


def test_the_shipped_study_config_loads_and_lays_out_the_base_point_plus_one_trial_per_other_value():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "study.yaml", schema=StudyConfig)
    laid_out = trials(cfg.study)
    assert len(laid_out) == 6 and laid_out[0] == Trial("l2", "projection", 6, 1e-4, "cosine")
    assert len({t.name for t in laid_out}) == 6
