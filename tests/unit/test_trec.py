"""TREC run and qrels files: what the report scored, readable by plain Python (and so by trec_eval & co.)."""

from __future__ import annotations

import json
import math
from urllib.parse import unquote

import pytest

from hlm.evaluation import Candidate, compare, write_report
from hlm.index import AdIndex
from hlm.tiny import tiny_encoder
from hlm.trec import run_name, trec_id, write_run, write_runs

ADS = [f"{w} {i}" for i, w in enumerate(["drill", "paint", "lamp", "door", "tile", "hose"] * 25)]  # 150 > k=100
QUERIES = ["drill", "paint", "lamp", "door"]
# ids with a space, '#' (a trec_eval comment at the start of a line) and '%' (the escape character itself)
AD_IDS = [f"ad {i}" if i % 3 else f"#{i}%" for i in range(len(ADS))]
QUERY_IDS = ["q 0", "q1", "#q2", "q3"]


def read_run(path) -> dict[str, list[tuple[str, float]]]:
    """A TREC run file as {qid: [(ad_id, score) by rank]}, checking each line's shape on the way."""
    rows: dict[str, list[tuple[int, str, float, str]]] = {}
    for line in path.read_text().splitlines():
        qid, q0, ad, rank, score, tag = line.split()  # exactly six whitespace-separated fields
        assert q0 == "Q0"
        rows.setdefault(unquote(qid), []).append((int(rank), unquote(ad), float(score), tag))
    ranked = {}
    for qid, hits in rows.items():
        assert [h[0] for h in hits] == list(range(1, len(hits) + 1))  # 1-based, contiguous, written in rank order
        assert all(a[2] >= b[2] for a, b in zip(hits, hits[1:], strict=False))  # best first
        ranked[qid] = [(ad, score) for _, ad, score, _ in hits]
    return ranked


def read_qrels(path) -> dict[str, dict[str, float]]:
    qrels: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        qid, zero, ad, label = line.split()
        assert zero == "0"
        qrels.setdefault(unquote(qid), {})[unquote(ad)] = float(label)
    return qrels


def recall(ranking: list[str], labels: dict[str, float], k: int) -> float:
    relevant = {ad for ad, y in labels.items() if y >= 1}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


def ndcg(ranking: list[str], labels: dict[str, float], k: int) -> float:
    dcg = sum(labels.get(ad, 0) / math.log2(r + 2) for r, ad in enumerate(ranking[:k]) if labels.get(ad, 0) > 0)
    ideal = sum(y / math.log2(r + 2) for r, y in enumerate(sorted(labels.values(), reverse=True)[:k]) if y > 0)
    return dcg / ideal if ideal else 0.0


def test_run_files_read_back_with_plain_python_give_the_reports_numbers(tmp_path):
    # Given a teacher and a student searching one ad index, graded labels (one an averaged 1.33 rating), odd ids
    teacher, student = tiny_encoder("bert", seed=0), tiny_encoder("bert", seed=1, hidden=32)
    index = AdIndex.build(AD_IDS, teacher.encode(ADS, kind="ad"), teacher.space)
    own = AdIndex.build(AD_IDS, student.encode(ADS, kind="ad"), student.space)
    qrels = {qid: {AD_IDS[i]: 2.0, AD_IDS[i + 6]: 1.33, AD_IDS[i + 12]: 0.0, AD_IDS[i + 99]: 1.0}
             for i, qid in enumerate(QUERY_IDS)}
    reports = compare([Candidate("teacher", teacher, index, "teacher"),
                       Candidate("student align/model", student, own, "students")],
                      QUERIES, QUERY_IDS, qrels, teacher="teacher")
    # When the report is written
    paths = write_report(reports, tmp_path, qrels)
    # Then there is one run file per model, tagged with its run name, and the qrels file holds every label
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"teacher.trec", "student_align_model.trec"}
    assert paths["runs"]["student align/model"].read_text().split("\n", 1)[0].endswith(" student_align_model")
    assert read_qrels(paths["qrels"]) == qrels
    # and R@k / nDCG@10 recomputed from the files alone equal the report's numbers
    report = {r["name"]: r["quality"] for r in json.loads(paths["json"].read_text())}
    for name, path in paths["runs"].items():
        run = read_run(path)
        assert set(run) == set(QUERY_IDS) and all(len(hits) == 100 for hits in run.values())
        for metric, k, fn in (("R@10", 10, recall), ("R@100", 100, recall), ("nDCG@10", 10, ndcg)):
            mine = sum(fn([ad for ad, _ in run[q]], qrels[q], k) for q in QUERY_IDS) / len(QUERY_IDS)
            assert mine == pytest.approx(report[name][metric], abs=1e-12), (name, metric)
    assert 0 < report["teacher"]["R@100"] < 1  # not trivially 0 or 1: the ranks in the file matter


