"""Losses of the HARNESS-LM recipe (arXiv 2605.23572), as pure functions of embeddings.

Shape vocabulary: ``q_emb (B, d)`` queries, ``pos_emb (B, d)`` their positive ads (row i belongs to
query i), ``neg_emb (B, K, d)`` per-query or ``(M, d)`` shared hard negatives, ``ad_emb (N, d)`` a
fixed ad set, ``scores (B, N)``. A score is a plain dot product: pass L2-normalised embeddings to get
cosine similarity. Every loss returns a scalar; the training step calls the encoders, never a loss.

Contrastive (phases 1 and 4): ``info_nce``, ``qwen3_info_nce``, ``info_nce_with_l2``.
Alignment (phases 2 and 3): ``l2_alignment``, ``cosine_alignment``, ``score_kl``.
Configs choose among them through ``ContrastiveObjective`` / ``AlignmentObjective`` (declared with the
other config choices, `hlm.choices`) and the two dispatchers ``contrastive_loss`` / ``alignment_loss``,
the one table from a choice to its function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hlm.choices import AlignmentObjective, ContrastiveObjective


def _hard_negative_scores(q_emb: Tensor, neg_emb: Tensor) -> Tensor:
    """Scores of each query against its hard negatives: (B, K) from (B, K, d), or (B, M) from (M, d)."""
    if neg_emb.dim() == 3:
        return torch.einsum("bd,bkd->bk", q_emb, neg_emb)  # (B, K)
    if neg_emb.dim() == 2:
        return q_emb @ neg_emb.T  # (B, M)
    raise ValueError(f"neg_emb must be (B, K, d) or (M, d), got shape {tuple(neg_emb.shape)}")


def info_nce(q_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor | None = None, *, temperature: float = 0.05) -> Tensor:
    """InfoNCE with in-batch negatives and optional hard negatives.

    Formula:   L = −mean_i log( exp(s(q_i, d_i⁺)/τ) / Σ_c exp(c/τ) ), with c over the scores
               {s(q_i, d_j⁺) for all j} ∪ {s(q_i, d_ik⁻) for the hard negatives of i}.
    Inputs:    q_emb (B, d); pos_emb (B, d), row i the positive of query i and the other rows its
               in-batch negatives; neg_emb (B, K, d) per query, (M, d) shared by all queries, or None.
    Reduction: mean over the B queries; scalar.
    Relations: ``qwen3_info_nce`` with margin=inf and same_tower=False equals this loss;
               ``info_nce_with_l2`` adds λ·``l2_alignment`` to it.
    Reference: HARNESS-LM (arXiv 2605.23572), the vanilla baseline of the teacher's loss ablation.
    """
    scores = q_emb @ pos_emb.T  # (B, B)
    if neg_emb is not None:
        scores = torch.cat([scores, _hard_negative_scores(q_emb, neg_emb)], dim=1)  # (B, B + K)
    target = torch.arange(len(q_emb), device=q_emb.device)
    return F.cross_entropy(scores / temperature, target)


def qwen3_info_nce(
    q_emb: Tensor,
    pos_emb: Tensor,
    neg_emb: Tensor | None = None,
    *,
    temperature: float = 0.05,
    margin: float = 0.1,
    same_tower: bool = True,
) -> Tensor:
    """The Qwen3-Embedding contrastive loss: InfoNCE with same-tower negatives and a false-negative mask.

    Formula:   L = −mean_i log( exp(s(q_i, d_i⁺)/τ) / Z_i ),
               Z_i = exp(s(q_i, d_i⁺)/τ) + Σ_k m·exp(s(q_i, d_ik⁻)/τ)
                     + Σ_{j≠i} m·[exp(s(q_i, q_j)/τ) + exp(s(d_i⁺, d_j⁺)/τ) + exp(s(q_i, d_j⁺)/τ)],
               m = 0 where that negative's score exceeds s(q_i, d_i⁺) + margin (a likely false
               negative), else 1. Computed in log space: masked terms are −inf in a logsumexp.
    Inputs:    as ``info_nce``; same_tower=False drops the query–query and ad–ad terms.
    Reduction: mean over the B queries; scalar.
    Relations: with margin=inf and same_tower=False it equals ``info_nce``.
    Reference: HARNESS-LM (arXiv 2605.23572), teacher phase and refine phase; it beat ``info_nce``
               in the paper's ablation.
    """
    pos = (q_emb * pos_emb).sum(dim=-1, keepdim=True)  # (B, 1)
    # j = i is the positive itself in s(q_i, d_j⁺), and a self-pair in the same-tower terms.
    off_diagonal = ~torch.eye(len(q_emb), dtype=torch.bool, device=q_emb.device)  # (B, B)
    negatives, keep = [q_emb @ pos_emb.T], [off_diagonal]  # (B, B)
    if same_tower:
        negatives += [q_emb @ q_emb.T, pos_emb @ pos_emb.T]  # 2 × (B, B)
        keep += [off_diagonal, off_diagonal]
    if neg_emb is not None:
        hard = _hard_negative_scores(q_emb, neg_emb)  # (B, K)
        negatives.append(hard)
        keep.append(torch.ones_like(hard, dtype=torch.bool))
    neg = torch.cat(negatives, dim=1)  # (B, C)
    keep_mask = torch.cat(keep, dim=1) & (neg <= pos + margin)  # (B, C)
    neg_logits = (neg / temperature).masked_fill(~keep_mask, float("-inf"))
    logits = torch.cat([pos / temperature, neg_logits], dim=1)  # (B, 1 + C)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def l2_alignment(student: Tensor, teacher: Tensor) -> Tensor:
    """Squared L2 distance between student and teacher embeddings of the same queries.

    Formula:   L = mean_i ‖s_i − t_i‖², the squared distance summed over the d dimensions.
    Inputs:    student, teacher (B, d), both in the teacher's space (after any projection);
               the teacher is a fixed target (detached).
    Reduction: mean over the B queries; scalar.
    Relations: ``cosine_alignment`` equals half of it on unit vectors (‖a − b‖² = 2 − 2cos);
               ``score_kl`` aligns score distributions over ads rather than the vectors.
    Reference: HARNESS-LM (arXiv 2605.23572), align phase: the objective the paper kept.
    """
    return (student - teacher.detach()).pow(2).sum(dim=-1).mean()


def cosine_alignment(student: Tensor, teacher: Tensor) -> Tensor:
    """One minus the cosine between student and teacher embeddings of the same queries.

    Formula:   L = mean_i (1 − cos(s_i, t_i)).
    Inputs:    student, teacher (B, d), both in the teacher's space; the teacher is detached.
    Reduction: mean over the B queries; scalar.
    Relations: equals ``l2_alignment`` / 2 on unit vectors; ignores norms, which ``l2_alignment``
               does not.
    Reference: HARNESS-LM (arXiv 2605.23572), align phase, an alternative to L2.
    """
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def score_kl(student: Tensor, teacher: Tensor, ad_emb: Tensor, *, temperature: float = 0.05) -> Tensor:
    """KL divergence from the teacher's to the student's score distribution over a fixed ad set.

    Formula:   L = mean_i KL(p_T,i ‖ p_S,i), p_X,i = softmax_n(x_i · ad_n / τ).
    Inputs:    student, teacher (B, d) in the teacher's space; ad_emb (N, d), e.g. the teacher's
               frozen ad embeddings. The teacher's distribution is detached.
    Reduction: 'batchmean': summed over the N ads, mean over the B queries; scalar.
    Relations: zero when student == teacher, like ``l2_alignment`` and ``cosine_alignment``, but it
               only sees the vectors through their scores against ad_emb.
    Reference: HARNESS-LM (arXiv 2605.23572), align phase, the KL alternative to L2.
    """
    student_logp = F.log_softmax(student @ ad_emb.T / temperature, dim=-1)  # (B, N)
    teacher_logp = F.log_softmax((teacher @ ad_emb.T).detach() / temperature, dim=-1)  # (B, N)
    return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True)


def info_nce_with_l2(
    q_emb: Tensor,
    pos_emb: Tensor,
    teacher_q_emb: Tensor,
    neg_emb: Tensor | None = None,
    *,
    temperature: float = 0.05,
    l2_weight: float = 0.0,
) -> Tensor:
    """Refine-phase objective: InfoNCE against frozen teacher ads, anchored to the teacher's queries.

    Formula:   L = info_nce(q_emb, pos_emb, neg_emb) + λ·l2_alignment(q_emb, teacher_q_emb), λ = l2_weight.
    Inputs:    as ``info_nce``, plus teacher_q_emb (B, d), the teacher's embeddings of the same queries.
    Reduction: scalar, the sum of two batch means.
    Relations: equals ``info_nce`` at l2_weight=0 (the paper's refine phase); the L2 term keeps the
               student near the space the align phase reached.
    Reference: HARNESS-LM (arXiv 2605.23572), refine phase.
    """
    loss = info_nce(q_emb, pos_emb, neg_emb, temperature=temperature)
    return loss + l2_weight * l2_alignment(q_emb, teacher_q_emb)


def contrastive_loss(
    objective: ContrastiveObjective | str,
    q_emb: Tensor,
    pos_emb: Tensor,
    neg_emb: Tensor | None = None,
    *,
    temperature: float = 0.05,
    margin: float = 0.1,
) -> Tensor:
    """The contrastive loss a config names; ``margin`` is used by ``qwen3`` only.

    Raises ValueError for an unknown objective.
    """
    match ContrastiveObjective(objective):
        case ContrastiveObjective.INFO_NCE:
            return info_nce(q_emb, pos_emb, neg_emb, temperature=temperature)
        case ContrastiveObjective.QWEN3:
            return qwen3_info_nce(q_emb, pos_emb, neg_emb, temperature=temperature, margin=margin)


def alignment_loss(
    objective: AlignmentObjective | str,
    student: Tensor,
    teacher: Tensor,
    ad_emb: Tensor | None = None,
    *,
    temperature: float = 0.05,
) -> Tensor:
    """The alignment loss a config names; ``ad_emb`` and ``temperature`` are used by ``score_kl`` only.

    Raises ValueError for an unknown objective, or for ``score_kl`` without ad_emb.
    """
    match AlignmentObjective(objective):
        case AlignmentObjective.L2:
            return l2_alignment(student, teacher)
        case AlignmentObjective.COSINE:
            return cosine_alignment(student, teacher)
        case AlignmentObjective.SCORE_KL:
            if ad_emb is None:
                raise ValueError(f"alignment objective {AlignmentObjective.SCORE_KL.value!r} needs ad_emb (N, d)")
            return score_kl(student, teacher, ad_emb, temperature=temperature)
