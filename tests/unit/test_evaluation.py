"""Side-by-side evaluation: quality through the index, speed ratios, and the written report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.data import write_embeddings
from hlm.encoder import Encoder
from hlm.evaluation import Candidate, compare, model_labels, retrieval_quality, write_report
from hlm.index import AdIndex
from hlm.tiny import save_tiny_encoder, tiny_encoder
from pipelines.evaluate import main

ADS = [f"{w} {i}" for i, w in enumerate(["drill", "paint", "lamp", "door", "tile"] * 4)]
QUERIES = ["drill", "paint", "lamp"]


def test_a_query_equal_to_its_relevant_ad_scores_perfectly():
    emb = np.eye(4, dtype=np.float32)  # ad i = query i
    index = AdIndex.build(["a0", "a1", "a2", "a3"], emb, "s", "Flat")
    m = retrieval_quality(index, emb[:2], ["q0", "q1"], {"q0": {"a0": 2.0}, "q1": {"a1": 1.0}}, ks=(1,))
    assert m["P@1"] == 1.0 and m["MRR@1"] == 1.0 and m["R@1"] == 1.0


def test_exact_search_over_fewer_ads_than_k_scores_every_ad():
    rng = np.random.default_rng(0)
    ad_emb = rng.normal(size=(20, 8)).astype(np.float32)
    ad_emb /= np.linalg.norm(ad_emb, axis=1, keepdims=True)
    ad_ids, query_ids = [f"a{i}" for i in range(20)], [f"q{i}" for i in range(10)]
    qrels = {q: {ad_ids[2 * i]: 1.0} for i, q in enumerate(query_ids)}
    index = AdIndex.build(ad_ids, ad_emb, "s")
    m = retrieval_quality(index, ad_emb[::2], query_ids, qrels, ks=(1, 100))  # query i is ad 2i; k=100 > 20 ads
    assert m["P@1"] == m["R@1"] == m["MRR@1"] == m["R@100"] == 1.0 and m["P@100"] == pytest.approx(0.01)


def test_compare_reports_recovery_and_speed_ratios_against_the_teacher(tmp_path):
    teacher = tiny_encoder("bert", seed=0)
    index = AdIndex.build([f"a{i}" for i in range(len(ADS))], teacher.encode(ADS, kind="ad"), teacher.space)
    qrels = {f"q{i}": {f"a{i}": 2.0} for i in range(3)}
    student = tiny_encoder("bert", seed=1, layers=1)
    own = AdIndex.build([f"a{i}" for i in range(len(ADS))], student.encode(ADS, kind="ad"), student.space)
    reports = compare([Candidate("teacher", teacher, index, "teacher"), Candidate("student", student, own, "dual",
                                                                                 own_index=True)],
                      QUERIES, ["q0", "q1", "q2"], qrels, teacher="teacher")
    by_name = {r.name: r for r in reports}
    t, s = by_name["teacher"], by_name["student"]
    # recovery is each of the student's metrics over the teacher's, and the speed-ups are teacher time over student's
    assert s.recovery == pytest.approx({m: s.quality[m] / t.quality[m] for m in t.quality})
    assert any(v != pytest.approx(1.0) for v in s.recovery.values())  # the two models really differ
    assert s.speed["latency_speedup"] == pytest.approx(t.speed["latency_p50_ms"] / s.speed["latency_p50_ms"])
    assert t.recovery == pytest.approx(dict.fromkeys(t.quality, 1.0)) and t.speed["latency_speedup"] == 1.0
    assert s.params < t.params
    # a row searched in its own index is scored there: its P@100 is its own retrieval, not the teacher's
    assert s.index == "own" and t.index == "teacher"
    assert s.quality == retrieval_quality(own, student.encode(QUERIES), ["q0", "q1", "q2"], qrels)
    paths = write_report(reports, tmp_path, qrels)
    assert "| student | own |" in paths["md"].read_text() and paths["plot"].stat().st_size > 0
    assert [r["name"] for r in json.loads(paths["json"].read_text())] == ["teacher", "student"]


def evaluate_job_args(tmp_path) -> list[str]:
    """A tiny teacher (seed 0), its ad embeddings, one query with one label: the evaluate job's args, less students."""
    teacher_dir = save_tiny_encoder(tmp_path / "teacher", "bert", seed=0)
    teacher = Encoder.load(teacher_dir)
    write_embeddings(tmp_path / "ads.parquet", [f"a{i}" for i in range(len(ADS))], teacher.encode(ADS, kind="ad"),
                     teacher.describe_space())
    pq.write_table(pa.table({"query_id": ["q0"], "text": ["drill"]}), tmp_path / "q.parquet")
    pq.write_table(pa.table({"query_id": ["q0"], "ad_id": ["a0"], "label": pa.array([2.0], pa.float32())}),
                   tmp_path / "l.parquet")
    return ["--ads-emb", str(tmp_path / "ads.parquet"), "--queries", str(tmp_path / "q.parquet"), "--labels",
            str(tmp_path / "l.parquet"), "--set", f"teacher.model={teacher_dir}", "--out", str(tmp_path / "out")]


def test_evaluate_job_refuses_a_student_from_another_space(tmp_path, capsys):
    common = evaluate_job_args(tmp_path)
    other = save_tiny_encoder(tmp_path / "other", "bert", seed=3)
    assert main([*common, "--student", str(other)]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(common) == 0
    assert (tmp_path / "out" / "report.md").exists()


def test_students_in_folders_of_the_same_name_get_a_row_each(tmp_path):
    labels = model_labels(["runs/align/model", "runs/refine/model", "runs/l3"])
    assert labels == ["align/model", "refine/model", "runs/l3"]
    assert model_labels(["runs/l3", "runs/l2"]) == ["l3", "l2"] and model_labels([]) == []
    with pytest.raises(ValueError, match="more than once"):
        model_labels(["runs/align/model", "runs/../runs/align/model"])
    # and the job reports both students, not the last one under a shared name
    common = evaluate_job_args(tmp_path)
    students = [save_tiny_encoder(tmp_path / run / "model", "bert", seed=0) for run in ("align", "refine")]
    assert main([*common, *[a for s in students for a in ("--student", str(s))]]) == 0
    rows = [r["name"] for r in json.loads((tmp_path / "out" / "report.json").read_text())]
    assert rows == ["teacher", "student align/model", "student refine/model"]
    # and writes each row's ranking as a TREC run beside the report, with the labels it was scored on
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == [
        "student_align_model.trec", "student_refine_model.trec", "teacher.trec"]
    assert (tmp_path / "out" / "qrels.trec").read_text() == "q0 0 a0 2\n"
