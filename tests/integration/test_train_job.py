"""The Ray Train job on a real local Ray: 2-worker align on queries and ad texts, refine with hard negatives, prune,
and a clear exit code 2 for bad inputs. Resuming a killed run from its last checkpoint is pinned through the recipe
(tests/integration/test_recipe_job.py), which trains with the same `train_phase`; `--run-name` by a unit test.

Fixture: the built-in catalogue (120 ads, 60 queries, 45 train / 15 dev), a tiny 48-d teacher (seed 1) whose ad
and query embeddings are computed once in-process and written as embeddings files, and the session's tiny 32-d
student (a projection head takes it into the teacher's width).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hlm.config import TrainJob, load_config
from hlm.encoder import Encoder
from hlm.phase_data import read_phase_data
from hlm.pruning import num_layers
from hlm.space import Embeddings
from hlm.train import train_refine
from pipelines import train as train_job
from pipelines.train import main

pytestmark = pytest.mark.integration


def loss_rows(out: Path, phase: str) -> list[dict[str, str]]:
    """OUT/loss.csv read with plain csv, after checking it is one phase's with finite losses, and that the plot
    beside it is a PNG."""
    with (out / "loss.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["phase"] for r in rows} == {phase} and all(math.isfinite(float(r["loss"])) for r in rows)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


def job_args(data: dict, phase: str, out: Path, *sets: str, init: Path | None = None, dev: bool = True) -> list[str]:
    root = data["root"]
    args = ["--phase", phase, "--out", str(out), "--queries", str(root / "train/queries.parquet"),
            "--teacher-queries", str(root / "emb/queries_train.parquet"), "--ads-emb", str(root / "emb/ads.parquet"),
            "--set", f"cluster.storage_path={out.parent / 'ray_results'}", "--set", "train.batch_size=8",
            "--set", "train.lr=3e-3", "--set", "train.log_every=1"]
    if phase == "refine":
        args += ["--labels", str(root / "train/labels.parquet")]
    if dev:
        args += ["--dev-queries", str(root / "dev/queries.parquet"), "--dev-labels", str(root / "dev/labels.parquet"),
                 "--dev-teacher-queries", str(root / "emb/queries_dev.parquet")]
    if init is not None:
        args += ["--init", str(init)]
    return args + [item for s in sets for item in ("--set", s)]


def test_align_on_two_workers_trains_on_queries_and_ad_texts_and_writes_a_student_in_the_teacher_space(
        ray_cluster, tiny_bert_dir, catalog_split, tmp_path, capsys, monkeypatch):
    # When the align job runs on 2 Ray Train workers, given the ad texts as well, started from a folder named
    # relative to the shell's directory
    out, ads = tmp_path / "align", catalog_split["root"] / "train/ads.parquet"
    monkeypatch.chdir(tiny_bert_dir.parent)
    code = main(job_args(catalog_split, "align", out, "cluster.num_workers=2", init=Path(tiny_bert_dir.name))
                + ["--ads", str(ads)])
    # Then it writes a student aligned to the teacher's space, trained over both shards
    assert code == 0
    student = Encoder.load(out / "model")
    assert student.space == catalog_split["space"] and student.dim == 48
    record = json.loads((out / "metrics.json").read_text())
    # one epoch at batch 8 per rank over the 45 train queries and the 120 ad texts, split over the 2 ranks
    epoch = (45 + 120) // 2 // 8
    assert (record["phase"], record["start_step"], record["steps"], record["workers"]) == ("align", 0, epoch, 2)
    assert record["final_loss"] < record["first_loss"]
    # and evaluates it on the dev split against the teacher
    assert {"P@100", "R@100", "recovery/P@100"} <= record["dev"].keys() and "P@100" in record["dev_teacher"]
    assert not (out / "model" / "trainer_state.pt").exists()
    # and records the loss of every optimizer step (averaged over the 2 ranks) beside the model, not in it
    rows = loss_rows(out, "align")
    assert [int(r["step"]) for r in rows] == list(range(1, epoch + 1))
    assert float(rows[0]["loss"]) == pytest.approx(record["first_loss"]) and not (out / "model" / "loss.csv").exists()
    printed = capsys.readouterr().out
    assert f"trained phase align: steps 0 -> {epoch} on 2 worker(s)" in printed and str(out / "model") in printed


def test_refine_trains_against_frozen_teacher_ads_with_mined_hard_negatives(ray_cluster, tiny_bert_dir, catalog_split,
                                                                            tmp_path, capsys, monkeypatch):
    # Given the teacher's ad embeddings, and a spy on the training data the driver hands to the workers
    ads_file, handed = catalog_split["ads_emb"], []
    ads_bytes, ads = ads_file.read_bytes(), Embeddings.read(catalog_split["ads_emb"])
    monkeypatch.setattr(train_job, "read_phase_data", lambda job, inputs: handed.append(read_phase_data(job, inputs))
                        or handed[-1])
    # When refine runs with 3 hard negatives per pair mined from the teacher's ranks [0, 30)
    out = tmp_path / "refine"
    code = main(job_args(catalog_split, "refine", out, "train.max_steps=4", "train.hard_negatives=3",
                         "train.hard_negative_ranks=[0, 30]", "train.l2_weight=0.5", init=tiny_bert_dir))
    assert code == 0
    record = json.loads((out / "metrics.json").read_text())
    assert (record["steps"], record["workers"]) == (4, 1) and record["final_loss"] > 0
    # its loss record has a row per step with the two weighted terms that make up the loss
    rows = loss_rows(out, "refine")
    assert len(rows) == 4 and all(float(r["loss"]) == pytest.approx(float(r["loss/contrastive"]) +
                                                                     float(r["loss/l2"])) for r in rows)
    assert "trained phase refine" in capsys.readouterr().out
    # Then the workers trained against the teacher's ad vectors as written, and the file is untouched
    data = handed[0]
    assert np.array_equal(data.ad_emb, ads.emb) and ads_file.read_bytes() == ads_bytes
    assert Encoder.load(out / "model").space == catalog_split["space"] and "recovery/P@100" in record["dev"]
    # and each pair carried 3 negatives from the teacher's top 30 for its query, none of them labelled relevant
    assert data.hard_negative_idx.shape == (len(data.queries), 3)
    ranks = (-(data.teacher_q_emb @ ads.emb.T)).argsort(axis=1).argsort(axis=1)  # (n, N) teacher rank of each ad
    assert (np.take_along_axis(ranks, data.hard_negative_idx, axis=1) < 30).all()
    queries, labels = pq.read_table(catalog_split["train_queries"]), pq.read_table(catalog_split["root"] /
                                                                                  "train/labels.parquet")
    qid = dict(zip(queries["text"].to_pylist(), queries["query_id"].to_pylist(), strict=True))
    relevant = {(q, a) for q, a, y in zip(*(labels[c].to_pylist() for c in ("query_id", "ad_id", "label")),
                                          strict=True) if y > 0}
    assert not any((qid[text], ads.ids[j]) in relevant
                   for text, row in zip(data.queries, data.hard_negative_idx, strict=True) for j in row)
    # and the negatives reach the loss: the job's first InfoNCE term is the in-process loop's first step with the same
    # data, settings and seed, and that step without the negatives has a lower one
    cfg = load_config(out / "train.config.yaml")

    def first_infonce(job: TrainJob, hard_negative_idx: np.ndarray | None) -> float:
        first: list[float] = []
        torch.manual_seed(cfg.seed)  # as the Ray Train worker does before it loads the encoder
        train_refine(Encoder.load(tiny_bert_dir), data.queries, data.positive_ad_idx, data.ad_emb,
                     job.model_copy(update={"max_steps": 1}), hard_negative_idx=hard_negative_idx,
                     teacher_q_emb=data.teacher_q_emb, teacher_space=data.teacher_space,
                     on_step=lambda step, metrics, save: first.append(float(metrics["parts"]["contrastive"])))
        return first[0]

    assert first_infonce(cfg.train, data.hard_negative_idx) == pytest.approx(float(rows[0]["loss/contrastive"]),
                                                                             rel=1e-4)
    in_batch = first_infonce(cfg.train.model_copy(update={"hard_negatives": 0}), None)
    assert in_batch < float(rows[0]["loss/contrastive"])


def test_prune_on_two_workers_writes_one_encoder_folder_per_schedule_step(ray_cluster, tiny_bert_dir, catalog_split,
                                                                          tmp_path):
    out = tmp_path / "prune"
    code = main(job_args(catalog_split, "prune", out, "train.prune_schedule=[1]", "train.steps_per_prune=2",
                         "train.checkpoint_every=1", "cluster.num_workers=2", init=tiny_bert_dir, dev=False))
    assert code == 0
    pruned = Encoder.load(out / "prune" / "layers-1")
    assert num_layers(pruned) == 1 and pruned.space == catalog_split["space"]
    assert num_layers(Encoder.load(out / "model")) == 1
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert [(r["step"], r["n_layers"]) for r in loss_rows(out, "prune")] == [("1", "1"), ("2", "1")]


def test_a_missing_input_file_exits_2_and_names_it(catalog_split, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "queries.parquet"
    args = job_args(catalog_split, "align", tmp_path / "out", dev=False)
    args[args.index("--queries") + 1] = str(missing)
    assert main(args) == 2  # the exit status: `python -m pipelines.train` ends in `sys.exit(main())`
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_labels_without_the_label_column_exit_2_and_name_the_file(catalog_split, tmp_path, capsys):
    bad = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"query_id": ["q-0000"], "ad_id": ["ad-000000"]}), bad)
    args = job_args(catalog_split, "refine", tmp_path / "out", dev=False)
    args[args.index("--labels") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "label" in err
