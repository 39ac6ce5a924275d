"""What each training step trains on and how fast: the learning-rate schedule, the batch order and the optimiser.

All are functions of (cfg, step) only, so a run resumed from a checkpoint replays exactly the steps the
uninterrupted run would have taken (`hlm.train.fit` uses them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from hlm.config import TrainJob


def total_steps(n_rows: int, cfg: TrainJob) -> int:
    return cfg.max_steps or cfg.epochs * max(1, n_rows // cfg.batch_size)


def lr_at(step: int, cfg: TrainJob, total_steps: int) -> float:
    """Learning rate of 0-based `step` (nanoGPT's get_lr): linear warmup, then cosine/linear decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if cfg.schedule == "cosine" else 1.0 - ratio
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def batch_indices(step: int, n_rows: int, cfg: TrainJob) -> np.ndarray:
    """Rows of `step`: epoch e = step // steps_per_epoch is a permutation seeded by (seed, e); the tail is dropped."""
    per_epoch = max(1, n_rows // cfg.batch_size)
    order = np.random.default_rng([cfg.seed, step // per_epoch]).permutation(n_rows)
    start = (step % per_epoch) * cfg.batch_size
    return order[start:start + cfg.batch_size]


def make_optimizer(model: nn.Module, cfg: TrainJob) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim ≥ 2) only, as nanoGPT does; parameter order is the module's."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)
