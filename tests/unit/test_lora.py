"""LoRA for the teacher phase on the tiny decoder (the shape of a billion-scale teacher): what trains, what is saved.

Fixture: 48 two-word queries over the tiny vocabulary and ad i = a longer text about query i.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hlm.checkpoint import TRAINER_STATE, load_checkpoint
from hlm.config import ConfigError, LoraSettings, TrainJob, load_config
from hlm.encoder import Encoder
from hlm.lora import add_lora, has_lora, merged
from hlm.tiny import WORDS, tiny_encoder
from hlm.train import train_teacher

QUERIES = [f"{a} {b}" for a, b in itertools.permutations(WORDS, 2)][:48]
ADS = [f"{q} for sale, best {q} deals {i}" for i, q in enumerate(QUERIES)]
LORA = LoraSettings(r=4, alpha=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def teacher_job(**overrides) -> TrainJob:
    return TrainJob(**{"phase": "teacher", "lora": LORA, "lr": 1e-2, "batch_size": 16, "max_steps": 30,
                       "warmup_steps": 2, **overrides})


def test_lora_is_a_teacher_phase_option():
    assert load_config(overrides=["train.phase=teacher", "train.lora.r=8"]).train.lora.r == 8
    with pytest.raises(ConfigError, match="lora"):
        load_config(overrides=["train.phase=align", "train.lora.r=8"])


def test_lora_trains_only_the_adapters_and_lowers_the_teacher_loss():
    # Given the tiny decoder (width 32, 2 layers; q_proj 32 -> 32, v_proj 32 -> 16 with one KV head of 16)
    encoder = tiny_encoder("qwen3", hidden=32, layers=2, seed=0)
    frozen = {name: p.detach().clone() for name, p in encoder.backbone.named_parameters()}
    before = encoder.encode(QUERIES[:4])
    # When adapters of rank 4 go on peft's default targets (q_proj, v_proj)
    add_lora(encoder, LORA)
    # Then only r·(in + out) per adapted matrix trains, and with B = 0 the outputs have not moved
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * 4 * ((32 + 32) + (32 + 16)) == 896
    np.testing.assert_allclose(encoder.encode(QUERIES[:4]), before, atol=1e-6)
    # When the teacher phase trains it
    result = train_teacher(encoder, QUERIES, ADS, teacher_job())
    # Then the loss goes down and the base weights stay as they were
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    base = encoder.backbone.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(p, frozen[name.replace(".base_layer", "")], rtol=0, atol=0)


def test_a_lora_checkpoint_is_the_plain_merged_model_and_resumes_the_run(tmp_path):
    # Given a LoRA teacher run of 4 steps that checkpoints every 2
    job = teacher_job(max_steps=4, checkpoint_every=2)
    hard = [[ADS[(i + 1) % len(ADS)]] for i in range(len(ADS))]
    full = train_teacher(tiny_encoder("qwen3", seed=0), QUERIES, ADS, job, hard_negative_texts=hard,
                         on_step=lambda step, m, save: m["checkpoint_due"] and save(tmp_path / f"step-{step:07d}"))
    plain = merged(full.encoder)
    assert has_lora(full.encoder) and not has_lora(plain)
    # Then the final checkpoint loads with Encoder.load as a plain HF model that encodes as the merged model does
    folder = tmp_path / "step-0000004"
    assert {p.name for p in folder.iterdir() if "adapter" in p.name} == set()
    loaded = Encoder.load(folder)
    assert type(loaded.backbone) is type(plain.backbone) and loaded.settings.extra["lora"]["r"] == 4
    np.testing.assert_allclose(loaded.encode(QUERIES), plain.encode(QUERIES), atol=1e-5)
    np.testing.assert_allclose(loaded.encode(ADS[:8], kind="ad"), plain.encode(ADS[:8], kind="ad"), atol=1e-5)
    # and a run resumed from step 2 gets its adapter back and lands where the uninterrupted run did
    encoder, optimizer_state, step = load_checkpoint(tmp_path / "step-0000002")
    assert has_lora(encoder) and step == 2
    resumed = train_teacher(encoder, QUERIES, ADS, job, hard_negative_texts=hard, start_step=step,
                            optimizer_state=optimizer_state)
    np.testing.assert_allclose(merged(resumed.encoder).encode(QUERIES), plain.encode(QUERIES), atol=1e-5)
    assert (folder / TRAINER_STATE).exists()  # what pipelines.train deletes to export the plain model
