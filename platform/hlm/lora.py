"""LoRA for the teacher phase: train low-rank adapters on a billion-scale backbone, write plain merged weights.

`add_lora` wraps an encoder's backbone (peft) so that only the adapters train: r·(in + out) parameters per
target matrix, the base weights frozen. Nothing downstream ever sees an adapter folder: `merged` folds
W + (alpha/r)·B·A into a plain Hugging Face copy that `Encoder.load`, the embed job and Serve read as they read
any model. A checkpoint also carries `adapter_state`, and `restore` turns its merged weights back into
(base, adapter), so a resumed run goes on with the very adapter its optimizer moments belong to.
"""

from __future__ import annotations

import copy
import logging

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor

from hlm.config import LoraSettings
from hlm.encoder import Encoder

logger = logging.getLogger(__name__)


def has_lora(encoder: Encoder) -> bool:
    return isinstance(encoder.backbone, PeftModel)


def add_lora(encoder: Encoder, settings: LoraSettings) -> Encoder:
    """Wrap `encoder`'s backbone in place with fresh adapters (B = 0: the outputs do not change); no-op if it has some.

    Only the adapters of the backbone train; a projection head, outside the backbone, stays trainable.
    """
    if has_lora(encoder):
        return encoder
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, task_type=TaskType.FEATURE_EXTRACTION)
    encoder.backbone = get_peft_model(encoder.backbone, config)
    trainable, total = encoder.backbone.get_nb_trainable_parameters()
    logger.info("LoRA r=%d on %s: %d of %d backbone parameters train", settings.r,
                sorted(encoder.backbone.peft_config["default"].target_modules), trainable, total)
    return encoder


def merged(encoder: Encoder) -> Encoder:
    """A plain-HF copy of a LoRA encoder with the adapters folded into the base weights; `encoder` is untouched.

    The copy holds a second set of weights on the same device while it lives (a checkpoint writes it, then drops it).
    """
    plain = copy.deepcopy(encoder)
    plain.backbone = plain.backbone.merge_and_unload()
    config = encoder.backbone.peft_config["default"]
    plain.settings.extra = {**plain.settings.extra,
                            "lora": {"r": config.r, "alpha": config.lora_alpha, "merged": True,
                                     "target_modules": sorted(config.target_modules)}}
    return plain


def adapter_state(encoder: Encoder) -> dict[str, Tensor]:
    """The adapter weights alone (peft's names), as `restore` takes them back."""
    return {name: t.detach().cpu() for name, t in get_peft_model_state_dict(encoder.backbone).items()}


@torch.no_grad()
def restore(encoder: Encoder, settings: LoraSettings, state: dict[str, Tensor]) -> Encoder:
    """Undo `merged` on a plain encoder loaded from a checkpoint: adapters from `state`, base W = W' − (alpha/r)·B·A.

    The base weights come back to within fp32 rounding of those the run trained from.
    """
    add_lora(encoder, settings)
    result = set_peft_model_state_dict(encoder.backbone, state)
    if result.unexpected_keys:
        raise ValueError(f"adapter state does not fit this model: {result.unexpected_keys[:3]}")
    for module in encoder.backbone.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                module.get_base_layer().weight -= module.get_delta_weight(name)
    return encoder
