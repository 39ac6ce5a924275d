"""The closed sets a config chooses from, as enums: profile, pooling, precision, phase, objectives, width, schedule.

Declared once here and used everywhere (`hlm.config` fields, `hlm.losses`' table, the study's axes, the jobs);
`hlm.config` re-exports them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class Profile(StrEnum):
    cpu = "cpu"
    gpu = "gpu"


class Pooling(StrEnum):
    mean = "mean"
    cls = "cls"
    last_token = "last_token"  # decoder models (Qwen3-Embedding style): the final non-padding token


class Precision(StrEnum):
    """How an encoder computes at inference (`hlm.precision`); never part of the embedding space."""

    fp32 = "fp32"  # the reference
    bf16 = "bf16"  # CPU or GPU
    fp16 = "fp16"  # GPU only
    int8 = "int8"  # CPU only: torch dynamic quantisation of every nn.Linear
    onnx = "onnx"  # CPU: the exported fp32 graph on ONNX Runtime (`python -m pipelines.export_onnx`)
    onnx_int8 = "onnx_int8"  # CPU: the exported graph quantised to int8 by ONNX Runtime


class Phase(StrEnum):
    """A phase of the HARNESS-LM recipe (`hlm.train`, `hlm.pruning`)."""

    teacher = "teacher"  # fine-tune the dual encoder
    align = "align"  # L2 (or another objective) to the teacher's query embeddings
    prune = "prune"  # drop layers step by step, re-aligning after each
    refine = "refine"  # contrastive against the frozen teacher ad embeddings

    @property
    def aligns(self) -> bool:
        """Trains towards the teacher's query embeddings (`train.objective`)."""
        return self in (Phase.align, Phase.prune)


class ContrastiveObjective(StrEnum):
    """`train.contrastive`: the loss of phases teacher and refine (`hlm.losses.contrastive_loss`)."""

    INFO_NCE = "info_nce"
    QWEN3 = "qwen3"


class AlignmentObjective(StrEnum):
    """`train.objective`: the loss of phases align and prune (`hlm.losses.alignment_loss`)."""

    L2 = "l2"
    COSINE = "cosine"
    SCORE_KL = "score_kl"


Width = Literal["projection", "truncate"]  # a student narrower than its teacher: a head, or a truncated space
Schedule = Literal["cosine", "linear", "constant"]  # the learning-rate decay after warmup
