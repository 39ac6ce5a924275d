"""Retrieval metrics over plain dicts, BEIR style, matching trec_eval's semantics.

A run maps ``query_id -> {ad_id: score}`` and qrels map ``query_id -> {ad_id: graded label}``.
Metrics do not touch models or indexes: ``run_from_search`` turns FAISS ``(D, I)`` into a run.

Conventions, each the one ``trec_eval`` (and so ``pytrec_eval``) uses:

* **Ranking.** Ads are sorted by score descending; ties are broken by ``ad_id`` descending
  (string order), so a ranking never depends on dict order.
* **Relevance.** For the binary metrics (P, R, MRR) an ad is relevant when
  ``label >= relevance_level`` (trec_eval's ``-l``/``relevance_level``, default 1.0). Home Depot
  labels (relevance − 1, in 0..2) and ESCI labels (0..3) both use 1.0. Unjudged ads are
  non-relevant. nDCG ignores ``relevance_level`` and uses the graded label as the gain.
* **Which queries are averaged.** Every query that is a key of the run and has at least one
  judgment in the qrels (trec_eval without ``-c``; pytrec_eval also keeps a run key with no ads,
  which is how a query that FAISS found nothing for counts as a miss). A query whose judgments hold
  no relevant ad is averaged in and scores 0 on P, R and MRR (and on nDCG when no label is
  positive). Queries only in the run, or only in the qrels, are skipped.
* **P@k** divides by ``k`` even when fewer than ``k`` ads were retrieved.

``PRIMARY_METRIC`` names the metric that model selection reads; every metric here is greater-is-better.
Recovery is ``student / teacher`` on the same run definition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, float]]

PRIMARY_K = 100  # the cutoff of the primary metric, for callers that must compute it
PRIMARY_METRIC = f"P@{PRIMARY_K}"


def ranked(scores: dict[str, float]) -> list[str]:
    """Ad ids by score descending, ties by ad_id descending (trec_eval's order)."""
    return [ad for ad, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def _mean_over_queries(run: Run, qrels: Qrels, per_query: Callable[[list[str], dict[str, float]], float]) -> float:
    qids = [q for q in run if qrels.get(q)]
    if not qids:
        # A silent 0.0 here would hide the usual cause: query ids that do not match between run and qrels.
        raise ValueError("no query id is in both the run and the qrels")
    return sum(per_query(ranked(run[q]), qrels[q]) for q in qids) / len(qids)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _relevant(labels: dict[str, float], relevance_level: float) -> set[str]:
    return {ad for ad, label in labels.items() if label >= relevance_level}


def precision_at_k(run: Run, qrels: Qrels, k: int, *, relevance_level: float = 1.0) -> float:
    """Mean over queries of |relevant ∩ top-k| / k (trec_eval ``P_k``)."""
    _check_k(k)

    def per_query(ranking: list[str], labels: dict[str, float]) -> float:
        relevant = _relevant(labels, relevance_level)
        return sum(ad in relevant for ad in ranking[:k]) / k

    return _mean_over_queries(run, qrels, per_query)


def recall_at_k(run: Run, qrels: Qrels, k: int, *, relevance_level: float = 1.0) -> float:
    """Mean over queries of |relevant ∩ top-k| / |relevant| (trec_eval ``recall_k``); 0 if none is relevant."""
    _check_k(k)

    def per_query(ranking: list[str], labels: dict[str, float]) -> float:
        relevant = _relevant(labels, relevance_level)
        if not relevant:
            return 0.0
        return sum(ad in relevant for ad in ranking[:k]) / len(relevant)

    return _mean_over_queries(run, qrels, per_query)


def mrr_at_k(run: Run, qrels: Qrels, k: int, *, relevance_level: float = 1.0) -> float:
    """Mean over queries of 1 / rank of the first relevant ad in the top k, 0 if there is none.

    trec_eval's ``recip_rank`` has no cutoff; this equals it on a run truncated to the top k.
    """
    _check_k(k)

    def per_query(ranking: list[str], labels: dict[str, float]) -> float:
        relevant = _relevant(labels, relevance_level)
        return next((1.0 / rank for rank, ad in enumerate(ranking[:k], start=1) if ad in relevant), 0.0)

    return _mean_over_queries(run, qrels, per_query)


def _dcg(gains: Iterable[float]) -> float:
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1) if gain > 0)


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean over queries of DCG@k / ideal DCG@k (trec_eval ``ndcg_cut_k``).

    DCG@k = sum over ranks r <= k of label / log2(r + 1), with linear gain = the graded label and
    labels <= 0 (and unjudged ads) contributing 0. The ideal DCG sorts all judged labels of the
    query, retrieved or not. A query with no positive label scores 0.
    """
    _check_k(k)

    def per_query(ranking: list[str], labels: dict[str, float]) -> float:
        ideal = _dcg(sorted(labels.values(), reverse=True)[:k])
        if ideal == 0:
            return 0.0
        return _dcg(labels.get(ad, 0.0) for ad in ranking[:k]) / ideal

    return _mean_over_queries(run, qrels, per_query)


def evaluate(
    run: Run, qrels: Qrels, *, ks: Iterable[int] = (10, 100), relevance_level: float = 1.0
) -> dict[str, float]:
    """All four metrics at each k, keyed ``"P@k"``, ``"R@k"``, ``"nDCG@k"``, ``"MRR@k"``."""
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"P@{k}"] = precision_at_k(run, qrels, k, relevance_level=relevance_level)
        metrics[f"R@{k}"] = recall_at_k(run, qrels, k, relevance_level=relevance_level)
        metrics[f"nDCG@{k}"] = ndcg_at_k(run, qrels, k)
        metrics[f"MRR@{k}"] = mrr_at_k(run, qrels, k, relevance_level=relevance_level)
    return metrics


def recovery(student: float, teacher: float) -> float:
    """The share of the teacher's score the student keeps: ``student / teacher``."""
    if teacher == 0:
        raise ValueError("recovery is undefined when the teacher metric is 0")
    return student / teacher


def recovery_table(student_metrics: dict[str, float], teacher_metrics: dict[str, float]) -> dict[str, float]:
    """``recovery`` for every metric name present in both dicts, in the student's key order."""
    return {
        name: recovery(value, teacher_metrics[name])
        for name, value in student_metrics.items()
        if name in teacher_metrics
    }


def run_from_search(query_ids: list[str], D: np.ndarray, I: np.ndarray, ad_ids: list[str]) -> Run:  # noqa: E741 (FAISS names results D, I)
    """Turn FAISS search results into a run.

    D: (B, k) scores, higher is better (an inner-product index; negate L2 distances first).
    I: (B, k) positions into ``ad_ids``; FAISS pads with -1 when it finds fewer than k ads, and
    those slots are dropped. Row b belongs to ``query_ids[b]``.
    """
    if D.shape != I.shape or D.ndim != 2 or D.shape[0] != len(query_ids):
        raise ValueError(f"expected D and I of shape ({len(query_ids)}, k), got {D.shape} and {I.shape}")
    return {
        qid: {ad_ids[pos]: float(score) for score, pos in zip(scores, positions, strict=True) if pos >= 0}
        for qid, scores, positions in zip(query_ids, D, I, strict=True)
    }
