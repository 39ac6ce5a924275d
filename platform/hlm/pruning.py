"""Progressive layer pruning (the optional phase between align and refine): cut layers step by step, re-align each.

Which layers stay: `kept_layers(L, n)` spreads n layers evenly over the stack and always keeps the first and
the last (n ≥ 2), i.e. round(linspace(0, L−1, n)): 6 → 4 keeps [0, 2, 3, 5], 28 → 4 keeps [0, 9, 18, 27];
n = 1 keeps layer 0. The paper cut 28 → 4 layers in steps for ~1% P@100 and found one-shot pruning worse;
it also narrowed the FFNs, which this module does not do.

Works on the BERT-style stacks (`backbone.encoder.layer`: BERT, MiniLM, MPNet, RoBERTa) and the decoder
stacks (`backbone.layers`: Qwen3, Llama, Mistral). The HF config is updated (`num_hidden_layers`, and
`layer_types` where present) so the pruned model saves and loads like any other.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
from torch import nn

from hlm.config import TrainJob
from hlm.encoder import Encoder
from hlm.train import OnStep, save_checkpoint, train_align

logger = logging.getLogger(__name__)


def layer_stack(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute) holding the backbone's nn.ModuleList of transformer layers."""
    for path in ("encoder.layer", "layers"):
        *parents, attr = path.split(".")
        parent = backbone
        for name in parents:
            parent = getattr(parent, name, None)
        if isinstance(getattr(parent, attr, None), nn.ModuleList):
            return parent, attr
    raise ValueError(f"{type(backbone).__name__}: no layer stack at .encoder.layer or .layers; cannot prune it")


def num_layers(encoder: Encoder) -> int:
    parent, attr = layer_stack(encoder.backbone)
    return len(getattr(parent, attr))


def kept_layers(total: int, n_layers: int) -> list[int]:
    """Indices of the n_layers of `total` that stay: evenly spaced, first and last included."""
    if not 1 <= n_layers <= total:
        raise ValueError(f"cannot keep {n_layers} of {total} layers")
    return [int(i) for i in np.round(np.linspace(0, total - 1, n_layers))]


def prune_layers(encoder: Encoder, n_layers: int) -> Encoder:
    """A copy of `encoder` with only `kept_layers(L, n_layers)` of its L layers; the input is left as it was."""
    pruned = copy.deepcopy(encoder)
    parent, attr = layer_stack(pruned.backbone)
    layers = getattr(parent, attr)
    keep = kept_layers(len(layers), n_layers)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for new_idx, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():  # decoder attention indexes its KV cache by layer_idx
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = pruned.backbone.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = n_layers
    history = [*pruned.settings.extra.get("pruning", []), {"from": len(layers), "kept": keep}]
    pruned.settings.extra = {**pruned.settings.extra, "pruning": history}
    logger.info("pruned %d -> %d layers, kept %s", len(layers), n_layers, keep)
    return pruned


def train_prune(student: Encoder, queries: list[str], teacher_q_emb: np.ndarray, cfg: TrainJob,
                out_dir: str | Path, *, ad_emb: np.ndarray | None = None, teacher_space: str | None = None,
                on_step: OnStep | None = None) -> list[Path]:
    """Run cfg.prune_schedule: per entry n, prune to n layers, re-align for cfg.steps_per_prune, checkpoint.

    Returns one checkpoint folder per step, `out_dir/layers-{n}` (`hlm.train.load_checkpoint` reads it).
    Entries ≥ the student's current layer count are skipped, so a run restarted from `layers-{n}` goes on
    with the rest of the schedule. on_step sees a step count that runs on across the schedule and `n_layers`.
    """
    step_cfg = cfg.model_copy(update={"max_steps": cfg.steps_per_prune})
    folders, offset = [], 0
    for n in cfg.prune_schedule:
        if n >= num_layers(student):
            logger.info("skip pruning to %d layers: the student has %d", n, num_layers(student))
            continue
        # 1. prune
        student = prune_layers(student, n)
        # 2. re-align
        report = None if on_step is None else (
            lambda step, metrics, state_fn, n=n, offset=offset: on_step(offset + step, {**metrics, "n_layers": n},
                                                                        state_fn))
        result = train_align(student, queries, teacher_q_emb, step_cfg, ad_emb=ad_emb, teacher_space=teacher_space,
                             on_step=report)
        student, offset = result.encoder, offset + result.step
        logger.info("%d layers: re-aligned, last loss %.4f", n, result.losses[-1])
        # 3. save
        folders.append(save_checkpoint(Path(out_dir) / f"layers-{n}", student, result.optimizer_state, result.step,
                                       step_cfg, student.settings.target_space))
    return folders
