"""What a training phase trains on: its input files, checked against the phase, read and joined once, then sharded.

Inputs per phase (anything else is refused rather than silently ignored): align and prune need `queries` and
`teacher_queries` (`ads_emb` for score_kl; `ads` with `ads_emb` aligns on the ad texts too); refine needs
`queries labels teacher_queries ads_emb` (hard negatives are mined from a Flat index of the teacher ads); teacher
needs `queries labels ads` (and mines hard negatives when `teacher_queries ads_emb` are given). `dev_queries
dev_labels` evaluate the result over the teacher ad embeddings (`hlm.evaluation.evaluate_dev`;
`dev_teacher_queries` adds the teacher's row and recovery).

The driver reads the (small) inputs into one `PhaseData`; each data-parallel rank takes `shard(rank, world)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hlm.config import AlignmentObjective, Phase, TrainJob
from hlm.data import DataError, read_ads, read_labels, read_queries
from hlm.index import AdIndex
from hlm.mining import Pairs, mine_hard_negatives, positive_pairs, relevant_from_labels
from hlm.space import Embeddings, check_same_space

TRAIN_INPUTS = ("queries", "teacher_queries", "ads_emb", "labels", "ads")
NEEDS = {Phase.align: {"queries", "teacher_queries"}, Phase.prune: {"queries", "teacher_queries"},
         Phase.refine: {"queries", "labels", "teacher_queries", "ads_emb"}, Phase.teacher: {"queries", "labels", "ads"}}
MAY = {Phase.align: {"ads_emb", "ads"}, Phase.prune: {"ads_emb", "ads"}, Phase.refine: set(),
       Phase.teacher: {"teacher_queries", "ads_emb"}}


@dataclass(frozen=True)
class PhaseInputs:
    """Parquet files or folders; None = not given."""

    queries: Path | None = None  # training queries (queries contract)
    teacher_queries: Path | None = None  # teacher embeddings of `queries` (pipelines.embed)
    ads_emb: Path | None = None  # teacher ad embeddings (refine, score_kl, hard negatives, dev evaluation)
    labels: Path | None = None  # labels of `queries` (refine, teacher)
    ads: Path | None = None  # ad texts (teacher; align and prune: more texts to align on)
    dev_queries: Path | None = None  # held-out queries to evaluate on at the end
    dev_labels: Path | None = None  # labels of dev_queries
    dev_teacher_queries: Path | None = None  # teacher embeddings of dev_queries


def input_problem(job: TrainJob, inputs: PhaseInputs, name: Callable[[str], str] = str) -> str | None:
    """Why `inputs` cannot run `job.phase`, naming each input as name(field) does (a CLI passes its flag), or None."""
    phase = job.phase
    given = {f for f in TRAIN_INPUTS if getattr(inputs, f)}
    names = lambda fs: ", ".join(sorted(name(f) for f in fs))  # noqa: E731
    if phase is Phase.prune and not job.prune_schedule:
        return "phase prune needs train.prune_schedule, e.g. --set 'train.prune_schedule=[4, 2]'"
    if missing := NEEDS[phase] - given:
        return f"phase {phase} needs {names(missing)}"
    if unused := given - NEEDS[phase] - MAY[phase]:
        return f"phase {phase} does not use {names(unused)}"
    if phase.aligns and job.objective == AlignmentObjective.SCORE_KL and not inputs.ads_emb:
        return f"train.objective=score_kl needs {name('ads_emb')}"
    if phase.aligns and inputs.ads and not inputs.ads_emb:
        return f"aligning on {name('ads')} needs {name('ads_emb')}: their teacher embeddings are the targets"
    if phase is Phase.teacher and bool(inputs.teacher_queries) != bool(inputs.ads_emb):
        return f"hard negatives for phase teacher need both {names({'teacher_queries', 'ads_emb'})}"
    if bool(inputs.dev_queries) != bool(inputs.dev_labels):
        return f"{names({'dev_queries', 'dev_labels'})} go together"
    if inputs.dev_queries and phase is not Phase.teacher and not inputs.ads_emb:
        return f"evaluating phase {phase} needs {name('ads_emb')} (the teacher ad embeddings)"
    if inputs.dev_teacher_queries and not (inputs.dev_queries and inputs.ads_emb):
        return f"{name('dev_teacher_queries')} needs {names({'dev_queries', 'dev_labels', 'ads_emb'})}"
    return None


@dataclass
class PhaseData:
    """What the workers train on; per-row fields are sharded across ranks, the rest are shared."""

    queries: list[str]
    teacher_q_emb: np.ndarray | None = None  # (n, D) teacher embedding of queries[i]
    positive_ad_idx: np.ndarray | None = None  # (n,) rows of ad_emb (refine)
    hard_negative_idx: np.ndarray | None = None  # (n, K) rows of ad_emb (refine)
    positive_texts: list[str] | None = None  # (n,) ad texts (teacher)
    hard_negative_texts: list[list[str]] | None = None  # (n, K) ad texts (teacher)
    ad_emb: np.ndarray | None = field(default=None, metadata={"shared": True})  # (N, D) frozen teacher ads
    teacher_space: str | None = field(default=None, metadata={"shared": True})

    def shard(self, rank: int, world: int) -> PhaseData:
        """Rows rank, rank + world, …: equal-sized shards (the last n mod world rows are dropped) so every rank
        takes the same number of steps and meets the others at every collective (DDP's, a report barrier)."""
        n = len(self.queries) // world
        if n == 0:
            raise ValueError(f"{len(self.queries)} training rows cannot be split over {world} workers")
        rows = np.arange(rank, n * world, world)
        cut = {f.name: _take(getattr(self, f.name), rows) for f in fields(self)
               if not f.metadata.get("shared") and getattr(self, f.name) is not None}
        return replace(self, **cut)


def _take(values: Any, rows: np.ndarray) -> Any:
    return values[rows] if isinstance(values, np.ndarray) else [values[i] for i in rows]


def read_phase_data(job: TrainJob, inputs: PhaseInputs) -> PhaseData:
    """Read and join the phase's inputs; raises DataError / SpaceMismatch naming the file."""
    queries = read_queries(inputs.queries)
    teacher = Embeddings.read(inputs.teacher_queries) if inputs.teacher_queries else None
    ads = Embeddings.read(inputs.ads_emb) if inputs.ads_emb else None
    if teacher is not None and ads is not None:
        check_same_space(ads.space, teacher.space, f"teacher queries {teacher.source} vs ad embeddings {ads.source}")
    if job.phase.aligns:
        texts, targets = queries["text"].to_pylist(), teacher.rows_for(queries["query_id"].to_pylist())
        if inputs.ads:
            ad_texts, ad_targets = _ads_as_queries(inputs.ads, ads)
            texts, targets = texts + ad_texts, np.concatenate([targets, ad_targets])
        return PhaseData(texts, targets, ad_emb=ads.emb if job.objective == AlignmentObjective.SCORE_KL else None,
                         teacher_space=teacher.space)
    labels = read_labels(inputs.labels)
    if job.phase is Phase.refine:
        pairs = _with_file(inputs.labels, lambda: positive_pairs(queries, labels, ads.ids))
        pair_q = teacher.rows_for(pairs.query_ids)
        pairs = _mined(pairs, labels, pair_q, ads, job)
        return PhaseData(pairs.queries, pair_q, pairs.positive_ad_idx, pairs.hard_negative_idx, ad_emb=ads.emb,
                         teacher_space=teacher.space)
    # teacher: texts of the positive (and mined) ads; rows index the ad embeddings when mining, else the ads file
    ad_table = read_ads(inputs.ads)
    ad_text = dict(zip(ad_table["ad_id"].to_pylist(), ad_table["text"].to_pylist(), strict=True))
    ad_ids = ads.ids if ads is not None else ad_table["ad_id"].to_pylist()
    pairs = _with_file(inputs.labels, lambda: positive_pairs(queries, labels, ad_ids))
    if ads is not None and teacher is not None:
        pairs = _mined(pairs, labels, teacher.rows_for(pairs.query_ids), ads, job)
    used = [pairs.positive_ad_idx.ravel(), *([] if pairs.hard_negative_idx is None else [pairs.hard_negative_idx])]
    if missing := {ad_ids[i] for i in np.unique(np.concatenate([u.ravel() for u in used]))} - ad_text.keys():
        raise DataError(f"{inputs.ads}: no text for {len(missing)} ad(s) used in training (e.g. {sorted(missing)[:3]})")
    hard = None if pairs.hard_negative_idx is None else [[ad_text[ad_ids[j]] for j in row]
                                                         for row in pairs.hard_negative_idx]
    return PhaseData(pairs.queries, positive_texts=[ad_text[ad_ids[i]] for i in pairs.positive_ad_idx],
                     hard_negative_texts=hard)


def _ads_as_queries(path: Path, ads: Embeddings) -> tuple[list[str], np.ndarray]:
    """Every ad text as one more unlabelled query to align on, aimed at its teacher ad embedding: (n,), (n, D).

    The teacher is one tower, so its ad embedding is its query embedding of the same text unless queries get a
    prompt; a prompted teacher is refused. The ad corpus is usually far bigger than the labelled queries and costs
    no teacher compute (on Home Depot: 54,667 titles beside 7,128 train queries, see the README)."""
    if ads.query_prompt:
        raise DataError(f"{ads.source}: the teacher puts {ads.query_prompt!r} before queries, so its ad embeddings "
                        f"are not its query embeddings of the ad texts; align on queries only (drop the ad texts)")
    table = read_ads(path)
    return table["text"].to_pylist(), ads.rows_for(table["ad_id"].to_pylist())


def _mined(pairs: Pairs, labels: pa.Table, q_emb: np.ndarray, ads: Embeddings, job: TrainJob) -> Pairs:
    """Hard negatives from a Flat teacher index; every ad labelled > 0 for the query is kept out of them."""
    if job.hard_negatives == 0:
        return pairs
    index = AdIndex.build(ads.ids, ads.emb, ads.space, "Flat")
    skip, depth = job.hard_negative_ranks
    return mine_hard_negatives(pairs, q_emb, index, relevant_from_labels(labels, ads.ids), k=job.hard_negatives,
                               depth=depth, skip=skip)


def _with_file(path: Path, build: Callable[[], Pairs]) -> Pairs:
    try:
        return build()
    except ValueError as e:  # positive_pairs: a label names an ad that has no embedding / text
        raise DataError(f"{path}: {e}") from e
