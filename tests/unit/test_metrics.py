from __future__ import annotations

import math

import numpy as np
import pytest
import pytrec_eval

from hlm.metrics import (
    PRIMARY_METRIC,
    Qrels,
    Run,
    evaluate,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    recovery,
    recovery_table,
    run_from_search,
)

LOG2_3 = math.log2(3)

# q1 ranks a1, a3, a2, x (x unjudged); relevant at level 1.0: a1, a2, a4.
# q2 ranks b9, b2 (only two ads retrieved); relevant: b2 only.
QRELS: Qrels = {
    "q1": {"a1": 2.0, "a2": 1.0, "a3": 0.0, "a4": 1.0},
    "q2": {"b1": 0.67, "b2": 1.33},
}
RUN: Run = {
    "q1": {"a1": 0.9, "a3": 0.8, "a2": 0.7, "x": 0.6},
    "q2": {"b9": 0.9, "b2": 0.5},
}


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, (1 / 1 + 0 / 1) / 2),
        (2, (1 / 2 + 1 / 2) / 2),
        (3, (2 / 3 + 1 / 3) / 2),  # q2 retrieved two ads but is still divided by 3
    ],
)
def test_precision_divides_hits_by_k_and_averages_queries(k: int, expected: float) -> None:
    assert precision_at_k(RUN, QRELS, k) == pytest.approx(expected)


@pytest.mark.parametrize(("k", "expected"), [(1, (1 / 3 + 0) / 2), (2, (1 / 3 + 1) / 2), (3, (2 / 3 + 1) / 2)])
def test_recall_divides_hits_by_all_relevant_ads_of_the_query(k: int, expected: float) -> None:
    assert recall_at_k(RUN, QRELS, k) == pytest.approx(expected)


@pytest.mark.parametrize(("k", "expected"), [(1, (1 + 0) / 2), (2, (1 + 1 / 2) / 2)])
def test_mrr_counts_first_relevant_ad_only_within_top_k(k: int, expected: float) -> None:
    assert mrr_at_k(RUN, QRELS, k) == pytest.approx(expected)


def test_ndcg_uses_linear_graded_gain_and_ideal_from_all_judged_labels() -> None:
    q1 = (2.0 + 0.0 / LOG2_3) / (2.0 + 1.0 / LOG2_3)  # ideal takes a1 and a2 (or a4), unretrieved a4 included
    q2 = (0.0 + 1.33 / LOG2_3) / (1.33 + 0.67 / LOG2_3)

    assert ndcg_at_k(RUN, QRELS, 2) == pytest.approx((q1 + q2) / 2)
    assert ndcg_at_k(RUN, QRELS, 2) == pytest.approx(0.6194746)


def test_relevance_level_decides_which_labels_count_for_binary_metrics() -> None:
    assert precision_at_k(RUN, QRELS, 3, relevance_level=2.0) == pytest.approx((1 / 3 + 0) / 2)
    assert recall_at_k(RUN, QRELS, 3, relevance_level=0.5) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_query_with_no_relevant_ad_is_averaged_in_as_zero() -> None:
    qrels = {**QRELS, "q3": {"c1": 0.0, "c2": 0.0}}
    run = {**RUN, "q3": {"c1": 0.9, "c2": 0.8}}

    metrics = evaluate(run, qrels, ks=(3,))

    assert metrics == pytest.approx({key: value * 2 / 3 for key, value in evaluate(RUN, QRELS, ks=(3,)).items()})


def test_run_key_without_results_scores_zero_but_unjudged_queries_are_skipped() -> None:
    qrels = {**QRELS, "q3": {"c1": 1.0}, "q_empty": {}}
    run = {**RUN, "q3": {}, "q_empty": {"c1": 1.0}, "q_unjudged": {"c1": 1.0}}

    assert precision_at_k(run, qrels, 2) == pytest.approx(precision_at_k(RUN, QRELS, 2) * 2 / 3)


def test_equal_scores_rank_the_larger_ad_id_first() -> None:
    qrels = {"q": {"b": 1.0}}

    assert mrr_at_k({"q": {"a": 0.5, "b": 0.5}}, qrels, 10) == 1.0
    assert mrr_at_k({"q": {"b": 0.5, "c": 0.5}}, qrels, 10) == 0.5


def test_metrics_refuse_runs_that_share_no_query_with_the_qrels() -> None:
    with pytest.raises(ValueError, match="no query id"):
        precision_at_k({"other": {"a1": 1.0}}, QRELS, 10)


def test_evaluate_reports_all_four_metrics_at_each_k_including_the_primary_one() -> None:
    metrics = evaluate(RUN, QRELS)

    assert set(metrics) == {f"{name}@{k}" for name in ("P", "R", "nDCG", "MRR") for k in (10, 100)}
    assert PRIMARY_METRIC in metrics
    assert metrics["MRR@10"] == mrr_at_k(RUN, QRELS, 10)


