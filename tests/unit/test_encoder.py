"""The encoder contract on tiny random models: shapes, pooling, prompts, projection, save/load, spaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlm.config import ModelRef, Pooling
from hlm.encoder import Encoder, describe_space_of, pool
from hlm.pretrained import portable
from hlm.tiny import tiny_encoder

TEXTS = ["cordless drill 18v", "white ceiling paint", "brass lamp", "a much longer query about an oak door"]


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_encode_returns_unit_float32_rows_in_input_order(family):
    encoder = tiny_encoder(family)
    emb = encoder.encode(TEXTS, batch_size=3)
    assert emb.shape == (4, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Order is the caller's, whatever the length-sorted batching did inside
    np.testing.assert_allclose(emb[2], encoder.encode([TEXTS[2]])[0], atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_padding_does_not_change_an_embedding(family):
    # last_token pooling must read the last real token, mean pooling must ignore pads
    encoder = tiny_encoder(family)
    alone = encoder.encode(["lamp"])
    padded = encoder.encode(["lamp", "a very long text that forces plenty of padding on the short one"], batch_size=2)
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_pooling_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])  # (B=1, T=3, h=2), last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, Pooling.mean).tolist() == [[2.0, 1.0]]
    assert pool(hidden, mask, Pooling.cls).tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, Pooling.last_token).tolist() == [[3.0, 2.0]]


def test_query_prompt_applies_to_queries_only():
    encoder = tiny_encoder("qwen3")
    assert encoder.settings.query_prompt
    as_query, as_ad = encoder.encode(["brass lamp"], kind="query"), encoder.encode(["brass lamp"], kind="ad")
    assert not np.allclose(as_query, as_ad)
    encoder.settings.query_prompt = ""
    np.testing.assert_allclose(encoder.encode(["brass lamp"], kind="query"), as_ad, atol=1e-6)


def test_projection_maps_into_the_target_width():
    encoder = tiny_encoder("bert", projection_dim=48)
    assert encoder.dim == 48 and encoder.encode(TEXTS).shape == (4, 48)


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_save_then_load_gives_the_same_embeddings_and_space(tmp_path, family):
    encoder = tiny_encoder(family, projection_dim=40)
    encoder.save(tmp_path / "m")
    loaded = Encoder.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)
    assert loaded.space == encoder.space and loaded.settings == encoder.settings
    assert (tmp_path / "m" / "hlm_encoder.json").exists()


def test_space_fingerprint_follows_weights_pooling_and_prompt(tmp_path):
    a = Encoder.load(tiny_encoder("bert", seed=0).save(tmp_path / "a"))
    b = Encoder.load(tiny_encoder("bert", seed=1).save(tmp_path / "b"))
    assert a.space != b.space  # other weights
    cls_pooled = Encoder.load(ModelRef(model=str(tmp_path / "a"), pooling=Pooling.cls))
    assert cls_pooled.space != a.space
    prompted = Encoder.load(ModelRef(model=str(tmp_path / "a"), query_prompt="query: "))
    assert prompted.space != a.space


def test_a_student_reports_the_space_it_was_aligned_to(tmp_path):
    student = tiny_encoder("bert", projection_dim=64)
    student.settings.target_space = "teacher-space-0001"
    assert Encoder.load(student.save(tmp_path / "s")).space == "teacher-space-0001"


def test_unknown_model_name_is_refused_without_touching_a_hub():
    with pytest.raises(Exception, match="never downloads"):
        Encoder.load("sentence-transformers/all-MiniLM-L6-v2")


def test_a_model_folder_is_named_absolutely_for_ray_workers_and_a_default_by_name(tmp_path, monkeypatch):
    # Ray Train and Tune workers run in a directory of their own: a relative folder would name nothing there
    (tmp_path / "runs" / "align" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert portable("runs/align/model") == str(tmp_path / "runs" / "align" / "model")
    assert portable("student-default") == "student-default"


@pytest.mark.parametrize("projection_dim", [None, 48])
def test_space_description_without_loading_weights_matches_the_loaded_encoder(tmp_path, projection_dim):
    folder = tiny_encoder("qwen3", projection_dim=projection_dim).save(tmp_path / "m")
    assert describe_space_of(folder) == Encoder.load(folder).describe_space()
