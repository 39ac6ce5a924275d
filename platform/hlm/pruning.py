"""Progressive pruning (the optional phase between align and refine): cut layers and FFN width step by step,
re-aligning after each step.

Which layers stay: `kept_layers(L, n)` spreads n layers evenly over the stack and always keeps the first and
the last (n ≥ 2), i.e. round(linspace(0, L−1, n)): 6 → 4 keeps [0, 2, 3, 5], 28 → 4 keeps [0, 9, 18, 27];
n = 1 keeps layer 0. The paper cut 28 → 4 layers in steps for ~1% P@100 and found one-shot pruning worse.
It also narrowed the FFNs: `prune_ffn` keeps, in every layer, the hidden neurons with the largest weights
(`neuron_importance`), and `train_prune` does so at each step when `prune_ffn_ratio` < 1.

Works on the BERT-style stacks (`backbone.encoder.layer`, FFN `intermediate.dense` → `output.dense`: BERT,
MiniLM, MPNet, RoBERTa) and the decoder stacks (`backbone.layers`, gated FFN `mlp.{gate,up}_proj` →
`mlp.down_proj`: Qwen3, Llama, Mistral). The HF config is updated (`num_hidden_layers`, `layer_types` where
present, `intermediate_size`) so the pruned model saves and loads like any other.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hlm.config import TrainJob
from hlm.encoder import Encoder
from hlm.train import OnStep, Save, prepare_aligning_student, train_align

logger = logging.getLogger(__name__)

# (input projections, output projection) of a layer's FFN, per family, relative to the layer
FFN_LAYOUTS = ((("intermediate.dense",), "output.dense"), (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"))


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


def ffn_layout(layer: nn.Module) -> tuple[tuple[str, ...], str]:
    """(input projection paths, output projection path) of a transformer layer's FFN."""
    for inputs, output in FFN_LAYOUTS:
        if all(isinstance(_submodule(layer, path), nn.Linear) for path in (*inputs, output)):
            return inputs, output
    raise ValueError(f"{type(layer).__name__}: no FFN at {[i + (o,) for i, o in FFN_LAYOUTS]}; cannot narrow it")


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def neuron_importance(layer: nn.Module) -> Tensor:
    """(I,) score of each FFN hidden neuron j: Π ‖W_in[j, :]‖ over the input projections × ‖W_out[:, j]‖.

    The product bounds neuron j's contribution to the FFN output per unit of input, biases aside (GELU and SiLU
    never enlarge their input), so the smallest products are the cheapest to drop.
    """
    inputs, output = ffn_layout(layer)
    score = layer.get_submodule(output).weight.detach().float().norm(dim=0)  # (I,)
    for path in inputs:
        score = score * layer.get_submodule(path).weight.detach().float().norm(dim=1)  # (I,)
    return score


def _narrowed(linear: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """`linear` with only the `keep` rows (dim 0, its outputs) or columns (dim 1, its inputs)."""
    weight = linear.weight.detach().index_select(dim, keep.to(linear.weight.device))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias[keep.to(linear.bias.device)] if dim == 0 else linear.bias)
    return out


def prune_ffn(encoder: Encoder, width: int) -> Encoder:
    """A copy of `encoder` whose every FFN keeps its `width` most important hidden neurons (in their order).

    Output shape is unchanged; each layer loses I − width rows of every input projection (with their biases)
    and as many columns of the output projection. width = I keeps all neurons, so the outputs are identical.
    """
    pruned = copy.deepcopy(encoder)
    config = pruned.backbone.config
    parent, attr = layer_stack(pruned.backbone)
    if not 1 <= width <= config.intermediate_size:
        raise ValueError(f"cannot keep {width} of {config.intermediate_size} FFN neurons")
    for layer in getattr(parent, attr):
        keep = neuron_importance(layer).topk(width).indices.sort().values  # (width,)
        inputs, output = ffn_layout(layer)
        for path, dim in [*((p, 0) for p in inputs), (output, 1)]:
            owner, _, name = path.rpartition(".")
            setattr(layer.get_submodule(owner), name, _narrowed(layer.get_submodule(path), keep, dim))
    history = [*pruned.settings.extra.get("pruning", []), {"ffn_from": config.intermediate_size, "ffn": width}]
    pruned.settings.extra = {**pruned.settings.extra, "pruning": history}
    logger.info("narrowed the FFNs %d -> %d", config.intermediate_size, width)
    config.intermediate_size = width
    return pruned


def train_prune(student: Encoder, queries: list[str], teacher_q_emb: np.ndarray, cfg: TrainJob,
                out_dir: str | Path, *, ad_emb: np.ndarray | None = None, teacher_space: str | None = None,
                on_step: OnStep | None = None, on_stage: Callable[[int, Path], None] | None = None) -> list[Path]:
    """Run cfg.prune_schedule: per entry n, prune to n layers (and the FFNs to cfg.prune_ffn_ratio of their
    width), re-align for cfg.steps_per_prune, checkpoint.

    Returns one checkpoint folder per step, `out_dir/layers-{n}` (`hlm.checkpoint.load_checkpoint` reads it),
    each also passed to on_stage(n, folder) once written. Entries ≥ the student's current layer count are
    skipped, so a run restarted from `layers-{n}` goes on with the rest of the schedule. on_step sees a step
    count that runs on across the schedule and `n_layers`.
    """
    step_cfg = cfg.model_copy(update={"max_steps": cfg.steps_per_prune})
    # a student narrower than the teacher gets its head before any layer goes (as `train_align` would give it)
    student = prepare_aligning_student(student, queries, teacher_q_emb, cfg, teacher_space=teacher_space)
    folders, offset = [], 0
    for n in cfg.prune_schedule:
        if n >= num_layers(student):
            logger.info("skip pruning to %d layers: the student has %d", n, num_layers(student))
            continue
        # 1. prune
        student = prune_layers(student, n)
        if cfg.prune_ffn_ratio < 1:
            student = prune_ffn(student, max(1, round(cfg.prune_ffn_ratio * student.backbone.config.intermediate_size)))
        # 2. re-align
        last: dict[str, Save] = {}

        def report(step: int, metrics: dict[str, Any], save: Save, n: int = n, offset: int = offset) -> None:
            last["save"] = save
            if on_step is not None:
                on_step(offset + step, {**metrics, "n_layers": n}, save)

        result = train_align(student, queries, teacher_q_emb, step_cfg, ad_emb=ad_emb, teacher_space=teacher_space,
                             on_step=report)
        student, offset = result.encoder, offset + result.step
        logger.info("%d layers: re-aligned, last loss %.4f", n, result.losses[-1])
        # 3. save: the checkpoint of the stage's last step
        folders.append(last["save"](Path(out_dir) / f"layers-{n}"))
        if on_stage is not None:
            on_stage(n, folders[-1])
    return folders
