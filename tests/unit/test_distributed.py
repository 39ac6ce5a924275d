"""Real DDP over gloo without Ray: two ranks on different shards, and different starting weights, end equal.

Two processes (torch.multiprocessing spawn) join one gloo process group through a file and run the hlm loops
as a Ray Train worker would: the align phase (a student whose fresh projection head is seeded per rank, a BERT
pooler that never gets a gradient) and the LoRA teacher phase with activation checkpointing (three forward passes
per backward: queries, positive ads, hard negatives). Each rank writes what it ended with; the test compares.
A contrastive step on two ranks, whose batches are gathered into one, must equal one process's step on the union.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hlm.config import LoraSettings, TrainJob
from hlm.distributed import data_parallel, global_batch, mean_over_ranks
from hlm.losses import info_nce
from hlm.tiny import WORDS, tiny_encoder
from hlm.train import train_align, train_teacher

QUERIES = [f"{a} {b}" for a, b in itertools.permutations(WORDS, 2)][:32]
ADS = [f"{q} for sale, best {q} deals {i}" for i, q in enumerate(QUERIES)]
WORLD = 2


def ONE_FULL_STEP(rows: int) -> TrainJob:  # noqa: N802 (a constant of the test, sized by its caller)
    """One teacher step over all `rows` (no dropout in the tiny qwen3, so two runs can match exactly)."""
    return TrainJob(phase="teacher", lr=1e-2, batch_size=rows, max_steps=1)


def contrastive_grad(net: torch.nn.Module, rows: np.ndarray, *, seed_model: torch.nn.Linear) -> torch.Tensor:
    """The weight gradient of InfoNCE over the global batch (gathered when ranks are up) of a linear probe."""
    with torch.no_grad():  # the same probe everywhere (DDP would broadcast it anyway)
        seed_model.weight.copy_(torch.linspace(-1, 1, 32).view(4, 8))
        seed_model.bias.zero_()
    x = torch.sin(torch.arange(2 * len(QUERIES) * 8, dtype=torch.float32)).view(2, len(QUERIES), 8)  # (2, N, 8)
    q_emb, pos_emb = global_batch(net(x[0, rows]), net(x[1, rows]))  # (N, 4) each
    info_nce(q_emb, pos_emb, temperature=0.5).backward()
    return seed_model.weight.grad.clone()


def train_on_rank(rank: int, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=WORLD)
    try:
        rows = np.arange(rank, len(QUERIES), WORLD)  # this rank's shard, as PhaseData.shard cuts it
        queries, ads = [QUERIES[i] for i in rows], [ADS[i] for i in rows]
        target = tiny_encoder("bert", hidden=48, seed=1).encode(queries)
        torch.manual_seed(rank)  # the student's projection head starts different on each rank
        aligned = train_align(tiny_encoder("bert", hidden=32, seed=0), queries, target,
                              TrainJob(lr=3e-3, batch_size=8, max_steps=3))
        hard = [[ads[(i + 1) % len(ads)]] for i in range(len(ads))]
        teacher = train_teacher(tiny_encoder("qwen3", hidden=32, seed=rank), queries, ads,  # different weights too
                                TrainJob(phase="teacher", lora=LoraSettings(r=4), gradient_checkpointing=True,
                                         lr=1e-2, batch_size=8, max_steps=3), hard_negative_texts=hard)
        one_step = train_teacher(tiny_encoder("qwen3", hidden=32, seed=0), queries, ads, ONE_FULL_STEP(len(queries)))
        grad = contrastive_grad(data_parallel(probe := torch.nn.Linear(8, 4)), rows, seed_model=probe)
        torch.save({"student": aligned.encoder.state_dict(), "teacher": teacher.encoder.state_dict(),
                    "align_losses": aligned.losses, "teacher_losses": teacher.losses,
                    "one_step": one_step.encoder.state_dict(), "one_step_loss": one_step.losses[0], "grad": grad,
                    "mean": mean_over_ranks({"rank": float(rank)})},
                   folder / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of two gloo ranks ended with, training on its own shard (every other row)."""
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(train_on_rank, args=(folder,), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank-{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_gloo_ranks_end_every_phase_with_identical_weights(ranks):
    # When two ranks train on their own shards, from different starting weights,
    # then they saw different data (their align losses differ), but the contrastive loss is the gathered batch's ...
    assert ranks[0]["align_losses"] != ranks[1]["align_losses"]
    assert ranks[0]["teacher_losses"] == ranks[1]["teacher_losses"]
    # ... and still end bit-for-bit equal: DDP broadcast rank 0's weights and averaged every gradient
    for phase in ("student", "teacher", "one_step"):
        assert ranks[0][phase].keys() == ranks[1][phase].keys()
        for name, tensor in ranks[0][phase].items():
            assert torch.equal(tensor, ranks[1][phase][name]), f"{phase} {name} differs between ranks"
    assert ranks[0]["mean"] == ranks[1]["mean"] == {"rank": 0.5}


def test_contrastive_batches_gathered_over_two_ranks_give_the_one_process_loss_and_gradient(ranks):
    # One process over all rows sees the same pairs, so the same in-batch negatives:
    # the teacher phase's first loss is the same ...
    alone = train_teacher(tiny_encoder("qwen3", hidden=32, seed=0), QUERIES, ADS, ONE_FULL_STEP(len(QUERIES)))
    assert ranks[0]["one_step_loss"] == pytest.approx(alone.losses[0], rel=1e-5)
    # ... and so is the gradient after DDP's mean over ranks (not world × it, not one rank's share of it)
    single = contrastive_grad(probe := torch.nn.Linear(8, 4), np.arange(len(QUERIES)), seed_model=probe)
    torch.testing.assert_close(ranks[0]["grad"], single)
    torch.testing.assert_close(ranks[1]["grad"], single)
