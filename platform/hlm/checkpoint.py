"""Training checkpoints: an encoder folder any hlm reader loads, plus what a run needs to go on from it.

A checkpoint folder is `Encoder.save` output (for a LoRA teacher: the merged plain model), `train.yaml` (the
phase config, for people) and `trainer_state.pt`: optimizer state, step, config and, for LoRA, the adapter.
Deleting `trainer_state.pt` leaves a plain encoder folder (what `pipelines.train` exports as OUT/model).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

from hlm.config import LoraSettings, Runtime, TrainJob
from hlm.encoder import Encoder
from hlm.lora import adapter_state, has_lora, merged, restore

TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(folder: str | Path, encoder: Encoder, optimizer: torch.optim.Optimizer | dict, step: int,
                    cfg: TrainJob, target_space: str | None = None) -> Path:
    """The encoder (HF files + settings with target_space) + `trainer_state.pt` + `train.yaml`, written atomically."""
    folder = Path(folder)
    if target_space is not None:
        encoder.settings.target_space = target_space
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lora = has_lora(encoder)
    (merged(encoder) if lora else encoder).save(tmp)
    state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    torch.save({"optimizer": state, "step": step, "config": cfg.model_dump(mode="json"),
                **({"lora_adapter": adapter_state(encoder)} if lora else {})}, tmp / TRAINER_STATE)
    (tmp / "train.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_checkpoint(folder: str | Path, runtime: Runtime | None = None) -> tuple[Encoder, dict, int]:
    """(encoder, optimizer_state, step) to pass back as `train_*(encoder, …, start_step=step, optimizer_state=…)`.

    A LoRA checkpoint comes back as base weights + the saved adapter, the form its optimizer state belongs to.
    """
    folder = Path(folder)
    encoder = Encoder.load(folder, runtime)
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    if "lora_adapter" in state:
        encoder = restore(encoder, LoraSettings.model_validate(state["config"]["lora"]), state["lora_adapter"])
    return encoder, state["optimizer"], int(state["step"])
