"""The training phases of the HARNESS-LM recipe as plain functions that a Ray Train worker calls.

`train_teacher` (phase 1) fine-tunes a symmetric dual encoder; `train_align` (phase 2) pulls a student query
encoder onto precomputed teacher query embeddings; `train_refine` (phase 4) trains the student contrastively
against frozen teacher ad embeddings. Phase 3 (pruning) is in `hlm.pruning`. The student never calls the
teacher: its targets are arrays read from the embeddings Parquet that `pipelines.embed` wrote.

Each phase builds its data and a `step_loss(encode, idx) -> scalar` (or named terms that sum to it, which `fit`
reports one by one) and hands both to `fit`, the one loop they share (optimiser, schedule, logging, checkpoints,
devices). `fit` owns how texts become embeddings: `encode`
runs the encoder's forward under bf16 autocast when asked, and through DistributedDataParallel when a process
group of several ranks is up (`hlm.distributed`), so DDP sees every forward pass. Batch order and dropout are
functions of (seed, step), so a run resumed from a checkpoint replays exactly the steps the uninterrupted run
would have taken. Checkpoints are `hlm.checkpoint`'s; phase 1 can train LoRA adapters (`hlm.lora`).

Shapes: `q_emb (B, d)`, `ad_emb (N, d)`, hard negatives `(B, K, d)`, `scores (B, N)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from hlm.checkpoint import save_checkpoint
from hlm.config import TrainJob, Width
from hlm.distributed import data_parallel, global_batch
from hlm.encoder import Encoder, Kind
from hlm.lora import add_lora
from hlm.losses import alignment_loss, contrastive_loss, l2_alignment
from hlm.projection import fit_head
from hlm.schedule import batch_indices, lr_at, make_optimizer, total_steps
from hlm.space import space_at_width, truncate

logger = logging.getLogger(__name__)

Save = Callable[[str | Path], Path]  # (folder) -> folder: `hlm.checkpoint.save_checkpoint` of the step just done
OnStep = Callable[[int, dict[str, Any], Save], None]  # (step done, metrics with "checkpoint_due", save)
Encode = Callable[[list[str], Kind], Tensor]  # (texts, kind) -> float32 (n, d), with gradients
StepLoss = Callable[[Encode, np.ndarray], Tensor | dict[str, Tensor]]  # (encode, batch rows) -> scalar or terms


@dataclass
class TrainResult:
    encoder: Encoder  # the model that trained (a student may have gained a projection head: use this one)
    step: int  # optimizer steps done, counting those before a resume
    losses: list[float]  # one per step of this call
    optimizer_state: dict
    samples_per_s: float = 0.0


# ---------------------------------------------------------------------------------------------- width


def prepare_student(student: Encoder, teacher_dim: int, width: Width, *, teacher_space: str | None = None,
                    fit: tuple[list[str], np.ndarray] | None = None, seed: int = 0) -> Encoder:
    """Make the student meet a `teacher_dim`-wide teacher and record the space it is aligned to.

    projection: a student of another width gets a fresh linear head into teacher_dim; it shares the backbone
    with `student`. With `fit=(queries, teacher_q_emb (n, D))` the head starts as the least-squares map onto
    those targets (`hlm.projection`), else as an orthogonal isometry of the student's own space.
    truncate: the student keeps its width d ≤ teacher_dim; its targets are the teacher's first d dims,
    renormalised, and its space is `hlm.space.truncated_space(teacher_space, d)`.
    """
    if width == "projection" and student.dim != teacher_dim:
        student = Encoder(student.backbone, student.tokenizer, replace(student.settings, projection_dim=teacher_dim))
        weight = torch.empty_like(student.projection.weight, dtype=torch.float32)
        student.projection.weight.data.copy_(nn.init.orthogonal_(weight))
        logger.info("student gets a projection head %d -> %d", student.backbone.config.hidden_size, teacher_dim)
        if fit is not None:
            fit_head(student, *fit, seed=seed)
    if student.dim > teacher_dim:
        raise ValueError(f"student width {student.dim} is wider than the teacher's {teacher_dim} (width={width})")
    if teacher_space is not None:
        student.settings.target_space = space_at_width(teacher_space, teacher_dim, student.dim)
    return student


def prepare_aligning_student(student: Encoder, queries: list[str], teacher_q_emb: np.ndarray, cfg: TrainJob, *,
                             teacher_space: str | None = None) -> Encoder:
    """`prepare_student` for the phases that align to teacher_q_emb (n, D): a fresh head starts at the least-squares
    map onto those targets when cfg.projection_init says so."""
    targets = (queries, teacher_q_emb) if cfg.projection_init == "least_squares" else None
    return prepare_student(student, teacher_q_emb.shape[1], cfg.width, teacher_space=teacher_space, fit=targets,
                           seed=cfg.seed)


def _rows(emb: np.ndarray, idx: np.ndarray, dim: int, device: torch.device) -> Tensor:
    """emb[idx] as float32 on `device`, cut to `dim` and renormalised when wider (truncate mode): (*idx.shape, dim)."""
    rows = np.asarray(emb[idx], dtype=np.float32)  # (*idx.shape, D), a copy of those rows only
    return torch.from_numpy(truncate(rows, dim)).to(device)  # (*idx.shape, dim)


# ---------------------------------------------------------------------------------------------- phases


def train_align(student: Encoder, queries: list[str], teacher_q_emb: np.ndarray, cfg: TrainJob, *,
                ad_emb: np.ndarray | None = None, teacher_space: str | None = None,
                on_step: OnStep | None = None, start_step: int = 0,
                optimizer_state: dict | None = None) -> TrainResult:
    """Phase 2: `cfg.objective` (L2 by default) between the student's and the teacher's query embeddings.

    teacher_q_emb (n, D) row i is the teacher's embedding of queries[i]; ad_emb (N, D) is needed by score_kl only.
    """
    # 1. build: a projection head or truncated targets when the widths differ
    if len(queries) != len(teacher_q_emb):
        raise ValueError(f"{len(queries)} queries but {len(teacher_q_emb)} teacher embeddings")
    student = prepare_aligning_student(student, queries, teacher_q_emb, cfg, teacher_space=teacher_space)
    d = student.dim
    # 2. data: teacher rows are gathered per batch; a score_kl ad set sits on the device whole
    ads = None if ad_emb is None else _rows(ad_emb, np.arange(len(ad_emb)), d, student.device)  # (N, d)

    def step_loss(encode: Encode, idx: np.ndarray) -> Tensor:
        q_emb = encode([queries[i] for i in idx], "query")  # (B, d)
        t_emb = _rows(teacher_q_emb, idx, d, student.device)  # (B, d)
        return alignment_loss(cfg.objective, q_emb, t_emb, ads, temperature=cfg.temperature)

    # 3-5. optimiser, loop, save
    return fit(student, len(queries), step_loss, cfg, on_step=on_step, start_step=start_step,
               optimizer_state=optimizer_state)


def train_refine(student: Encoder, queries: list[str], positive_ad_idx: np.ndarray, ad_emb: np.ndarray,
                 cfg: TrainJob, *, hard_negative_idx: np.ndarray | None = None,
                 teacher_q_emb: np.ndarray | None = None, teacher_space: str | None = None,
                 on_step: OnStep | None = None, start_step: int = 0,
                 optimizer_state: dict | None = None) -> TrainResult:
    """Phase 4: `cfg.contrastive` against frozen teacher ad vectors (+ λ·L2 to teacher queries if l2_weight > 0).

    positive_ad_idx (n,): row of ad_emb (N, D) clicked for queries[i]; the other pairs' positives are the
    in-batch negatives. hard_negative_idx (n, K): rows of ad_emb mined from the teacher index. Only the
    student trains; ad_emb is read, never written, and no ad encoder runs.
    """
    # 1. build
    student = prepare_student(student, ad_emb.shape[1], cfg.width, teacher_space=teacher_space)
    d = student.dim
    # 2. data
    pos = np.asarray(positive_ad_idx)
    hard = None if hard_negative_idx is None else np.asarray(hard_negative_idx)
    if len(pos) != len(queries) or (hard is not None and (hard.ndim != 2 or len(hard) != len(queries))):
        raise ValueError(f"{len(queries)} queries need positive_ad_idx ({len(queries)},) and "
                         f"hard_negative_idx ({len(queries)}, K); got {pos.shape} and {getattr(hard, 'shape', None)}")
    if cfg.l2_weight > 0 and (teacher_q_emb is None or len(teacher_q_emb) != len(queries)):
        raise ValueError("l2_weight > 0 needs teacher_q_emb with one row per query")

    def step_loss(encode: Encode, idx: np.ndarray) -> Tensor:
        q_emb = encode([queries[i] for i in idx], "query")  # (B, d)
        pos_emb = _rows(ad_emb, pos[idx], d, student.device)  # (B, d)
        neg_emb = None if hard is None else _rows(ad_emb, hard[idx], d, student.device)  # (B, K, d)
        target = _rows(teacher_q_emb, idx, d, student.device) if cfg.l2_weight > 0 else None  # (B, d)
        q_emb, pos_emb, neg_emb, target = global_batch(q_emb, pos_emb, neg_emb, target)  # (world·B, …)
        loss = contrastive_loss(cfg.contrastive, q_emb, pos_emb, neg_emb, temperature=cfg.temperature,
                                margin=cfg.margin)
        return loss if target is None else {"contrastive": loss, "l2": cfg.l2_weight * l2_alignment(q_emb, target)}

    # 3-5. optimiser, loop, save
    return fit(student, len(queries), step_loss, cfg, on_step=on_step, start_step=start_step,
               optimizer_state=optimizer_state)


def train_teacher(encoder: Encoder, queries: list[str], ads_text_pos: list[str], cfg: TrainJob, *,
                  hard_negative_texts: list[list[str]] | None = None, on_step: OnStep | None = None,
                  start_step: int = 0,
                  optimizer_state: dict | None = None) -> TrainResult:
    """Phase 1: a symmetric dual encoder — one set of weights encodes queries (kind="query") and ads (kind="ad").

    ads_text_pos[i] is the positive ad of queries[i]; hard_negative_texts[i] holds K ad texts (same K for all).
    With cfg.lora the encoder's backbone gains adapters in place and only they train (`hlm.lora`).
    """
    # 1. build: adapters if asked; the encoder defines its own space (saving recomputes its weights hash)
    if cfg.lora is not None:
        add_lora(encoder, cfg.lora)
    # 2. data
    if len(ads_text_pos) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(ads_text_pos)} positive ads")
    if hard_negative_texts is not None and (len(hard_negative_texts) != len(queries)
                                            or len({len(h) for h in hard_negative_texts}) != 1):
        raise ValueError("hard_negative_texts needs one list per query, all of the same length K")

    def step_loss(encode: Encode, idx: np.ndarray) -> Tensor:
        q_emb = encode([queries[i] for i in idx], "query")  # (B, d)
        pos_emb = encode([ads_text_pos[i] for i in idx], "ad")  # (B, d)
        neg_emb = None
        if hard_negative_texts is not None:
            flat = [t for i in idx for t in hard_negative_texts[i]]
            neg_emb = encode(flat, "ad").view(len(idx), -1, q_emb.shape[1])  # (B, K, d)
        q_emb, pos_emb, neg_emb = global_batch(q_emb, pos_emb, neg_emb)  # every rank's pairs are negatives
        return contrastive_loss(cfg.contrastive, q_emb, pos_emb, neg_emb, temperature=cfg.temperature,
                                margin=cfg.margin)

    # 3-5. optimiser, loop, save
    return fit(encoder, len(queries), step_loss, cfg, on_step=on_step, start_step=start_step,
               optimizer_state=optimizer_state)


# ---------------------------------------------------------------------------------------------- the loop


def fit(model: Encoder, n_rows: int, step_loss: StepLoss, cfg: TrainJob, *, on_step: OnStep | None = None,
        start_step: int = 0, optimizer_state: dict | None = None) -> TrainResult:
    """Run steps start_step … total-1, calling on_step(step done, metrics, save) after each.

    metrics: "loss", "lr", "samples_per_s", "checkpoint_due" and "parts" ({term: value} when step_loss returns named
    terms, whose sum is the loss; else empty).

    `save(folder)` writes the checkpoint of that step (`hlm.checkpoint`: the one checkpoint format; the caller
    picks where), and metrics["checkpoint_due"] says when one is due: every cfg.checkpoint_every steps and at
    the end.

    Gradients are averaged over ranks by DDP when a process group is up, so each rank passes its own shard of
    rows (n_rows each) and all ranks end every step with the same weights. The weights and optimizer state keep
    the dtype they were loaded in: load fp32 and set cfg.mixed_precision for bf16 compute.
    """
    total = total_steps(n_rows, cfg)
    # 3. the forward path and the optimiser
    if cfg.gradient_checkpointing:
        # Non-reentrant, because DDP must see each parameter's gradient once and LoRA's frozen inputs need no grad.
        # (gradient_checkpointing_enable is the name every transformers 5.x has.)
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = data_parallel(model)
    amp = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and model.device.type == "cuda")

    def encode(texts: list[str], kind: Kind) -> Tensor:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
            return net(model.tokenize(texts, kind)).float()  # (n, d); losses run in fp32

    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # 4. loop
    model.train()
    losses, seen, t0 = [], 0, time.perf_counter()
    for step in (bar := tqdm(range(start_step, total), initial=start_step, total=total, desc="train", disable=None)):
        lr = lr_at(step, cfg, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout noise depends on (seed, step) only
        idx = batch_indices(step, n_rows, cfg)
        terms = step_loss(encode, idx)
        parts = terms if isinstance(terms, dict) else {}
        loss = sum(parts.values()) if parts else terms
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        done, seen = step + 1, seen + len(idx)
        losses.append(loss.item())
        due = done == total or bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        metrics: dict[str, Any] = {"loss": losses[-1], "lr": lr, "samples_per_s": seen / (time.perf_counter() - t0),
                                   "checkpoint_due": due, "parts": {k: v.item() for k, v in parts.items()}}
        if done % cfg.log_every == 0 or done == total:
            logger.info("step %d/%d loss %.4f lr %.2e %.0f samples/s", done, total, losses[-1], lr,
                        metrics["samples_per_s"])
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_step is not None:
            on_step(done, metrics, lambda folder, done=done: save_checkpoint(folder, model, optimizer, done, cfg,
                                                                             model.settings.target_space))
    model.eval()
    # 5. save: the caller decides where the trained encoder goes (on_step's save, or TrainResult.encoder)
    return TrainResult(model, max(total, start_step), losses, optimizer.state_dict(),
                       seen / max(time.perf_counter() - t0, 1e-9))

