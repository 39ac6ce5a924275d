"""Real DDP over gloo without Ray: two ranks on different shards, and different starting weights, end equal.

Two processes (torch.multiprocessing spawn) join one gloo process group through a file and run the hlm loops
as a Ray Train worker would: the align phase (a student whose fresh projection head is seeded per rank, a BERT
pooler that never gets a gradient) and the LoRA teacher phase with activation checkpointing (three forward passes
per backward: queries, positive ads, hard negatives). Each rank writes what it ended with; the test compares.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hlm.config import LoraSettings, TrainJob
from hlm.distributed import mean_over_ranks
from hlm.tiny import WORDS, tiny_encoder
from hlm.train import train_align, train_teacher

QUERIES = [f"{a} {b}" for a, b in itertools.permutations(WORDS, 2)][:32]
ADS = [f"{q} for sale, best {q} deals {i}" for i, q in enumerate(QUERIES)]
WORLD = 2


def train_on_rank(rank: int, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=WORLD)
    try:
        rows = np.arange(rank, len(QUERIES), WORLD)  # this rank's shard, as PhaseData.shard cuts it
        queries, ads = [QUERIES[i] for i in rows], [ADS[i] for i in rows]
        target = tiny_encoder("bert", hidden=48, seed=1).encode(queries)
        torch.manual_seed(rank)  # the student's projection head starts different on each rank
        student = train_align(tiny_encoder("bert", hidden=32, seed=0), queries, target,
                              TrainJob(lr=3e-3, batch_size=8, max_steps=3)).encoder
        hard = [[ads[(i + 1) % len(ads)]] for i in range(len(ads))]
        teacher = train_teacher(tiny_encoder("qwen3", hidden=32, seed=rank), queries, ads,  # different weights too
                                TrainJob(phase="teacher", lora=LoraSettings(r=4), gradient_checkpointing=True,
                                         lr=1e-2, batch_size=8, max_steps=3), hard_negative_texts=hard)
        torch.save({"student": student.state_dict(), "teacher": teacher.encoder.state_dict(),
                    "losses": teacher.losses, "mean": mean_over_ranks({"rank": float(rank)})},
                   folder / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_end_every_phase_with_identical_weights(tmp_path):
    # When two ranks train on their own shards, from different starting weights
    mp.spawn(train_on_rank, args=(tmp_path,), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(WORLD)]
    # Then they saw different data (their losses differ) ...
    assert ranks[0]["losses"] != ranks[1]["losses"]
    # ... and still end bit-for-bit equal: DDP broadcast rank 0's weights and averaged every gradient
    for phase in ("student", "teacher"):
        assert ranks[0][phase].keys() == ranks[1][phase].keys()
        for name, tensor in ranks[0][phase].items():
            assert torch.equal(tensor, ranks[1][phase][name]), f"{phase} {name} differs between ranks"
    assert ranks[0]["mean"] == ranks[1]["mean"] == {"rank": 0.5}
