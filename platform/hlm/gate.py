"""The publish gate: the checks a new index version must pass before it may become current.

One gate for every publisher (`pipelines.publish_index`, the nightly refresh): ANN recall@10 against exact
search with ad vectors as queries, canary quality against the serving version, and the same embedding space
as the serving version. Thresholds are `RefreshJob`'s (`refresh.min_recall`, `refresh.max_quality_drop`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hlm.index import AdIndex
from hlm.metrics import PRIMARY_METRIC

RECALL_K = 10


@dataclass
class GateResult:
    passed: bool
    checks: dict[str, dict]  # name -> {status: pass | fail | skipped, value, threshold, note}
    reason: str  # why it refused ("" when passed)


def ann_recall(index: AdIndex, emb: np.ndarray, *, sample: int, seed: int) -> float:
    """recall@10 of ``index`` against exact search over the same ``emb (N, d)``, ``sample`` rows as queries."""
    exact = index if index.factory == "Flat" else AdIndex.build(index.ids, emb, index.space, "Flat")
    queries = emb[np.random.default_rng(seed).choice(len(emb), min(sample, len(emb)), replace=False)]  # (S, d)
    return index.recall_at_k(exact, queries, k=min(RECALL_K, index.ntotal))


def gate(*, new_space: str, serving_space: str | None, recall: float | None, min_recall: float,
         quality: float | None = None, serving_quality: float | None = None, max_quality_drop: float = 0.02,
         metric: str = PRIMARY_METRIC) -> GateResult:
    """Three checks: ANN recall, canary quality vs the serving version, same space as the serving version."""
    def check(ok: bool | None, value=None, threshold=None, note: str = "") -> dict:
        return {"status": "skipped" if ok is None else "pass" if ok else "fail", "value": value,
                "threshold": threshold, "note": note}

    checks = {"space": check(None, new_space, None, "no serving version: nothing to compare with")
              if serving_space is None else check(new_space == serving_space, new_space, serving_space,
              "" if new_space == serving_space else
              f"the teacher's space {new_space} differs from the serving version's {serving_space}: publishing "
              "would silently swap spaces under the serving students; publish under a new index name "
              "(refresh.index) or retrain the students on the new teacher first")}
    checks["ann_recall"] = (check(None, note="not measured") if recall is None else check(
        recall >= min_recall, recall, min_recall,
        "" if recall >= min_recall else f"ANN recall@{RECALL_K} {recall:.4f} is below refresh.min_recall {min_recall}"))
    if serving_space is None or checks["space"]["status"] == "fail":
        checks["canary_quality"] = check(None, note="no serving version in the same space to compare with")
    elif quality is None or serving_quality is None:
        checks["canary_quality"] = check(None, note="no canary set (refresh.canary_queries, refresh.canary_labels)")
    else:
        floor = serving_quality - max_quality_drop
        checks["canary_quality"] = check(quality >= floor, quality, floor, "" if quality >= floor else
                                         f"canary {metric} {quality:.4f} is more than {max_quality_drop} below the "
                                         f"serving version's {serving_quality:.4f}")
    reasons = [c["note"] for c in checks.values() if c["status"] == "fail"]
    if not reasons and checks["ann_recall"]["status"] != "pass":
        reasons = ["ANN recall was not measured"]
    return GateResult(not reasons, checks, "; ".join(reasons))