def test_ties_are_ranked_by_ad_id_descending_and_scores_read_back_exactly(tmp_path):
    below = math.nextafter(0.3, 0)  # one ulp apart: a rounded score would tie them, and rank e before d
    run = {"q": {"b": 0.5, "a": 0.5, "c": 0.5, "e": below, "d": 0.3}}
    lines = write_run(run, tmp_path / "r.trec", "x").read_text().splitlines()
    assert [line.split()[2] for line in lines] == ["c", "b", "a", "d", "e"]  # ties: trec_eval's order
    assert [float(line.split()[4]) for line in lines] == [0.5, 0.5, 0.5, 0.3, below]


def test_ids_that_would_break_the_format_are_percent_encoded_and_nothing_else_is():
    odd = ["drill set", "tab\there", "#1", "50%", "nbsp\u00a0x", "line\nbreak"]
    assert [trec_id(i) for i in odd] == ["drill%20set", "tab%09here", "%231", "50%25", "nbsp%C2%A0x", "line%0Abreak"]
    assert [unquote(trec_id(i)) for i in odd] == odd
    assert [trec_id(i) for i in ["B00X4WHP5E", "q3f2a1c", "a-b_c.d/e:1", "ñandú"]] == [
        "B00X4WHP5E", "q3f2a1c", "a-b_c.d/e:1", "ñandú"]
    with pytest.raises(ValueError, match="empty id"):
        trec_id("")


def test_model_names_that_would_share_a_run_file_are_refused_before_anything_is_written(tmp_path):
    assert run_name("HLM L2 int8") == "HLM_L2_int8" and run_name("teacher (fine-tuned)") == "teacher_fine-tuned"
    with pytest.raises(ValueError, match="share a run file"):
        write_runs({"student a/b": {}, "student a b": {}}, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_pytrec_eval_on_the_files_agrees_with_the_report_on_integer_labels(tmp_path):
    # trec_eval's own code (pytrec_eval) scoring the files as written, escaped ids and all
    import pytrec_eval

    teacher = tiny_encoder("bert", seed=0)
    index = AdIndex.build(AD_IDS, teacher.encode(ADS, kind="ad"), teacher.space)
    qrels = {qid: {AD_IDS[i]: 2.0, AD_IDS[i + 6]: 1.0, AD_IDS[i + 12]: 0.0, AD_IDS[i + 99]: 1.0}
             for i, qid in enumerate(QUERY_IDS)}
    reports = compare([Candidate("teacher", teacher, index, "teacher")], QUERIES, QUERY_IDS, qrels, teacher="teacher")
    paths = write_report(reports, tmp_path, qrels)
    run: dict[str, dict[str, float]] = {}
    for line in paths["runs"]["teacher"].read_text().splitlines():
        qid, _, ad, _, score, _ = line.split()
        run.setdefault(qid, {})[ad] = float(score)
    judged: dict[str, dict[str, int]] = {}
    for line in paths["qrels"].read_text().splitlines():
        qid, _, ad, label = line.split()
        judged.setdefault(qid, {})[ad] = int(label)
    per_query = pytrec_eval.RelevanceEvaluator(judged, {"recall.10,100", "ndcg_cut.10"}).evaluate(run)
    mean = {m: sum(q[m] for q in per_query.values()) / len(per_query) for m in ("recall_100", "ndcg_cut_10")}
    quality = reports[0].quality
    assert mean == pytest.approx({"recall_100": quality["R@100"], "ndcg_cut_10": quality["nDCG@10"]}, abs=1e-9)
