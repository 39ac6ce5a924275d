"""Saved encoders are sentence-transformers folders, and sentence-transformers folders load as teachers.

Parity is pinned on tiny random models here and on the default student in tests/integration/test_default_weights.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer, models

from hlm.config import Pooling
from hlm.encoder import Encoder
from hlm.pretrained import WeightsError, portable
from hlm.st_format import read_st_folder
from hlm.tiny import tiny_encoder

# the last one is longer than max_length (32 tokens): truncation must match too
TEXTS = ["cordless drill 18v", "white ceiling paint", "brass lamp",
         "a much longer query about an oak door with brass hinges, a steel frame and white paint on both sides"]


def assert_same_embeddings(st_model: SentenceTransformer, encoder: Encoder) -> None:
    """Queries through the folder's query prompt, ads without one; same width, values within 1e-5."""
    np.testing.assert_allclose(st_model.encode_query(TEXTS), encoder.encode(TEXTS, kind="query"), atol=1e-5)
    np.testing.assert_allclose(st_model.encode_document(TEXTS), encoder.encode(TEXTS, kind="ad"), atol=1e-5)


@pytest.mark.parametrize(("family", "projection_dim"), [("bert", None), ("bert", 48), ("qwen3", 40)])
def test_sentence_transformers_loads_a_saved_encoder_to_the_same_embeddings(tmp_path, family, projection_dim):
    # Given a saved student (with a projection head into a wider teacher space) or teacher
    encoder = tiny_encoder(family, projection_dim=projection_dim)
    encoder.save(tmp_path / "m")
    # When sentence-transformers loads the folder, Then it computes the same queries and ads, in the same width
    st_model = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    assert_same_embeddings(st_model, encoder)


def test_the_sentence_transformers_files_describe_the_encoder_settings(tmp_path):
    encoder = tiny_encoder("qwen3", projection_dim=40, max_length=24)
    layout = read_st_folder(encoder.save(tmp_path / "m"))
    assert (layout.pooling, layout.normalize, layout.max_length, layout.query_prompt) == (
        Pooling.last_token, True, 24, encoder.settings.query_prompt)
    assert layout.dense_features == (32, 40) and not layout.dense_bias


def st_teacher(tmp_path: Path, *, max_seq_length: int = 24) -> tuple[Path, SentenceTransformer]:
    """A decoder teacher built and saved by sentence-transformers itself (its own current format): last-token
    pooling, a biased linear Dense 32 → 48, Normalize, a query instruction and its own max length."""
    backbone = tiny_encoder("qwen3", seed=3).save(tmp_path / "backbone")
    torch.manual_seed(3)
    modules = [models.Transformer(str(backbone), max_seq_length=max_seq_length),
               models.Pooling(32, pooling_mode="lasttoken"),
               models.Dense(32, 48, bias=True, activation_function=torch.nn.Identity()), models.Normalize()]
    st_model = SentenceTransformer(modules=modules, device="cpu",
                                   prompts={"query": "Instruct: find the ad\nQuery: ", "document": ""})
    st_model.save(str(tmp_path / "teacher"))
    return tmp_path / "teacher", st_model


def test_a_sentence_transformers_teacher_loads_with_its_pooling_dense_prompt_and_length(tmp_path):
    folder, st_model = st_teacher(tmp_path)
    teacher = Encoder.load(folder)
    s = teacher.settings
    assert (s.pooling, s.normalize, s.max_length, s.query_prompt) == (
        Pooling.last_token, True, 24, "Instruct: find the ad\nQuery: ")
    assert (teacher.dim, s.projection_bias) == (48, True)
    assert_same_embeddings(st_model, teacher)


def test_another_dense_over_the_same_backbone_is_another_space(tmp_path):
    folder, _ = st_teacher(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    dense = next(other.glob("*_Dense"))
    weights = bytearray((dense / "model.safetensors").read_bytes())
    weights[-4:] = b"\x00\x00\x80\x3f"  # the last float of the head becomes 1.0
    (dense / "model.safetensors").write_bytes(bytes(weights))
    assert Encoder.load(other).space != Encoder.load(folder).space


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(("file", "changes", "named"), [
    ("1_Pooling/config.json", {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, "pooling"),
    ("2_Dense/config.json", {"activation_function": "torch.nn.modules.activation.Tanh"}, "activation_function"),
    ("config_sentence_transformers.json", {"prompts": {"query": "query: ", "document": "passage: "}},
     "prompts.document"),
])
def test_a_module_chain_hlm_cannot_compute_is_refused_naming_the_file(tmp_path, file, changes, named):
    folder = tiny_encoder("bert", projection_dim=48).save(tmp_path / "m")
    (folder / "hlm_encoder.json").unlink()  # now only the sentence-transformers files describe it
    edit_json(folder / file, **changes)
    with pytest.raises(WeightsError, match=f"{file}.*{named}"):
        Encoder.load(folder)


def fake_hub_cache(root: Path, repo: str, folder: Path, commit: str = "a" * 40) -> Path:
    """The layout `hf download` leaves: models--org--name/{snapshots/<commit>/…, refs/main}."""
    cached = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, cached / "snapshots" / commit)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    return cached / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_an_org_name_reference_loads_offline_from_the_local_hugging_face_cache(tmp_path, hub_cache):
    folder, st_model = st_teacher(tmp_path)
    fake_hub_cache(hub_cache, "acme/tiny-embedding", folder, commit="c" * 40)
    # by name (refs/main) and pinned to a commit
    for ref in ("acme/tiny-embedding", f"acme/tiny-embedding@{'c' * 40}"):
        teacher = Encoder.load(ref)
        assert teacher.settings.source == ref
        assert_same_embeddings(st_model, teacher)
    assert portable("acme/tiny-embedding") == "acme/tiny-embedding"  # each Ray worker reads its own cache


def test_a_reference_missing_from_the_cache_says_how_to_fetch_it(hub_cache):
    with pytest.raises(WeightsError, match=r"never downloads.*hf download acme/absent --revision v2"):
        Encoder.load("acme/absent@v2")


def test_the_worked_decoder_teacher_config_loads_that_teacher_from_the_cache(tmp_path, hub_cache):
    from hlm.config import load_config

    # Given configs/teacher-qwen3.yaml as written and a (tiny) model cached under the name it uses
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "teacher-qwen3.yaml")
    folder, st_model = st_teacher(tmp_path)
    fake_hub_cache(hub_cache, cfg.teacher.model, folder)
    # Then the teacher loads as a decoder teacher, with the config's max length over the folder's
    teacher = Encoder.load(cfg.teacher)
    assert (teacher.settings.pooling, teacher.settings.max_length) == (Pooling.last_token, cfg.teacher.max_length)
    st_model.max_seq_length = cfg.teacher.max_length
    np.testing.assert_allclose(st_model.encode_query(TEXTS), teacher.encode(TEXTS), atol=1e-5)
