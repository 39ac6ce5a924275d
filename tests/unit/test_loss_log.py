"""The per-step loss record: a CSV that plain `csv` reads back, and a PNG plot."""

from __future__ import annotations

import csv
import math

from hlm.loss_log import LossLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_csv_has_one_row_per_step_with_its_terms_and_reads_back(tmp_path):
    log = LossLog("refine")
    for step in (1, 2, 3):
        log.add(step, loss=3.0 / step, lr=1e-3 * step, **{"loss/contrastive": 2.0 / step, "loss/l2": 1.0 / step})
    log.add(4, loss=0.5, lr=4e-3)  # a row without terms leaves their cells empty
    path = log.write_csv(tmp_path / "loss.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "phase", "loss", "lr", "loss/contrastive", "loss/l2"]
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and {r["phase"] for r in rows} == {"refine"}
    assert float(rows[1]["loss"]) == 1.5 and rows[3]["loss/l2"] == ""
    assert LossLog.read_csv(path, "refine").rows == log.rows  # what a resumed run appends to
    LossLog.read_csv(path, "refine").write_csv(tmp_path / "again.csv")  # as the job copies it out of a checkpoint
    assert (tmp_path / "again.csv").read_text() == path.read_text()


def test_extra_columns_follow_the_loss_terms_and_a_missing_file_is_an_empty_record(tmp_path):
    log = LossLog("prune")
    log.add(1, loss=1.0, lr=1e-3, n_layers=2, **{"loss/a": 0.5})
    assert log.columns == ["step", "phase", "loss", "lr", "loss/a", "n_layers"]
    log.write_csv(tmp_path / "loss.csv")
    assert LossLog.read_csv(tmp_path / "loss.csv", "prune").rows == [{"step": 1, "loss": 1.0, "lr": 1e-3,
                                                                     "loss/a": 0.5, "n_layers": 2}]
    assert LossLog.read_csv(tmp_path / "absent.csv", "prune").rows == []


def test_the_plot_is_a_png(tmp_path):
    log = LossLog("align")
    for step in range(1, 21):
        log.add(step, loss=math.exp(-step / 5), lr=1e-3)
    path = log.plot(tmp_path / "loss.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
