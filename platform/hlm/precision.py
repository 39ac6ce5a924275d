"""Inference precision of an encoder: the dtype its weights compute in, or int8 dynamic quantisation on CPU.

| precision | device   | what runs                                                                     |
|-----------|----------|-------------------------------------------------------------------------------|
| fp32      | CPU, GPU | the reference every other path is tested against                              |
| bf16      | CPU, GPU | weights and activations in bfloat16                                           |
| fp16      | GPU      | weights and activations in float16 (CPU half matmuls are slow or missing)     |
| int8      | CPU      | every backbone nn.Linear holds int8 weights, one scale per output channel; |
|           |          | activations are quantised per batch at run time (torch dynamic quantisation) |
| onnx      | CPU      | the exported fp32 graph on ONNX Runtime (`hlm.onnx_runtime`)                 |
| onnx_int8 | CPU      | that graph with int8 weights, quantised by ONNX Runtime (per channel, dynamic) |

None of them changes the embedding space: the space fingerprint ignores precision and `Encoder.encode` casts
to float32, so an int8 or bf16 student searches the index built from fp32 (or teacher) ad embeddings. How
close each path stays to fp32 is pinned by tests/unit/test_precision.py and measured by `bench/encoder.py`.

int8 keeps the projection head in fp32: it is one small matmul, and it maps into the teacher's space, where
rounding shows directly in the scores. Weights get one scale per output channel rather than one per tensor: on
the default student that lifts the int8 queries' worst cosine to fp32 from 0.90 to 0.96 and cuts their R@10 loss
from 1.2 to 0.8 points (built-in catalogue, 1,000 ads; R@100 loses 0.1–0.2 points either way).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from hlm.config import Precision

_WEIGHT_DTYPE = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16,
                 Precision.int8: torch.float32,  # int8 loads fp32 weights, then quantises them
                 Precision.onnx: torch.float32, Precision.onnx_int8: torch.float32}  # the torch reference beside it
ONNX = (Precision.onnx, Precision.onnx_int8)
_OF_DTYPE = {torch.float32: Precision.fp32, torch.bfloat16: Precision.bf16, torch.float16: Precision.fp16}


class PrecisionError(ValueError):
    """A precision the device cannot run; the message says which ones it can."""


def resolve_precision(requested: Precision | None, device: torch.device, runtime_dtype: torch.dtype) -> Precision:
    """`requested`, or the runtime's dtype as a precision when None; refuses what `device` cannot run."""
    precision = requested if requested is not None else _OF_DTYPE[runtime_dtype]
    if precision is Precision.int8 and device.type != "cpu":
        raise PrecisionError(f"precision int8 is torch dynamic quantisation, which has CPU kernels only; "
                             f"on {device.type} use bf16 or fp16")
    if precision in ONNX and device.type != "cpu":
        raise PrecisionError(f"precision {precision.value} runs the CPU build of ONNX Runtime; on {device.type} use "
                             "bf16 or fp16")
    if precision is Precision.fp16 and device.type == "cpu":
        raise PrecisionError("precision fp16 needs a GPU (CPU float16 matmuls are slow or missing); "
                             "on CPU use fp32, bf16 or int8")
    return precision


def weight_dtype(precision: Precision) -> torch.dtype:
    """The dtype to load the weights in (int8 loads fp32 and quantises afterwards)."""
    return _WEIGHT_DTYPE[precision]


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `module` (in place; returns it) by a dynamically quantised int8 one; CPU only.

    torch.ao.quantization is deprecated in favour of torchao, but it is the int8 path that ships with torch
    itself and still works in this torch; its deprecation warnings would fire on every replica start.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
