"""Data contracts: validating Parquet readers that name file, row and field; atomic writes; embedding files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.data import (
    ADS,
    LABELS,
    QUERIES,
    DataError,
    qrels_from_labels,
    read_ads,
    read_embeddings,
    read_labels,
    read_queries,
    split_valid,
    write_embeddings,
    write_table,
)

SPACE = {"fingerprint": "abc123", "model": "tiny", "pooling": "mean", "dim": 4, "normalized": True}
VALID = {
    "ads": {"ad_id": ["a1", "a2", "a3"], "text": ["red shoes", "blue hat", "green scarf"]},
    "queries": {"query_id": ["q1", "q2"], "text": ["shoes", "hat"]},
    "labels": {"query_id": ["q1", "q1", "q2"], "ad_id": ["a1", "a2", "a2"], "label": [2.0, 0.0, 1.0]},
}
READERS = {"ads": (ADS, read_ads), "queries": (QUERIES, read_queries), "labels": (LABELS, read_labels)}
CONTRACTS = pytest.mark.parametrize("kind", list(READERS))


def corrupt(kind: str, column: str, row: int, value: object) -> dict:
    columns = {k: list(v) for k, v in VALID[kind].items()}
    columns[column][row] = value
    return columns


@CONTRACTS
def test_valid_table_round_trips_through_write_and_read(tmp_path: Path, kind: str) -> None:
    # Given a valid table / When written and read back
    contract, read = READERS[kind]
    path = write_table(pa.table(VALID[kind]), tmp_path / f"{kind}.parquet", contract)
    table = read(path)

    # Then the rows and the contract's types come back
    assert table.to_pydict() == VALID[kind]
    assert table.select(contract.schema.names).schema.remove_metadata() == contract.schema


def test_optional_ad_columns_are_kept_and_cast(tmp_path: Path) -> None:
    ads = pa.table({**VALID["ads"], "deleted": [False, True, False], "title": ["Red", None, "Green"]})

    table = read_ads(write_table(ads, tmp_path / "ads.parquet", ADS))

    assert table.column("deleted").to_pylist() == [False, True, False]
    assert table.column("title").to_pylist() == ["Red", None, "Green"]


@pytest.mark.parametrize(
    ("kind", "column"),
    [("ads", "ad_id"), ("ads", "text"), ("queries", "text"), ("labels", "label"), ("labels", "ad_id")],
)
def test_missing_column_is_reported_with_file_and_field(tmp_path: Path, kind: str, column: str) -> None:
    # Given a file without a required column
    path = tmp_path / f"{kind}.parquet"
    pq.write_table(pa.table(VALID[kind]).drop_columns([column]), path)

    # When / Then
    with pytest.raises(DataError, match="missing column") as err:
        READERS[kind][1](path)
    assert str(path) in str(err.value) and f"'{column}'" in str(err.value)


@pytest.mark.parametrize(
    ("kind", "column", "row", "value", "reason"),
    [
        ("ads", "text", 1, None, "is null"),
        ("ads", "text", 2, "", "is empty"),
        ("ads", "text", 0, " \t\n", "is empty"),
        ("ads", "ad_id", 1, None, "is null"),
        ("ads", "ad_id", 2, "  ", "is empty"),
        ("ads", "ad_id", 2, "a1", "duplicate id 'a1' (first at row 0)"),
        ("queries", "text", 1, None, "is null"),
        ("queries", "text", 1, "   ", "is empty"),
        ("queries", "query_id", 1, "q1", "duplicate id 'q1' (first at row 0)"),
        ("labels", "query_id", 2, None, "is null"),
        ("labels", "ad_id", 1, "", "is empty"),
        ("labels", "label", 1, float("nan"), "is not a finite number"),
        ("labels", "label", 2, float("inf"), "is not a finite number (inf)"),
        ("labels", "label", 2, float("-inf"), "is not a finite number (-inf)"),
        ("labels", "label", 0, None, "is null"),
    ],
)
def test_bad_row_is_reported_with_file_row_and_field(
    tmp_path: Path, kind: str, column: str, row: int, value: object, reason: str
) -> None:
    # Given a file with one bad value (written around the validator, as a foreign producer would)
    path = tmp_path / f"{kind}.parquet"
    pq.write_table(pa.table(corrupt(kind, column, row, value)), path)

    # When / Then
    with pytest.raises(DataError) as err:
        READERS[kind][1](path)
    assert f"{path}: row {row}, field '{column}': {reason}" in str(err.value)


def test_label_that_is_not_a_number_names_the_row(tmp_path: Path) -> None:
    # Given labels as strings, one of which is not a number
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({**VALID["labels"], "label": ["2", "1.5", "abc"]}), path)

    # When / Then
    with pytest.raises(DataError) as err:
        read_labels(path)
    assert f"{path}: row 2, field 'label'" in str(err.value)


def test_numeric_strings_and_integer_labels_are_cast_to_float32(tmp_path: Path) -> None:
    pq.write_table(pa.table({**VALID["labels"], "label": ["2", "1.5", "0"]}), tmp_path / "s.parquet")
    pq.write_table(pa.table({**VALID["labels"], "label": [2, 1, 0]}), tmp_path / "i.parquet")

    assert read_labels(tmp_path / "s.parquet").column("label").to_pylist() == [2.0, 1.5, 0.0]
    assert read_labels(tmp_path / "i.parquet").column("label").type == pa.float32()


@pytest.mark.parametrize(("content", "message"), [(b"PAR1 not really parquet", "not a readable Parquet"),
                                                  (None, "no such file")])
def test_unreadable_or_missing_file_raises_data_error_naming_it(tmp_path: Path, content: bytes | None,
                                                                 message: str) -> None:
    path = tmp_path / "ads.parquet"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(DataError, match=message) as err:
        read_ads(path)
    assert str(path) in str(err.value)


def test_folder_of_files_is_read_together_and_duplicates_across_files_are_caught(tmp_path: Path) -> None:
    # Given two valid files in one folder, the second repeating an id of the first
    write_table(pa.table({"ad_id": ["a1"], "text": ["x"]}), tmp_path / "ok" / "0.parquet", ADS)
    write_table(pa.table({"ad_id": ["a2"], "text": ["y"]}), tmp_path / "ok" / "1.parquet", ADS)
    write_table(pa.table({"ad_id": ["a1"], "text": ["x"]}), tmp_path / "dup" / "0.parquet", ADS)
    write_table(pa.table({"ad_id": ["a1"], "text": ["y"]}), tmp_path / "dup" / "1.parquet", ADS)

    # When / Then
    assert read_ads(tmp_path / "ok").column("ad_id").to_pylist() == ["a1", "a2"]
    with pytest.raises(DataError, match="duplicate id 'a1'"):
        read_ads(tmp_path / "dup")


def test_split_valid_returns_valid_rows_and_rejected_rows_with_reasons() -> None:
    # Given ads with a null text (row 1) and a duplicate id (row 3)
    ads = pa.table({"ad_id": ["a1", "a2", "a3", "a1"], "text": ["x", None, "z", "w"]})

    # When
    valid, rejected = split_valid(ads, ADS)

    # Then nothing is dropped silently
    assert valid.to_pydict() == {"ad_id": ["a1", "a3"], "text": ["x", "z"]}
    assert rejected.column("_row").to_pylist() == [1, 3]
    assert rejected.column("ad_id").to_pylist() == ["a2", "a1"]
    assert rejected.column("_reason").to_pylist() == ["text is null", "ad_id duplicate id 'a1' (first at row 0)"]


def test_split_valid_of_a_clean_table_rejects_nothing() -> None:
    valid, rejected = split_valid(pa.table(VALID["queries"]), QUERIES)

    assert valid.num_rows == 2 and rejected.num_rows == 0
    assert rejected.column_names == ["query_id", "text", "_row", "_reason"]


def test_write_table_leaves_only_the_final_file(tmp_path: Path) -> None:
    write_table(pa.table(VALID["ads"]), tmp_path / "ads.parquet", ADS)
    write_table(pa.table(VALID["ads"]), tmp_path / "ads.parquet", ADS)  # overwrite goes through a rename too

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ads.parquet"]


def test_invalid_table_writes_nothing(tmp_path: Path) -> None:
    bad = pa.table(corrupt("ads", "text", 0, ""))

    with pytest.raises(DataError, match="row 0, field 'text'"):
        write_table(bad, tmp_path / "out" / "ads.parquet", ADS)

    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_embeddings_round_trip_ids_exact_vectors_and_space(tmp_path: Path) -> None:
    # Given random float32 vectors
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)  # (N, d)

    # When written and read back
    path = write_embeddings(tmp_path / "emb.parquet", ["a1", "a2", "a3"], emb, SPACE)
    ids, back, space = read_embeddings(path)

    # Then everything is exact, and the file is plain Arrow
    assert ids == ["a1", "a2", "a3"] and space == SPACE
    assert back.dtype == np.float32 and np.array_equal(back, emb)
    plain = pq.read_table(path)
    assert plain.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert plain.schema.field("id").type == pa.string()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.parquet"]


def test_embeddings_folder_concatenates_files_of_one_space(tmp_path: Path) -> None:
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)  # (N, d)
    write_embeddings(tmp_path / "part-0.parquet", ["a1", "a2"], emb[:2], SPACE)
    write_embeddings(tmp_path / "part-1.parquet", ["a3"], emb[2:], SPACE)

    ids, back, space = read_embeddings(tmp_path)

    assert ids == ["a1", "a2", "a3"] and np.array_equal(back, emb) and space == SPACE


@pytest.mark.parametrize(
    ("second_ids", "second_space", "message"),
    [(["a3"], {**SPACE, "fingerprint": "other"}, "2 different embedding spaces"),
     (["a2"], SPACE, "1 duplicate id")],
)
def test_embeddings_folder_rejects_mixed_spaces_and_duplicate_ids(
    tmp_path: Path, second_ids: list[str], second_space: dict, message: str
) -> None:
    write_embeddings(tmp_path / "part-0.parquet", ["a1", "a2"], np.ones((2, 4), np.float32), SPACE)
    write_embeddings(tmp_path / "part-1.parquet", second_ids, np.zeros((1, 4), np.float32), second_space)

    with pytest.raises(DataError, match=message):
        read_embeddings(tmp_path)


def test_qrels_from_labels_nests_labels_by_query() -> None:
    qrels = qrels_from_labels(pa.table(VALID["labels"]))

    assert qrels == {"q1": {"a1": 2.0, "a2": 0.0}, "q2": {"a2": 1.0}}

