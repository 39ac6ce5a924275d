"""Every inference precision against the fp32 reference on a tiny model (docs/design.md, "Code style" 11),
and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlm.config import ModelRef, Precision, Runtime
from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.precision import PrecisionError, resolve_precision
from hlm.tiny import save_tiny_encoder

WORDS = ["cordless", "drill", "white", "paint", "brass", "lamp", "oak", "door", "tile", "steel", "water", "light"]
# Measured on this tiny model (hidden 64, 4 layers, projection 96): min cosine to fp32 0.99999 (int8) and
# 0.996 (bf16), int8 top-10 overlap 0.997 on 64 queries over 400 corpus rows; the thresholds leave room for
# other CPUs' kernels. Random weights quantise easily: on the real student int8 reaches a min cosine of
# ~0.95, and bench/encoder.py measures what matters there, the R@100 of int8 against fp32.
MIN_COSINE = {Precision.int8: 0.99, Precision.bf16: 0.98}
MIN_TOP10_OVERLAP = 0.9


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    # Wider and deeper than conftest's tiny_bert_dir, with a projection head: int8 must leave that head in fp32
    return save_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny", "bert", hidden=64, layers=4,
                             projection_dim=96)


@pytest.fixture(scope="module")
def reference(tiny_dir) -> Encoder:
    return Encoder.load(ModelRef(model=str(tiny_dir), precision=Precision.fp32))


@pytest.mark.parametrize("precision", [Precision.int8, Precision.bf16])
def test_fast_precision_embeddings_stay_close_to_fp32(tiny_dir, reference, precision):
    # Given the same tiny model in fp32 and in a fast precision
    fast = Encoder.load(ModelRef(model=str(tiny_dir), precision=precision))
    queries = texts(64, seed=1)
    # When both encode the same queries
    ref_emb, fast_emb = reference.encode(queries), fast.encode(queries)
    # Then the contract holds (float32, same shape) and every row points the same way
    assert fast_emb.dtype == np.float32 and fast_emb.shape == ref_emb.shape == (64, 96)
    assert fast.settings.precision is precision and fast.space == reference.space
    assert (fast_emb * ref_emb).sum(axis=1).min() >= MIN_COSINE[precision]


def test_int8_queries_find_largely_the_same_neighbours_as_fp32(tiny_dir, reference):
    # Given a corpus embedded in fp32 (as the teacher-built ad index is) and queries encoded both ways
    corpus = reference.encode(texts(400, seed=2), kind="ad")
    index = AdIndex.build([f"ad-{i}" for i in range(400)], corpus, reference.space)
    int8 = Encoder.load(ModelRef(model=str(tiny_dir), precision=Precision.int8))
    queries = texts(64, seed=3)
    # When both search the same index
    _, ref_top = index.search(reference.encode(queries), 10)
    _, int8_top = index.search(int8.encode(queries), 10)
    # Then the top-10 sets mostly agree
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref_top, int8_top, strict=True)])
    assert overlap >= MIN_TOP10_OVERLAP


def test_int8_replaces_every_backbone_linear_but_keeps_the_projection_fp32(tiny_dir):
    int8 = Encoder.load(ModelRef(model=str(tiny_dir), precision=Precision.int8))
    assert not any(type(m) is torch.nn.Linear for m in int8.backbone.modules())
    assert type(int8.projection) is torch.nn.Linear and int8.projection.weight.dtype == torch.float32


def test_no_precision_follows_the_runtime_dtype(tiny_dir):
    encoder = Encoder.load(str(tiny_dir), Runtime(device="cpu", dtype="bfloat16"))
    assert encoder.settings.precision is Precision.bf16
    assert encoder.encode(["oak door"]).dtype == np.float32


def test_an_int8_encoder_refuses_to_save(tiny_dir, tmp_path):
    int8 = Encoder.load(ModelRef(model=str(tiny_dir), precision=Precision.int8))
    with pytest.raises(ValueError, match="save the fp32 encoder"):
        int8.save(tmp_path / "int8")


def test_precision_is_a_load_time_choice_and_is_not_saved(tiny_dir, tmp_path):
    bf16 = Encoder.load(ModelRef(model=str(tiny_dir), precision=Precision.bf16))
    assert "precision" not in bf16.settings.to_json()
    assert Encoder.load(bf16.save(tmp_path / "again")).settings.precision is Precision.fp32


@pytest.mark.parametrize(("precision", "device", "message"), [
    (Precision.int8, "cuda", "CPU kernels only"),
    (Precision.fp16, "cpu", "needs a GPU"),
])
def test_a_precision_the_device_cannot_run_is_refused(precision, device, message):
    with pytest.raises(PrecisionError, match=message):
        resolve_precision(precision, torch.device(device), torch.float32)


def test_fp16_on_cpu_is_refused_before_loading(tiny_dir):
    with pytest.raises(PrecisionError, match="on CPU use fp32, bf16 or int8"):
        Encoder.load(ModelRef(model=str(tiny_dir), precision=Precision.fp16), Runtime(device="cpu"))


@pytest.mark.parametrize(("requested", "runtime_dtype", "expected"), [
    (None, torch.float32, Precision.fp32), (None, torch.bfloat16, Precision.bf16),
    (Precision.int8, torch.float32, Precision.int8), (Precision.fp32, torch.bfloat16, Precision.fp32),
])
def test_an_explicit_precision_wins_over_the_runtime_dtype(requested, runtime_dtype, expected):
    assert resolve_precision(requested, torch.device("cpu"), runtime_dtype) is expected


def test_the_tokenizer_is_fast_and_truncates_to_max_length(tiny_dir):
    encoder = Encoder.load(ModelRef(model=str(tiny_dir), max_length=8))
    assert encoder.tokenizer.is_fast
    batch = encoder.tokenize(["a very long query " * 20, "oak"])
    assert batch["input_ids"].shape == (2, 8)


def test_a_slow_tokenizer_is_refused(tiny_dir):
    from transformers import AutoModel

    class Slow:  # what a Python tokenizer reports; the encoder checks nothing else before refusing
        is_fast = False

    with pytest.raises(ValueError, match="slow"):
        Encoder(AutoModel.from_pretrained(tiny_dir), Slow(), Encoder.load(str(tiny_dir)).settings)
