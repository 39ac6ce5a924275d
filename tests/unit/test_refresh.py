"""The refresh logic without Ray or Redis: text hashes, the catalogue diff, merging embeddings, the gate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.config import ConfigError, load_config
from hlm.gate import gate
from hlm.refresh import read_catalogue
from hlm.refresh_state import diff, merge_embeddings, text_hashes

REPO = Path(__file__).resolve().parents[2]


def ads(ids: list[str], texts: list[str | None], deleted: list[bool | None] | None = None) -> pa.Table:
    cols = {"ad_id": ids, "text": pa.array(texts, pa.string())}
    return pa.table(cols | ({"deleted": pa.array(deleted, pa.bool_())} if deleted is not None else {}))


# ------------------------------------------------------------------------------------------------ diff


def test_diff_finds_new_changed_deleted_and_unchanged_ads() -> None:
    # Given yesterday's catalogue and today's: a changed, b unchanged, c gone, d new
    previous = text_hashes(ads(["a", "b", "c"], ["drill", "lamp", "door"]))
    current = text_hashes(ads(["a", "b", "d"], ["cordless drill", "lamp", "paint"]))
    # When
    d = diff(current, previous)
    # Then
    assert (d.new, d.changed, d.deleted, d.unchanged) == (["d"], ["a"], ["c"], ["b"])
    assert d.to_embed == ["d", "a"]


def test_a_row_flagged_deleted_counts_as_deleted_and_a_null_flag_as_live(tmp_path: Path) -> None:
    previous = text_hashes(ads(["a", "b", "c"], ["drill", "lamp", "door"]))
    pq.write_table(ads(["a", "b", "c"], ["drill", "lamp", "door"], deleted=[False, True, None]), tmp_path / "a.parquet")
    current = text_hashes(read_catalogue(tmp_path / "a.parquet")[0])
    d = diff(current, previous)
    assert (d.new, d.changed, d.deleted, d.unchanged) == ([], [], ["b"], ["a", "c"])


def test_with_no_previous_version_everything_is_new() -> None:
    d = diff(text_hashes(ads(["a", "b"], ["x", "y"])), {})
    assert (d.new, d.changed, d.deleted, d.unchanged) == (["a", "b"], [], [], [])


def test_text_hashes_are_sha256_of_the_text() -> None:
    h = text_hashes(ads(["a"], ["drill"]))
    assert h == {"a": hashlib.sha256(b"drill").hexdigest()}
    assert h != text_hashes(ads(["a"], ["drill "]))  # any byte of the text changes the hash


# ------------------------------------------------------------------------------------------------ catalogue


def test_read_catalogue_reports_bad_rows_with_their_row_in_the_file(tmp_path: Path) -> None:
    # Given a file where a deleted row with a null text comes before a null text (row numbers must be the file's)
    pq.write_table(ads(["a", "b", "c", "a"], ["x", None, None, "dup"], deleted=[False, True, False, False]),
                   tmp_path / "ads.parquet")
    # When
    rows, rejected = read_catalogue(tmp_path / "ads.parquet")
    # Then the deleted row is neither kept nor rejected
    assert rows.column("ad_id").to_pylist() == ["a"]
    assert [(r["_row"], r["ad_id"], r["_reason"]) for r in rejected.to_pylist()] == [
        (2, "c", "text is null"), (3, "a", "ad_id duplicate id 'a' (first at row 0)")]


# ------------------------------------------------------------------------------------------------ merge


def test_merge_takes_fresh_vectors_over_previous_ones_in_the_given_order() -> None:
    prev = (["a", "b", "c"], np.arange(6, dtype=np.float32).reshape(3, 2))
    fresh = (["b", "d"], np.full((2, 2), 9, np.float32))
    out = merge_embeddings(["d", "a", "b"], prev, fresh)
    np.testing.assert_array_equal(out, [[9, 9], [0, 1], [9, 9]])


def test_merge_refuses_an_id_without_any_vector_and_mixed_widths() -> None:
    prev = (["a"], np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="neither a fresh nor a previous"):
        merge_embeddings(["a", "z"], prev, ([], np.zeros((0, 0), np.float32)))
    with pytest.raises(ValueError, match="width"):
        merge_embeddings(["a", "b"], prev, (["b"], np.zeros((1, 3), np.float32)))


# ------------------------------------------------------------------------------------------------ gate


def test_gate_passes_when_every_check_passes() -> None:
    result = gate(new_space="s1", serving_space="s1", recall=0.99, min_recall=0.95, quality=0.30,
                  serving_quality=0.31, max_quality_drop=0.02)
    assert result.passed and result.reason == ""
    assert {k: c["status"] for k, c in result.checks.items()} == {
        "space": "pass", "ann_recall": "pass", "canary_quality": "pass"}


def test_gate_refuses_low_ann_recall() -> None:
    result = gate(new_space="s1", serving_space=None, recall=0.90, min_recall=0.95)
    assert not result.passed
    assert result.checks["ann_recall"]["status"] == "fail" and "below refresh.min_recall 0.95" in result.reason


def test_gate_refuses_a_canary_quality_drop_beyond_the_allowed_one() -> None:
    result = gate(new_space="s1", serving_space="s1", recall=1.0, min_recall=0.95, quality=0.27,
                  serving_quality=0.30, max_quality_drop=0.02)
    assert not result.passed and result.checks["canary_quality"]["status"] == "fail"
    assert "P@100 0.2700 is more than 0.02 below the serving version's 0.3000" in result.reason


def test_gate_refuses_another_space_and_says_what_to_do() -> None:
    result = gate(new_space="new", serving_space="old", recall=None, min_recall=0.95)
    assert not result.passed and result.checks["space"]["status"] == "fail"
    assert "new index name" in result.reason and "retrain the students" in result.reason
    assert result.checks["canary_quality"]["status"] == "skipped"


def test_gate_skips_the_canary_with_a_note_when_it_cannot_compare() -> None:
    first = gate(new_space="s1", serving_space=None, recall=1.0, min_recall=0.95, quality=0.3)
    no_set = gate(new_space="s1", serving_space="s1", recall=1.0, min_recall=0.95)
    assert first.passed and "no serving version" in first.checks["canary_quality"]["note"]
    assert first.checks["space"]["status"] == "skipped"
    assert no_set.passed and "no canary set" in no_set.checks["canary_quality"]["note"]


def test_gate_never_passes_without_a_recall_measurement() -> None:
    result = gate(new_space="s1", serving_space="s1", recall=None, min_recall=0.95)
    assert not result.passed and result.reason == "ANN recall was not measured"


# ------------------------------------------------------------------------------------------------ config


def test_example_config_loads_and_canary_files_go_together() -> None:
    cfg = load_config(REPO / "configs" / "refresh.yaml")
    assert cfg.refresh.index == "ads" and cfg.refresh.min_recall == 0.95 and cfg.refresh.ads
    assert load_config().refresh.ads == ""  # the job refuses to start without it
    with pytest.raises(ConfigError, match="set both or neither"):
        load_config(overrides=["refresh.canary_queries=q.parquet"])
