"""Input validation of the embedding job: rejects keep their file and row, deleted ads are skipped."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from hlm.embedding import EmbedBatch, embed_plain, validate_inputs


def test_rejected_rows_keep_their_file_row_even_after_deleted_rows_and_across_files(tmp_path):
    pq.write_table(pa.table({"ad_id": ["a", "b", "c", "d"], "text": ["x", "y", None, "w"],
                             "deleted": [False, True, False, False]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"ad_id": ["e", "a"], "text": ["x", "y"]}), tmp_path / "2.parquet")
    inputs = validate_inputs(tmp_path, "ads")
    assert inputs.rows["id"].to_pylist() == ["a", "d", "e"]  # b is deleted, c has no text, the second a is a dupe
    rejected = [(r["_file"].rsplit("/", 1)[1], r["_row"], r["_reason"]) for r in inputs.rejected.to_pylist()]
    assert rejected == [("1.parquet", 2, "text is null"),
                        ("2.parquet", 1, "ad_id duplicate id seen earlier in the input")]


def test_plain_loop_reference_keeps_ids_and_order(tmp_path, tiny_bert_dir):
    rows = pa.table({"id": ["x", "y", "z"], "text": ["drill", "lamp", "paint"]})
    out = embed_plain(rows, EmbedBatch({"model": str(tiny_bert_dir)}, "ads", batch_size=2), batch_size=2)
    assert out["id"].to_pylist() == ["x", "y", "z"] and out.schema.field("embedding").type.list_size == 32
