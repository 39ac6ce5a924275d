"""Training pairs for the contrastive phases: (query, positive ad) from labels, hard negatives from the teacher index.

A hard negative is an ad the teacher ranks high for the query that is not judged relevant to it; ads
judged relevant are never used as negatives (the usual false-negative guard).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from hlm.index import AdIndex


@dataclass
class Pairs:
    query_ids: list[str]
    queries: list[str]  # text of each pair's query (a query with several relevant ads appears once per ad)
    positive_ad_idx: np.ndarray  # (n,) row of the ad matrix
    hard_negative_idx: np.ndarray | None = None  # (n, K) rows of the ad matrix


def positive_pairs(queries: pa.Table, labels: pa.Table, ad_ids: list[str], *, min_label: float = 1.0) -> Pairs:
    """One pair per (query, ad) labelled ≥ min_label, in label-table order; unknown ad ids raise."""
    text = dict(zip(queries["query_id"].to_pylist(), queries["text"].to_pylist(), strict=True))
    row_of = {a: i for i, a in enumerate(ad_ids)}
    qids, pos = [], []
    for q, a, y in zip(*(labels[c].to_pylist() for c in ("query_id", "ad_id", "label")), strict=True):
        if y >= min_label and q in text:
            if a not in row_of:
                raise ValueError(f"label ({q}, {a}): ad {a} has no embedding")
            qids.append(q)
            pos.append(row_of[a])
    return Pairs(qids, [text[q] for q in qids], np.asarray(pos, dtype=np.int64))


def mine_hard_negatives(pairs: Pairs, q_emb: np.ndarray, index: AdIndex, relevant: dict[str, set[int]], *,
                        k: int = 3, depth: int = 30, skip: int = 0) -> Pairs:
    """Add the teacher's k best-ranked non-relevant ads per pair, from its ranks [skip, depth), as hard negatives.

    q_emb (n, d): the teacher's embedding of each pair's query; relevant[qid] = ad rows judged relevant.
    `skip` > 0 leaves the teacher's top ranks alone: where few ads per query are judged, most of them are
    relevant but unjudged, and training against them as negatives pushes the student off the teacher's best.
    """
    _, I = index.search(q_emb, min(depth, index.ntotal))  # noqa: E741 (n, depth)
    rng = np.random.default_rng(0)
    hard = np.empty((len(pairs.queries), k), dtype=np.int64)
    for row, (qid, ranked) in enumerate(zip(pairs.query_ids, I[:, skip:], strict=True)):
        candidates = [int(i) for i in ranked if i >= 0 and int(i) not in relevant.get(qid, set())]
        while len(candidates) < k:  # a query relevant to nearly everything: fall back to random non-relevant ads
            c = int(rng.integers(index.ntotal))
            if c not in relevant.get(qid, set()):
                candidates.append(c)
        hard[row] = candidates[:k]
    return Pairs(pairs.query_ids, pairs.queries, pairs.positive_ad_idx, hard)


def relevant_from_labels(labels: pa.Table, ad_ids: list[str]) -> dict[str, set[int]]:
    """relevant[qid] = rows of ad_ids labelled > 0 for qid: every judged-relevant ad, not only the training pairs'."""
    row_of = {a: i for i, a in enumerate(ad_ids)}
    relevant: dict[str, set[int]] = {}
    for q, a, y in zip(*(labels[c].to_pylist() for c in ("query_id", "ad_id", "label")), strict=True):
        if y > 0 and a in row_of:
            relevant.setdefault(q, set()).add(row_of[a])
    return relevant

