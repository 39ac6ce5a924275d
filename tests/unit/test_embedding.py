"""Input validation of the embedding job: rejects keep their file and row, deleted ads are skipped."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.embedding import EmbedBatch, embed_plain, validate_inputs
from hlm.encoder import Encoder
from hlm.tiny import save_tiny_encoder


def test_rejected_rows_keep_their_file_row_even_after_deleted_rows_and_across_files(tmp_path):
    pq.write_table(pa.table({"ad_id": ["a", "b", "c", "d"], "text": ["x", "y", None, "w"],
                             "deleted": [False, True, False, False]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"ad_id": ["e", "a"], "text": ["x", "y"]}), tmp_path / "2.parquet")
    inputs = validate_inputs(tmp_path, "ads")
    assert inputs.rows["id"].to_pylist() == ["a", "d", "e"]  # b is deleted, c has no text, the second a is a dupe
    rejected = [(r["_file"].rsplit("/", 1)[1], r["_row"], r["_reason"]) for r in inputs.rejected.to_pylist()]
    assert rejected == [("1.parquet", 2, "text is null"),
                        ("2.parquet", 1, "ad_id duplicate id seen earlier in the input")]


@pytest.mark.parametrize(("kind", "encoder_kind"), [("ads", "ad"), ("queries", "query")])
def test_plain_loop_reference_gives_each_id_the_encoders_vector_of_its_text(tmp_path, kind, encoder_kind):
    # Given three rows, embedded two at a time by a model whose queries get a prompt and ads do not
    model = save_tiny_encoder(tmp_path / "qwen3", "qwen3")
    texts = ["drill", "lamp", "paint"]
    rows = pa.table({"id": ["x", "y", "z"], "text": texts})
    out = embed_plain(rows, EmbedBatch({"model": str(model)}, kind, batch_size=2), batch_size=2)
    # Then each id keeps its row and holds Encoder.encode's vector of its text, as that kind
    assert out["id"].to_pylist() == ["x", "y", "z"] and out.schema.field("embedding").type.list_size == 32
    got = np.stack(out["embedding"].to_numpy(zero_copy_only=False))  # (3, 32)
    np.testing.assert_allclose(got, Encoder.load(model).encode(texts, kind=encoder_kind), atol=1e-5)
