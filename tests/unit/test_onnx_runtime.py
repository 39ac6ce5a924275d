"""The ONNX Runtime encoder against torch fp32 (its slow reference), on one tiny student exported once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hlm.config import ModelRef, Precision
from hlm.encoder import Encoder
from hlm.onnx_runtime import OnnxMissing
from hlm.tiny import tiny_encoder
from pipelines import export_onnx

TEXTS = ["cordless drill 18v", "white ceiling paint", "brass lamp", "oak door", "steel tile cutter",
         "a much longer query about an oak door with brass hinges and white paint"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny student with a 32 -> 48 head, exported through the CLI as a user would."""
    folder = tiny_encoder("bert", projection_dim=48).save(tmp_path_factory.mktemp("onnx") / "student")
    assert export_onnx.main(["--model", str(folder)]) == 0
    return folder


def load(folder: Path, precision: Precision) -> Encoder:
    return Encoder.load(ModelRef(model=str(folder), precision=precision))


def test_the_onnx_graph_encodes_like_torch_in_the_same_space(exported):
    torch_fp32, onnx = load(exported, Precision.fp32), load(exported, Precision.onnx)
    np.testing.assert_allclose(onnx.encode(TEXTS, batch_size=4), torch_fp32.encode(TEXTS), atol=1e-5)
    assert (onnx.dim, onnx.space) == (torch_fp32.dim, torch_fp32.space) == (48, torch_fp32.space)
    assert onnx.encode(["lamp"], kind="ad").dtype == np.float32


def test_the_int8_graph_stays_close_to_fp32_and_ranks_alike(exported):
    fp32, int8 = load(exported, Precision.fp32).encode(TEXTS), load(exported, Precision.onnx_int8).encode(TEXTS)
    cosine = (fp32 * int8).sum(axis=1)  # (n,) both unit-norm
    assert cosine.min() > 0.98, cosine
    # each text's nearest other text is the same
    nearest = [(e @ e.T - 2 * np.eye(len(TEXTS))).argmax(axis=1) for e in (fp32, int8)]  # (n,) each
    assert (nearest[0] == nearest[1]).all()


def test_a_model_without_an_export_names_the_command(tmp_path):
    folder = tiny_encoder("bert").save(tmp_path / "m")
    with pytest.raises(OnnxMissing, match="python -m pipelines.export_onnx --model"):
        load(folder, Precision.onnx)
