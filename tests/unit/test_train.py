"""Training phases on tiny random models: schedule by hand, each phase moves its loss, widths, resume.

Fixture: 48 two-word queries over the tiny vocabulary, ad i = a longer text about query i, a wider teacher
(48-d, seed 1) whose query and ad embeddings are computed once (the student loops never call it) and a
32-d student (seed 0).
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from hlm.checkpoint import load_checkpoint
from hlm.config import ConfigError, LoraSettings, TrainJob, load_config
from hlm.encoder import Encoder
from hlm.losses import AlignmentObjective, ContrastiveObjective, info_nce
from hlm.schedule import lr_at
from hlm.space import truncated_space
from hlm.tiny import WORDS, tiny_encoder
from hlm.train import prepare_student, train_align, train_refine, train_teacher

QUERIES = [f"{a} {b}" for a, b in itertools.permutations(WORDS, 2)][:48]
ADS = [f"{q} for sale, best {q} deals {i}" for i, q in enumerate(QUERIES)]
POSITIVE = np.arange(len(QUERIES))  # ad i is the positive of query i
STUDENT_DIM, TEACHER_DIM = 32, 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher() -> dict:
    encoder = tiny_encoder("bert", hidden=TEACHER_DIM, seed=1)
    return {"space": encoder.space, "q_emb": encoder.encode(QUERIES), "ad_emb": encoder.encode(ADS, kind="ad")}


def cfg(**overrides) -> TrainJob:
    return TrainJob(**{"lr": 3e-3, "batch_size": 16, "max_steps": 40, "warmup_steps": 4, **overrides})


def mean_l2(student: Encoder, target: np.ndarray) -> float:
    return float(((student.encode(QUERIES) - target) ** 2).sum(axis=1).mean())


def corpus_info_nce(student: Encoder, ad_emb: np.ndarray) -> float:
    """InfoNCE of all queries at once: every other ad is a negative."""
    q, ads = torch.from_numpy(student.encode(QUERIES)), torch.from_numpy(ad_emb[POSITIVE])
    return info_nce(q, ads, temperature=0.05).item()


# ---------------------------------------------------------------------------------------------- config, schedule


def test_config_choices_are_the_loss_enums_and_prune_schedule_must_decrease():
    fields = TrainJob.model_fields
    assert fields["objective"].annotation is AlignmentObjective
    assert fields["contrastive"].annotation is ContrastiveObjective
    assert load_config(overrides=["train.objective=cosine"]).train.objective is AlignmentObjective.COSINE
    with pytest.raises(ConfigError, match="train.objective"):
        load_config(overrides=["train.objective=mse"])
    assert load_config(overrides=["train.prune_schedule=[4, 3, 2]"]).train.prune_schedule == [4, 3, 2]
    with pytest.raises(ConfigError, match="train.prune_schedule"):
        load_config(overrides=["train.prune_schedule=[2, 3]"])


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    # lr 1, min 0.1, 4 warmup steps, 14 steps: decay over steps 4..14
    c = TrainJob(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert [lr_at(s, c, 14) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # lr·(s+1)/(warmup+1)
    assert lr_at(4, c, 14) == pytest.approx(1.0)
    assert lr_at(6, c, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi)))  # 0.91406
    assert lr_at(9, c, 14) == pytest.approx(0.55)  # halfway: cos(π/2) = 0
    assert lr_at(14, c, 14) == lr_at(99, c, 14) == pytest.approx(0.1)
    assert lr_at(6, c.model_copy(update={"schedule": "linear"}), 14) == pytest.approx(1.0 - 0.2 * 0.9)
    assert lr_at(13, c.model_copy(update={"schedule": "constant"}), 14) == 1.0


# ---------------------------------------------------------------------------------------------- align


def test_align_with_l2_more_than_halves_the_distance_to_the_teacher(teacher):
    # Given a student with its own random space and same-width teacher targets
    student = tiny_encoder("bert", hidden=STUDENT_DIM, seed=0)
    target = tiny_encoder("bert", hidden=STUDENT_DIM, seed=1).encode(QUERIES)
    before = mean_l2(student, target)
    # When it aligns for 40 steps
    result = train_align(student, QUERIES, target, cfg(objective="l2"))
    # Then the L2 loss drops to well under half, on the training loss and on clean (no-dropout) embeddings
    assert result.step == 40 and len(result.losses) == 40
    assert np.mean(result.losses[-5:]) < 0.5 * np.mean(result.losses[:5])
    assert mean_l2(result.encoder, target) < 0.5 * before


def test_projection_head_is_added_when_widths_differ_and_the_saved_student_is_in_the_teacher_space(teacher, tmp_path):
    student = tiny_encoder("bert", hidden=STUDENT_DIM, seed=0)
    result = train_align(student, QUERIES, teacher["q_emb"], cfg(max_steps=10), teacher_space=teacher["space"])
    aligned = result.encoder
    assert aligned.projection is not None and aligned.dim == TEACHER_DIM
    loaded = Encoder.load(aligned.save(tmp_path / "student"))
    assert loaded.space == teacher["space"] and loaded.encode(QUERIES[:3]).shape == (3, TEACHER_DIM)
    np.testing.assert_allclose(loaded.encode(QUERIES[:3]), aligned.encode(QUERIES[:3]), atol=1e-5)


def test_truncate_mode_keeps_the_student_width_and_aligns_to_the_truncated_teacher(teacher):
    student = tiny_encoder("bert", hidden=STUDENT_DIM, seed=0)
    cut = teacher["q_emb"][:, :STUDENT_DIM] / np.linalg.norm(teacher["q_emb"][:, :STUDENT_DIM], axis=1, keepdims=True)
    before = mean_l2(student, cut)
    result = train_align(student, QUERIES, teacher["q_emb"], cfg(width="truncate"), teacher_space=teacher["space"])
    aligned = result.encoder
    assert aligned.projection is None and aligned.encode(QUERIES[:2]).shape == (2, STUDENT_DIM)
    assert aligned.space == truncated_space(teacher["space"], STUDENT_DIM) != teacher["space"]
    assert mean_l2(aligned, cut) < 0.5 * before


def test_a_student_wider_than_the_teacher_is_refused_in_truncate_mode():
    with pytest.raises(ValueError, match="wider"):
        prepare_student(tiny_encoder("bert", hidden=STUDENT_DIM), 16, "truncate")


# ---------------------------------------------------------------------------------------------- refine


def test_refine_reduces_info_nce_and_never_writes_the_frozen_ad_embeddings(teacher):
    ad_emb = teacher["ad_emb"]
    frozen = ad_emb.copy()
    student = prepare_student(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), TEACHER_DIM, "projection")
    before = corpus_info_nce(student, ad_emb)
    hard = (POSITIVE[:, None] + np.array([[1, 2]])) % len(ADS)  # (n, K=2) stand-ins for mined negatives
    result = train_refine(student, QUERIES, POSITIVE, ad_emb, cfg(lr=1e-2), hard_negative_idx=hard)
    assert corpus_info_nce(result.encoder, ad_emb) < 0.7 * before
    np.testing.assert_array_equal(ad_emb, frozen)


def test_refine_with_l2_weight_stays_closer_to_the_teacher_queries(teacher):
    start = train_align(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), QUERIES, teacher["q_emb"], cfg()).encoder
    distances = {}
    for weight in (0.0, 5.0):
        result = train_refine(copy.deepcopy(start), QUERIES, POSITIVE, teacher["ad_emb"],
                              cfg(lr=1e-2, l2_weight=weight), teacher_q_emb=teacher["q_emb"])
        distances[weight] = mean_l2(result.encoder, teacher["q_emb"])
    assert distances[5.0] < 0.7 * distances[0.0]


def test_refine_with_l2_weight_reports_its_two_weighted_terms_which_sum_to_the_loss(teacher):
    seen = []
    student = prepare_student(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), TEACHER_DIM, "projection")
    train_refine(student, QUERIES, POSITIVE, teacher["ad_emb"], cfg(max_steps=3, l2_weight=0.5),
                 teacher_q_emb=teacher["q_emb"], on_step=lambda step, m, save: seen.append(m))
    assert [set(m["parts"]) for m in seen] == [{"contrastive", "l2"}] * 3
    assert all(m["loss"] == pytest.approx(sum(m["parts"].values()), rel=1e-6) for m in seen)
    # and a one-term loss reports no terms
    train_refine(student, QUERIES, POSITIVE, teacher["ad_emb"], cfg(max_steps=1),
                 on_step=lambda step, m, save: seen.append(m))
    assert seen[-1]["parts"] == {}


# ---------------------------------------------------------------------------------------------- teacher


def test_teacher_phase_trains_one_shared_encoder_for_queries_and_ads():
    encoder = tiny_encoder("qwen3", hidden=32, seed=0)  # the decoder family: last-token pooling, query prompt

    def loss() -> float:
        q, ads = encoder.encode(QUERIES), encoder.encode(ADS, kind="ad")
        return info_nce(torch.from_numpy(q), torch.from_numpy(ads), temperature=0.05).item()

    before = loss()
    hard = [[ADS[(i + 1) % len(ADS)]] for i in range(len(ADS))]
    result = train_teacher(encoder, QUERIES, ADS, cfg(contrastive="qwen3"), hard_negative_texts=hard)
    assert result.encoder is encoder  # the same weights encoded both sides
    assert loss() < 0.7 * before


# ---------------------------------------------------------------------------------------------- memory options


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses_and_weights(lora):
    # Given the same teacher run twice (dropout on: the recompute must replay its noise), once recomputing activations
    job = cfg(phase="teacher", lora=lora, max_steps=3, contrastive="qwen3")
    runs = {}
    for checkpointing in (False, True):
        encoder = tiny_encoder("bert", hidden=32, seed=0)
        result = train_teacher(encoder, QUERIES, ADS, job.model_copy(update={"gradient_checkpointing": checkpointing}))
        runs[checkpointing] = (result.losses, dict(result.encoder.named_parameters()))
        assert result.encoder.backbone.is_gradient_checkpointing == checkpointing
    # Then every step's loss and the updated weights match
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for name, p in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], p, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_computes_in_bf16_over_fp32_weights(teacher):
    losses = {}
    for precision in ("off", "auto", "bf16"):  # auto is off on CPU
        result = train_align(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), QUERIES, teacher["q_emb"],
                             cfg(max_steps=3, mixed_precision=precision))
        losses[precision] = result.losses
        assert all(p.dtype == torch.float32 for p in result.encoder.parameters())
        assert all(v.dtype == torch.float32 for s in result.optimizer_state["state"].values() for v in s.values()
                   if v.dim() > 0)
    assert losses["auto"] == losses["off"]
    assert losses["bf16"] != losses["off"]  # bf16 rounding shows, and only that
    np.testing.assert_allclose(losses["bf16"], losses["off"], rtol=0.05)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resume_from_a_checkpoint_replays_the_uninterrupted_run(teacher, tmp_path):
    # Given an uninterrupted 8-step run that checkpoints every 4 steps
    c = cfg(max_steps=8, checkpoint_every=4)
    written = []

    def checkpoint(step: int, metrics: dict, save) -> None:
        if metrics["checkpoint_due"]:
            written.append(save(tmp_path / f"step-{step:07d}").name)

    full = train_align(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), QUERIES, teacher["q_emb"], c,
                       teacher_space=teacher["space"], on_step=checkpoint)
    assert written == ["step-0000004", "step-0000008"]
    assert load_checkpoint(tmp_path / "step-0000008")[2] == 8
    torch.testing.assert_close(load_checkpoint(tmp_path / "step-0000008")[1], full.optimizer_state, rtol=0, atol=0)
    # When we load step 4 and resume
    encoder, optimizer_state, step = load_checkpoint(tmp_path / "step-0000004")
    assert step == 4 and encoder.space == teacher["space"]
    seen = []
    resumed = train_align(encoder, QUERIES, teacher["q_emb"], c, start_step=step, optimizer_state=optimizer_state,
                          teacher_space=teacher["space"], on_step=lambda s, *_: seen.append(s))
    # Then it runs steps 5..8 only and lands where the uninterrupted run did
    assert seen == [5, 6, 7, 8] and resumed.step == 8
    np.testing.assert_allclose(resumed.encoder.encode(QUERIES), full.encoder.encode(QUERIES), atol=1e-5)
