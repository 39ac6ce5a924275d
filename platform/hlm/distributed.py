"""Data parallelism for the training loops: PyTorch DistributedDataParallel whenever a process group is up.

Ray Train's `TorchTrainer` starts the process group (gloo on CPU, NCCL on GPU) before the worker function runs;
the hlm loops only wrap their module, gather the contrastive batch and reduce a few numbers, so they never import
Ray and run unchanged in a single process, where the functions below are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def data_parallel(module: nn.Module) -> nn.Module:
    """`module` under DDP when there is more than one rank, else `module` itself; call the result's forward.

    DDP averages gradients over ranks during backward, and wrapping broadcasts rank 0's parameters and buffers,
    so every rank starts from the same weights (a fresh projection head or a freshly pruned copy included).
    find_unused_parameters: a backbone may hold weights the encoder never reads (BERT's pooler), and without it
    DDP would wait for their gradients forever. It also lets a step call forward more than once before its one
    backward (the teacher encodes queries and ads), which needs non-reentrant activation checkpointing.
    """
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, find_unused_parameters=True)


def global_batch(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Each tensor (B, …) concatenated over ranks into (world·B, …), rank order, differentiable; None stays None.

    Contrastive losses over the result see every rank's pairs as in-batch negatives, as one process with the whole
    batch would. Every rank then computes the same global loss, and the gather's backward sums the gradient that
    reaches each rank's own rows over all ranks (world × its share); DDP's mean over ranks turns that back into
    exactly the single-process gradient. Ranks must pass equal B (`PhaseData.shard` cuts equal shards).
    """
    if world_size() == 1:
        return tensors
    return tuple(None if t is None else _GatherRows.apply(t) for t in tensors)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradient over ranks and keeps this rank's rows.

    (torch.distributed.nn.functional.all_gather does the same but is deprecated as of torch 2.13.)
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # (B, …) -> (world·B, …)
        world, rows = dist.get_world_size(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        ctx.rows, ctx.rank = rows, dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # (world·B, …) -> (B, …)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # each rank's copy of the loss reached these rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over all ranks (a collective: every rank must call it with the same keys)."""
    world = world_size()
    if world == 1 or not values:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(values, (total / world).tolist(), strict=True))
