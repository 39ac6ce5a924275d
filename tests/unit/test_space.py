"""Spaces: truncation cuts and renormalises the same way everywhere, and embeddings are read with their space."""

from __future__ import annotations

import numpy as np
import pytest

from hlm.data import DataError, write_embeddings
from hlm.space import Embeddings, space_at_width, truncate, truncated_space


def test_truncate_takes_the_first_dims_and_renormalises_each_row():
    emb = np.array([[3.0, 4.0, 12.0]], dtype=np.float32) / 13.0
    assert np.allclose(truncate(emb, 2), [[0.6, 0.8]])
    assert truncate(emb, 3) is emb


def test_truncate_cuts_batches_of_rows_and_keeps_a_zero_row_zero():
    emb = np.zeros((2, 3, 4), dtype=np.float32)  # (B, K, D), e.g. hard negatives
    emb[0, 0] = [1.0, 1.0, 5.0, 5.0]
    cut = truncate(emb, 2)  # (B, K, 2)
    assert cut.shape == (2, 3, 2) and cut.dtype == np.float32
    assert np.allclose(cut[0, 0], [2 ** -0.5, 2 ** -0.5]) and np.all(cut[1] == 0)


def test_a_space_at_a_narrower_width_is_its_truncation_and_at_full_width_itself():
    assert space_at_width("s" * 16, 8, 8) == "s" * 16
    assert space_at_width("s" * 16, 8, 4) == truncated_space("s" * 16, 4) != truncated_space("s" * 16, 3)


def test_rows_for_returns_rows_in_the_order_asked_and_names_the_file_and_a_missing_id(tmp_path):
    path = write_embeddings(tmp_path / "q.parquet", ["a", "b"], np.eye(2, dtype=np.float32),
                            {"fingerprint": "f" * 16, "dim": 2, "model": "m", "pooling": "mean", "normalized": True})
    emb = Embeddings.read(path)
    assert np.array_equal(emb.rows_for(["b", "a"]), [[0, 1], [1, 0]]) and emb.space == "f" * 16
    with pytest.raises(DataError, match=r"q\.parquet.*'zz'"):
        emb.rows_for(["a", "zz"])