# Reference check against pytrec_eval (trec_eval). pytrec_eval only takes integer labels and an integer
# relevance_level, so fixtures are drawn as integer levels 0..6 and given to hlm as exact thirds
# (0, 0.33, 0.67, 1, ..., 2): binary decisions then agree exactly, and nDCG is scale-invariant.
def _random_fixture(seed: int) -> tuple[dict[str, dict[str, int]], Run]:
    rng = np.random.default_rng(seed)
    ads = [f"ad{i:03d}" for i in range(40)]
    int_qrels: dict[str, dict[str, int]] = {}
    run: Run = {}
    for q in range(12):
        qid = f"q{q}"
        judged = rng.choice(ads, size=int(rng.integers(1, 15)), replace=False)
        no_relevant = q % 4 == 0
        int_qrels[qid] = {str(ad): 0 if no_relevant else int(rng.integers(0, 7)) for ad in judged}
        n_retrieved = int(rng.integers(0, 30))  # often fewer than k
        retrieved = rng.choice(ads, size=n_retrieved, replace=False)
        scores = rng.choice(10_000, size=n_retrieved, replace=False) / 10_000  # distinct, so no tie to break
        run[qid] = {str(ad): float(score) for ad, score in zip(retrieved, scores, strict=True)}
    int_qrels["q_judged_only"] = {"ad000": 3}
    int_qrels["q_no_judgments"] = {}
    run["q_no_judgments"] = {"ad000": 1.0}
    run["q_unjudged"] = {"ad000": 1.0}
    return int_qrels, run


def _trec_mean(int_qrels: dict[str, dict[str, int]], run: Run, measure: str, relevance_level: int) -> float:
    per_query = pytrec_eval.RelevanceEvaluator(int_qrels, {measure}, relevance_level=relevance_level).evaluate(run)
    values = [scores[measure] for scores in per_query.values()]
    return sum(values) / len(values)


def _top_k(run: Run, k: int) -> Run:
    return {qid: dict(sorted(ads.items(), key=lambda item: item[1], reverse=True)[:k]) for qid, ads in run.items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [1, 5, 10, 20])
@pytest.mark.parametrize("int_relevance_level", [1, 3, 6])
def test_metrics_match_pytrec_eval_on_random_runs(seed: int, k: int, int_relevance_level: int) -> None:
    int_qrels, run = _random_fixture(seed)
    qrels = {qid: {ad: level / 3 for ad, level in labels.items()} for qid, labels in int_qrels.items()}
    relevance_level = int_relevance_level / 3

    def trec(measure: str, trec_run: Run = run) -> float:
        return _trec_mean(int_qrels, trec_run, measure, int_relevance_level)

    assert precision_at_k(run, qrels, k, relevance_level=relevance_level) == pytest.approx(trec(f"P_{k}"))
    assert recall_at_k(run, qrels, k, relevance_level=relevance_level) == pytest.approx(trec(f"recall_{k}"))
    assert ndcg_at_k(run, qrels, k) == pytest.approx(trec(f"ndcg_cut_{k}"))
    # recip_rank has no cutoff, so MRR@k is recip_rank on the run cut to its top k.
    assert mrr_at_k(run, qrels, k, relevance_level=relevance_level) == pytest.approx(
        trec("recip_rank", _top_k(run, k))
    )


def test_recovery_is_student_over_teacher() -> None:
    assert recovery(0.45, 0.5) == pytest.approx(0.9)


def test_recovery_refuses_a_zero_teacher() -> None:
    with pytest.raises(ValueError, match="teacher"):
        recovery(0.1, 0.0)


def test_recovery_table_covers_only_metrics_both_sides_report() -> None:
    table = recovery_table({"P@100": 0.3, "R@100": 0.8, "extra": 1.0}, {"P@100": 0.4, "R@100": 0.8, "MRR@10": 0.5})

    assert table == pytest.approx({"P@100": 0.75, "R@100": 1.0})


def test_run_from_search_maps_positions_to_ad_ids_and_drops_missing_results() -> None:
    D = np.array([[0.9, 0.4, -1.0], [0.7, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=np.float32)  # (B=3, k=3)
    I = np.array([[2, 0, -1], [1, -1, -1], [-1, -1, -1]], dtype=np.int64)  # noqa: E741

    run = run_from_search(["q1", "q2", "q3"], D, I, ["ad0", "ad1", "ad2"])

    assert run == {
        "q1": {"ad2": pytest.approx(0.9), "ad0": pytest.approx(0.4)},
        "q2": {"ad1": pytest.approx(0.7)},
        "q3": {},
    }
    assert all(type(score) is float for scores in run.values() for score in scores.values())


def test_run_from_search_rejects_results_that_do_not_match_the_queries() -> None:
    D = np.zeros((2, 3), dtype=np.float32)
    I = np.zeros((2, 3), dtype=np.int64)  # noqa: E741

    with pytest.raises(ValueError, match="shape"):
        run_from_search(["q1"], D, I, ["ad0"])
