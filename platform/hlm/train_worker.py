"""The Ray Train side of `pipelines.train`: one worker per rank runs a phase's `hlm.train` loop on its shard.

`run_train` starts a `TorchTrainer` of `cluster.num_workers` workers. Each worker loads the initial encoder (or the
newest checkpoint of the run, to resume), trains every n-th row with the phase's loop, averages the losses over
ranks, and reports a checkpoint (an `hlm.checkpoint` folder with the loss record so far, `hlm.loss_log`) every
`train.checkpoint_every` steps and at the end; prune reports one per `layers-N` stage.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hlm.checkpoint import load_checkpoint
from hlm.config import Config, ModelRef, Phase, Runtime
from hlm.distributed import mean_over_ranks
from hlm.encoder import Encoder
from hlm.loss_log import LOSS_CSV, LossLog
from hlm.phase_data import PhaseData
from hlm.pruning import num_layers, train_prune
from hlm.train import Save, train_align, train_refine, train_teacher

logger = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: load (or resume), train this rank's shard with the hlm loop, report checkpoints."""
    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data: PhaseData = ray.get(config["data"]).shard(rank, world)
    # fp32 master weights and optimizer state; train.mixed_precision adds bf16 compute on top
    runtime = Runtime(device="cuda" if cfg.cluster.use_gpu else "cpu", dtype="float32")
    if not cfg.cluster.use_gpu:  # explicit: OMP_NUM_THREADS may be inherited from the driver's environment
        torch.set_num_threads(cfg.cluster.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # a fresh projection head starts identical on every rank (DDP broadcasts it too)

    checkpoint = ray.train.get_checkpoint()
    start_step, optimizer_state, log = 0, None, LossLog(cfg.train.phase.value)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            encoder, optimizer_state, start_step = load_checkpoint(folder, runtime)
            log = LossLog.read_csv(Path(folder) / LOSS_CSV, log.phase)
        logger.info("rank %d resumes from step %d", rank, start_step)
    else:
        # the precision a model serves at (bf16, int8) is not the one it trains in
        encoder = Encoder.load(ModelRef.model_validate({**config["init"], "precision": None}), runtime)
    if cfg.train.phase is Phase.prune:
        _prune(encoder, data, cfg, checkpoint is not None, world, rank, log)
    else:
        _train(encoder, data, cfg, start_step, optimizer_state, world, rank, log)


def _report(metrics: dict[str, Any], rank: int, write: Callable[[Path], Path] | None = None,
            name: str | None = None) -> None:
    """ray.train.report on every rank (a barrier); losses averaged over ranks; rank 0 attaches the checkpoint
    that `write(folder)` saves."""
    metrics = {**metrics, **mean_over_ranks({k: metrics[k] for k in ("loss", "first_loss") if k in metrics})}
    if rank != 0 or write is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write(Path(tmp) / "checkpoint")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def _log_step(log: LossLog, step: int, metrics: dict[str, Any], **more: float) -> None:
    """One row of the loss record, the loss and its terms averaged over ranks (a collective: every rank calls it)."""
    losses = mean_over_ranks({"loss": metrics["loss"], **{f"loss/{k}": v for k, v in metrics["parts"].items()}})
    log.add(step, lr=metrics["lr"], **losses, **more)


def _with_log(folder: Path, log: LossLog) -> Path:
    """A checkpoint folder with the loss record so far: a run resumed from it appends to the record."""
    log.write_csv(folder / LOSS_CSV)
    return folder


def _train(encoder: Encoder, data: PhaseData, cfg: Config, start_step: int, optimizer_state: dict | None,
           world: int, rank: int, log: LossLog) -> None:
    job, first = cfg.train, {}

    def on_step(step: int, metrics: dict[str, Any], save: Save) -> None:
        first.setdefault("loss", metrics["loss"])
        _log_step(log, step, metrics)
        if metrics["checkpoint_due"]:
            out = {"step": step, "start_step": start_step, "loss": metrics["loss"], "first_loss": first["loss"],
                   "lr": metrics["lr"], "samples_per_s": metrics["samples_per_s"] * world, "workers": world}
            _report(out, rank, lambda folder: _with_log(save(folder), log), f"step-{step:07d}")

    common = {"on_step": on_step, "start_step": start_step, "optimizer_state": optimizer_state}
    if job.phase is Phase.align:
        train_align(encoder, data.queries, data.teacher_q_emb, job, ad_emb=data.ad_emb,
                    teacher_space=data.teacher_space, **common)
    elif job.phase is Phase.refine:
        train_refine(encoder, data.queries, data.positive_ad_idx, data.ad_emb, job,
                     hard_negative_idx=data.hard_negative_idx, teacher_q_emb=data.teacher_q_emb,
                     teacher_space=data.teacher_space, **common)
    else:  # teacher; with train.lora the encoder gains adapters in place, and checkpoints hold the merged model
        train_teacher(encoder, data.queries, data.positive_texts, job, hard_negative_texts=data.hard_negative_texts,
                      **common)


def _prune(encoder: Encoder, data: PhaseData, cfg: Config, resumed: bool, world: int, rank: int,
           log: LossLog) -> None:
    """The rest of train.prune_schedule in one `train_prune`; each layers-N folder is reported as a checkpoint."""
    job, every = cfg.train, cfg.train.checkpoint_every
    todo = [n for n in job.prune_schedule if n < num_layers(encoder)]  # train_prune skips the others
    start_step = (len(job.prune_schedule) - len(todo)) * job.steps_per_prune if resumed else 0
    stats: dict[str, Any] = {}  # of the stage in progress

    def on_step(step: int, metrics: dict[str, Any], _: Any) -> None:
        stats.setdefault("first_loss", metrics["loss"])
        stats.update(step=start_step + step, loss=metrics["loss"], lr=metrics["lr"],
                     samples_per_s=metrics["samples_per_s"] * world)
        _log_step(log, start_step + step, metrics, n_layers=metrics["n_layers"])
        if every and step % every == 0 and step % job.steps_per_prune:  # progress only; on_stage reports the end
            _report({**stats, "n_layers": metrics["n_layers"]}, rank)

    def on_stage(n: int, folder: Path) -> None:
        _report({**stats, "start_step": start_step, "n_layers": n, "workers": world}, rank,
                lambda _: _with_log(folder, log), f"layers-{n}")
        stats.clear()

    with tempfile.TemporaryDirectory() as tmp:
        train_prune(encoder, data.queries, data.teacher_q_emb, job, tmp, ad_emb=data.ad_emb,
                    teacher_space=data.teacher_space, on_step=on_step, on_stage=on_stage)


def run_train(cfg: Config, init: ModelRef, data: PhaseData, run_name: str) -> ray.train.Result:
    c = cfg.cluster
    storage = c.storage_path if "://" in c.storage_path else str(Path(c.storage_path).resolve())
    keep = None if cfg.train.phase is Phase.prune else c.num_to_keep  # every layers-N stage is a result to keep
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "init": init.model_dump(mode="json"),
                           "data": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=keep),
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    return trainer.fit()
