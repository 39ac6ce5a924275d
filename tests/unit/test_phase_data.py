"""A phase's inputs without Ray: which files each phase takes, how the driver joins them, how ranks split them.

Fixture: the built-in catalogue (120 ads, 40 queries) on disk, with a tiny 48-d teacher's embeddings of the
ads and queries (and of the queries again under another model, for the space check).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hlm.catalog import generate_catalog
from hlm.config import TrainJob
from hlm.data import DataError, write_embeddings
from hlm.importers import write_dataset
from hlm.phase_data import PhaseData, PhaseInputs, input_problem, read_phase_data
from hlm.space import SpaceMismatch
from hlm.tiny import tiny_encoder

FLAG = lambda name: "--" + name.replace("_", "-")  # noqa: E731 (how pipelines.train names them)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("phase-data")
    ds = generate_catalog(n_ads=120, n_queries=40)
    write_dataset(ds, root)
    ad_ids, qids = ds.ads["ad_id"].to_pylist(), ds.queries["query_id"].to_pylist()
    for name, seed in (("", 1), ("other_", 2)):
        teacher = tiny_encoder("bert", hidden=48, seed=seed)
        teacher.settings.weights_sha256 = f"seed-{seed}"  # an unsaved model has no weights hash: make the spaces differ
        write_embeddings(root / f"{name}ads_emb.parquet", ad_ids,
                         teacher.encode(ds.ads["text"].to_pylist(), kind="ad"), teacher.describe_space())
        write_embeddings(root / f"{name}q_emb.parquet", qids[::-1],  # another order than the queries file
                         teacher.encode(ds.queries["text"].to_pylist()[::-1]), teacher.describe_space())
    return {"root": root, "ds": ds}


def inputs(files: dict, **paths: str) -> PhaseInputs:
    return PhaseInputs(**{k: files["root"] / v for k, v in paths.items()})


def test_each_phase_takes_exactly_its_inputs(files):
    refine = inputs(files, queries="queries.parquet", labels="labels.parquet", teacher_queries="q_emb.parquet",
                    ads_emb="ads_emb.parquet")
    assert input_problem(TrainJob(phase="refine"), refine, FLAG) is None
    assert input_problem(TrainJob(phase="align"), refine, FLAG) == "phase align does not use --labels"
    no_labels = PhaseInputs(**{**refine.__dict__, "labels": None})
    assert input_problem(TrainJob(phase="refine"), no_labels, FLAG) == "phase refine needs --labels"
    assert "train.prune_schedule" in input_problem(TrainJob(phase="prune"), no_labels, FLAG)
    dev_half = PhaseInputs(**{**refine.__dict__, "dev_queries": refine.queries})
    assert input_problem(TrainJob(phase="refine"), dev_half, FLAG) == "--dev-labels, --dev-queries go together"


def test_refine_pairs_each_labelled_query_with_its_ad_and_mines_only_unlabelled_negatives(files):
    data = read_phase_data(TrainJob(phase="refine"), inputs(
        files, queries="queries.parquet", labels="labels.parquet", teacher_queries="q_emb.parquet",
        ads_emb="ads_emb.parquet"))
    ds = files["ds"]
    ad_ids = ds.ads["ad_id"].to_pylist()
    text_of = dict(zip(ds.queries["query_id"].to_pylist(), ds.queries["text"].to_pylist(), strict=True))
    relevant = {(q, a) for q, a, y in zip(*(ds.labels[c].to_pylist() for c in ("query_id", "ad_id", "label")),
                                          strict=True) if y > 0}
    query_of = {t: q for q, t in text_of.items()}
    assert len(data.queries) == len(data.positive_ad_idx) == len(data.teacher_q_emb) > 0
    for text, pos, hard in zip(data.queries, data.positive_ad_idx, data.hard_negative_idx, strict=True):
        assert (query_of[text], ad_ids[pos]) in relevant
        assert not any((query_of[text], ad_ids[j]) in relevant for j in hard)
    # the teacher rows follow the pairs' queries, whatever order the embeddings file has
    teacher = tiny_encoder("bert", hidden=48, seed=1)
    np.testing.assert_allclose(data.teacher_q_emb[:3], teacher.encode(data.queries[:3]), atol=1e-5)


def test_teacher_queries_of_another_space_than_the_ads_are_refused(files):
    mixed = inputs(files, queries="queries.parquet", teacher_queries="other_q_emb.parquet", ads_emb="ads_emb.parquet")
    with pytest.raises(SpaceMismatch, match="other_q_emb.parquet"):
        read_phase_data(TrainJob(phase="align"), mixed)


def test_align_on_ads_adds_each_ad_text_aimed_at_the_teachers_query_embedding_of_it(files):
    paths = inputs(files, queries="queries.parquet", teacher_queries="q_emb.parquet", ads="ads.parquet",
                   ads_emb="ads_emb.parquet")
    data = read_phase_data(TrainJob(phase="align"), paths)
    n_q, ad_texts = files["ds"].queries.num_rows, files["ds"].ads["text"].to_pylist()
    assert data.queries[n_q:] == ad_texts and data.teacher_q_emb.shape == (n_q + len(ad_texts), 48)
    teacher = tiny_encoder("bert", hidden=48, seed=1)
    np.testing.assert_allclose(data.teacher_q_emb[n_q:n_q + 5], teacher.encode(ad_texts[:5]), atol=1e-5)
    assert data.ad_emb is None  # l2 needs no ad matrix
    assert input_problem(TrainJob(phase="align"), replace(paths, ads_emb=None), FLAG) == (
        "aligning on --ads needs --ads-emb: their teacher embeddings are the targets")


def test_aligning_on_the_ads_of_a_teacher_that_prompts_queries_is_refused(files, tmp_path):
    ds, root = files["ds"], files["root"]
    teacher = tiny_encoder("bert", hidden=48, seed=1)
    teacher.settings.weights_sha256, teacher.settings.query_prompt = "seed-1", "query: "
    write_embeddings(tmp_path / "ads_emb.parquet", ds.ads["ad_id"].to_pylist(),
                     teacher.encode(ds.ads["text"].to_pylist(), kind="ad"), teacher.describe_space())
    write_embeddings(tmp_path / "q_emb.parquet", ds.queries["query_id"].to_pylist(),
                     teacher.encode(ds.queries["text"].to_pylist()), teacher.describe_space())
    paths = PhaseInputs(queries=root / "queries.parquet", teacher_queries=tmp_path / "q_emb.parquet",
                        ads=root / "ads.parquet", ads_emb=tmp_path / "ads_emb.parquet")
    with pytest.raises(DataError, match="ads_emb.parquet: the teacher puts 'query: ' before queries"):
        read_phase_data(TrainJob(phase="align"), paths)
    assert len(read_phase_data(TrainJob(phase="align"), replace(paths, ads=None)).queries) == ds.queries.num_rows


def test_shards_are_equal_disjoint_and_share_the_ad_matrix():
    ad_emb = np.zeros((4, 2), dtype=np.float32)
    data = PhaseData([f"q{i}" for i in range(7)], teacher_q_emb=np.arange(7.0)[:, None], ad_emb=ad_emb)
    shards = [data.shard(r, 3) for r in range(3)]
    assert [s.queries for s in shards] == [["q0", "q3"], ["q1", "q4"], ["q2", "q5"]]  # q6 is dropped
    assert shards[1].teacher_q_emb.ravel().tolist() == [1.0, 4.0] and all(s.ad_emb is ad_emb for s in shards)
    with pytest.raises(ValueError, match="cannot be split"):
        data.shard(0, 8)


def test_hard_negatives_come_from_the_configured_teacher_ranks_or_not_at_all(files):
    paths = inputs(files, queries="queries.parquet", labels="labels.parquet", teacher_queries="q_emb.parquet",
                   ads_emb="ads_emb.parquet")
    top = read_phase_data(TrainJob(phase="refine", hard_negatives=2, hard_negative_ranks=(0, 10)), paths)
    deep = read_phase_data(TrainJob(phase="refine", hard_negatives=2, hard_negative_ranks=(20, 40)), paths)
    assert top.hard_negative_idx.shape == deep.hard_negative_idx.shape == (len(top.queries), 2)
    # the deep window never hands out an ad the teacher ranks in its top 20 for that query
    scores = top.teacher_q_emb @ top.ad_emb.T
    top20 = np.argsort(-scores, axis=1)[:, :20]
    assert not any(set(row) & set(ranked) for row, ranked in zip(deep.hard_negative_idx, top20, strict=True))
    assert any(set(row) & set(ranked) for row, ranked in zip(top.hard_negative_idx, top20, strict=True))
    assert read_phase_data(TrainJob(phase="refine", hard_negatives=0), paths).hard_negative_idx is None


def test_a_rank_window_that_is_empty_or_reversed_is_refused():
    with pytest.raises(ValueError, match="from < to"):
        TrainJob(hard_negative_ranks=(30, 10))
