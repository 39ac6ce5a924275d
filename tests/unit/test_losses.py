"""hlm.losses pinned against values worked out by hand on 2×3 tensors.

Fixture: q = [e1, e2] and the positives d1 = (.8, .6, 0), d2 = (0, .6, .8), so the score matrix
s(q_i, d_j) = [[.8, 0], [.6, .6]], and with τ = 0.1 the logits are [[8, 0], [6, 6]].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hlm.losses import (
    AlignmentObjective,
    ContrastiveObjective,
    alignment_loss,
    contrastive_loss,
    cosine_alignment,
    info_nce,
    info_nce_with_l2,
    l2_alignment,
    qwen3_info_nce,
    score_kl,
)

TAU = 0.1


def tensor(rows: list) -> torch.Tensor:
    # float64 so the comparison with the hand values is limited by the maths, not by rounding.
    return torch.tensor(rows, dtype=torch.float64)


def nll(logits: list[float], target: int) -> float:
    """−log softmax(logits)[target], written out."""
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


Q = tensor([[1, 0, 0], [0, 1, 0]])
POS = tensor([[0.8, 0.6, 0], [0, 0.6, 0.8]])
# Per-query hard negatives: s(q1, n1) = .6, s(q2, n2) = .8 (above s(q2, d2) + 0.1 = .7).
NEG_PER_QUERY = tensor([[[0.6, 0.8, 0]], [[0, 0.8, 0.6]]])
# Shared hard negatives: s(q1, ·) = [0, .6], s(q2, ·) = [0, .8].
NEG_SHARED = tensor([[0, 0, 1], [0.6, 0.8, 0]])

INFO_NCE_NO_NEG = (nll([8, 0], 0) + nll([6, 6], 1)) / 2
INFO_NCE_PER_QUERY = (nll([8, 0, 6], 0) + nll([6, 6, 8], 1)) / 2
INFO_NCE_SHARED = (nll([8, 0, 0, 6], 0) + nll([6, 6, 0, 8], 1)) / 2


def test_info_nce_is_cross_entropy_over_in_batch_positives():
    # Given the fixture's logits [[8, 0], [6, 6]], targets on the diagonal
    # When
    loss = info_nce(Q, POS, temperature=TAU)
    # Then
    assert loss.item() == pytest.approx(INFO_NCE_NO_NEG, rel=1e-9)
    assert INFO_NCE_NO_NEG == pytest.approx((math.log(1 + math.exp(-8)) + math.log(2)) / 2)


def test_info_nce_adds_per_query_hard_negatives_to_their_own_row_only():
    # Given one hard negative per query, (B, K, d) = (2, 1, 3)
    # When
    loss = info_nce(Q, POS, NEG_PER_QUERY, temperature=TAU)
    # Then row 1 gains logit 6 and row 2 gains logit 8
    assert loss.item() == pytest.approx(INFO_NCE_PER_QUERY, rel=1e-9)


def test_info_nce_scores_shared_hard_negatives_against_every_query():
    # Given two hard negatives shared by both queries, (M, d) = (2, 3)
    # When
    shared = info_nce(Q, POS, NEG_SHARED, temperature=TAU)
    per_query = info_nce(Q, POS, NEG_SHARED.expand(2, 2, 3), temperature=TAU)
    # Then both rows gain both negatives, the same as giving each query its own copy
    assert shared.item() == pytest.approx(INFO_NCE_SHARED, rel=1e-9)
    assert per_query.item() == pytest.approx(INFO_NCE_SHARED, rel=1e-9)


def test_info_nce_rejects_hard_negatives_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"\(B, K, d\) or \(M, d\)"):
        info_nce(Q, POS, torch.zeros(3, dtype=torch.float64), temperature=TAU)


@pytest.mark.parametrize(
    ("neg", "expected"),
    [(None, INFO_NCE_NO_NEG), (NEG_PER_QUERY, INFO_NCE_PER_QUERY), (NEG_SHARED, INFO_NCE_SHARED)],
    ids=["no-hard-negatives", "per-query", "shared"],
)
def test_qwen3_without_mask_or_same_tower_terms_is_info_nce(neg, expected):
    # Given an infinite margin (nothing masked) and no query–query or ad–ad terms
    # When
    loss = qwen3_info_nce(Q, POS, neg, temperature=TAU, margin=math.inf, same_tower=False)
    # Then it is the hand InfoNCE value, and info_nce agrees
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert loss.item() == pytest.approx(info_nce(Q, POS, neg, temperature=TAU).item(), rel=1e-9)


def test_qwen3_adds_query_query_and_ad_ad_negatives_to_the_denominator():
    # Given s(q1, q2) = 0 and s(d1, d2) = .36, so the same-tower logits are 0 and 3.6 in both rows
    # When
    loss = qwen3_info_nce(Q, POS, temperature=TAU, margin=math.inf)
    # Then Z_i gains exp(0) + exp(3.6) next to the in-batch ad
    expected = (nll([8, 0, 0, 3.6], 0) + nll([6, 6, 0, 3.6], 0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_qwen3_mask_drops_a_negative_scoring_above_positive_plus_margin():
    # Given query 2's hard negative scores .8 > s(q2, d2) + margin = .6 + .1; query 1's scores .6 < .9
    # When
    masked = qwen3_info_nce(Q, POS, NEG_PER_QUERY, temperature=TAU, margin=0.1, same_tower=False)
    unmasked = qwen3_info_nce(Q, POS, NEG_PER_QUERY, temperature=TAU, margin=math.inf, same_tower=False)
    # Then only query 2's hard negative leaves its denominator
    assert masked.item() == pytest.approx((nll([8, 0, 6], 0) + nll([6, 6], 0)) / 2, rel=1e-9)
    assert unmasked.item() == pytest.approx((nll([8, 0, 6], 0) + nll([6, 6, 8], 0)) / 2, rel=1e-9)
    assert masked.item() < unmasked.item()


def test_qwen3_mask_keeps_a_negative_within_the_margin():
    # Given the same negative (.8) and a wider margin, .6 + .3 = .9
    # When
    loss = qwen3_info_nce(Q, POS, NEG_PER_QUERY, temperature=TAU, margin=0.3, same_tower=False)
    # Then nothing is masked
    assert loss.item() == pytest.approx(INFO_NCE_PER_QUERY, rel=1e-9)


def test_l2_alignment_is_mean_squared_distance_summed_over_dims():
    # Given squared distances 0 + 4 + 0 = 4 and 1 + 1 + 1 = 3
    student = tensor([[1, 2, 3], [0, 0, 0]])
    teacher = tensor([[1, 0, 3], [1, 1, 1]])
    # When
    loss = l2_alignment(student, teacher)
    # Then it is summed over d and averaged over B: (4 + 3) / 2
    assert loss.item() == pytest.approx(3.5)


def test_cosine_alignment_is_mean_of_one_minus_cosine():
    # Given cosines 0 (orthogonal) and 1/√2 (45°), with non-unit norms
    student = tensor([[2, 0, 0], [1, 1, 0]])
    teacher = tensor([[0, 3, 0], [5, 0, 0]])
    # When
    loss = cosine_alignment(student, teacher)
    # Then
    assert loss.item() == pytest.approx(((1 - 0) + (1 - 1 / math.sqrt(2))) / 2)


def test_cosine_alignment_is_half_l2_alignment_on_unit_vectors():
    # Given unit vectors, where ‖a − b‖² = 2 − 2cos(a, b)
    generator = torch.Generator().manual_seed(0)
    student = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    teacher = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    # When / Then
    assert cosine_alignment(student, teacher).item() == pytest.approx(l2_alignment(student, teacher).item() / 2)


AD_EMB = torch.eye(3, dtype=torch.float64)  # scores against it are the embeddings themselves


def test_score_kl_is_zero_when_student_equals_teacher():
    # Given identical student and teacher embeddings
    emb = tensor([[0.3, -1.0, 2.0], [1.0, 0.5, 0.0]])
    # When
    loss = score_kl(emb, emb.clone(), AD_EMB, temperature=1.0)
    # Then
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_score_kl_is_teacher_to_student_kl_averaged_over_the_batch():
    # Given τ = 1; query 1: p_T = softmax(1, 0, 0), p_S uniform; query 2: identical distributions
    student = tensor([[0, 0, 0], [1, 0, 0]])
    teacher = tensor([[1, 0, 0], [1, 0, 0]])
    # When
    loss = score_kl(student, teacher, AD_EMB, temperature=1.0)
    # Then KL(p_T ‖ p_S) = Σ p_T log(p_T / p_S), summed over ads and divided by B = 2
    z = math.e + 2
    p_teacher = [math.e / z, 1 / z, 1 / z]
    kl_query_1 = sum(p * math.log(p / (1 / 3)) for p in p_teacher)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(kl_query_1 / 2, rel=1e-9)


def test_score_kl_sends_gradients_to_the_student_only():
    # Given student and teacher that both require gradients
    student = tensor([[0, 0, 0], [1, 0, 0]]).requires_grad_()
    teacher = tensor([[1, 0, 0], [0, 1, 0]]).requires_grad_()
    # When
    score_kl(student, teacher, AD_EMB, temperature=1.0).backward()
    # Then
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_info_nce_with_l2_adds_weighted_l2_to_info_nce():
    # Given teacher queries at squared distances 0 and 2 from the student's, so l2_alignment = 1
    teacher_q = tensor([[1, 0, 0], [0, 0, 1]])
    # When
    anchored = info_nce_with_l2(Q, POS, teacher_q, temperature=TAU, l2_weight=0.5)
    plain = info_nce_with_l2(Q, POS, teacher_q, temperature=TAU)
    # Then
    assert anchored.item() == pytest.approx(INFO_NCE_NO_NEG + 0.5 * 1.0, rel=1e-9)
    assert plain.item() == pytest.approx(INFO_NCE_NO_NEG, rel=1e-9)


@pytest.mark.parametrize(
    ("objective", "expected"),
    [("l2", 2.0), (AlignmentObjective.COSINE, 1.0), ("score_kl", (math.e - 1) / (math.e + 2))],
)
def test_alignment_loss_dispatches_by_name_or_enum(objective, expected):
    # Given orthogonal unit rows: squared distance 2 and cosine 0 in both; with τ = 1 and eye(3) ads
    # each query's KL(softmax(e_t) ‖ softmax(e_s)) = (e/z)·1 + (1/z)·(−1) = (e − 1)/z, z = e + 2
    student = tensor([[1, 0, 0], [0, 1, 0]])
    teacher = tensor([[0, 1, 0], [0, 0, 1]])
    # When
    loss = alignment_loss(objective, student, teacher, AD_EMB, temperature=1.0)
    # Then
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_alignment_loss_score_kl_without_ad_emb_names_the_objective():
    with pytest.raises(ValueError, match="score_kl"):
        alignment_loss(AlignmentObjective.SCORE_KL, Q, POS)


@pytest.mark.parametrize("dispatch", [alignment_loss, contrastive_loss])
def test_dispatch_rejects_an_unknown_objective_by_name(dispatch):
    with pytest.raises(ValueError, match="mse"):
        dispatch("mse", Q, POS)


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        (ContrastiveObjective.INFO_NCE, INFO_NCE_PER_QUERY),
        ("qwen3", (nll([8, 0, 0, 3.6, 6], 0) + nll([6, 6, 0, 3.6], 0)) / 2),
    ],
)
def test_contrastive_loss_dispatches_by_name_or_enum(objective, expected):
    # Given the per-query hard negatives; for qwen3 the default margin .1 masks query 2's (.8 > .7)
    # When
    loss = contrastive_loss(objective, Q, POS, NEG_PER_QUERY, temperature=TAU)
    # Then
    assert loss.item() == pytest.approx(expected, rel=1e-9)
