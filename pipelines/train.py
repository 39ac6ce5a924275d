"""Train one phase of the recipe on Ray Train (teacher | align | prune | refine), with checkpoints and resume.

    python -m pipelines.train --phase align --queries DATA/queries.parquet --teacher-queries EMB/queries \
        --ads-emb EMB/ads --dev-queries DEV/queries.parquet --dev-labels DEV/labels.parquet \
        --dev-teacher-queries EMB/queries_dev --out runs/align
    python -m pipelines.train --phase refine --init runs/align/model --queries DATA/queries.parquet \
        --labels DATA/labels.parquet --teacher-queries EMB/queries --ads-emb EMB/ads --out runs/refine
    python -m pipelines.train --phase prune --init runs/align/model --set "train.prune_schedule=[4, 2]" …
    python -m pipelines.train --phase teacher --queries … --labels … --ads DATA/ads.parquet --out runs/teacher
    ray job submit --working-dir . -- python -m pipelines.train --phase align … --set cluster.num_workers=4

Inputs per phase (anything else is refused): align and prune need `--queries` and `--teacher-queries`
(`--ads-emb` for score_kl); refine needs `--queries --labels --teacher-queries --ads-emb` (hard negatives are
mined from a Flat index of the teacher ads); teacher needs `--queries --labels --ads` (and mines hard negatives
when `--teacher-queries --ads-emb` are given). `--dev-queries --dev-labels` evaluate the result over the teacher
ad embeddings (`--dev-teacher-queries` adds the teacher row and `recovery/*`).

The driver reads the (small) inputs and runs one `TorchTrainer` of `cluster.num_workers` workers. Each rank
trains on every n-th row (equal shards; `train.batch_size` is per worker) and gradients are averaged across ranks before
every optimizer step, which is data-parallel SGD as DDP does it, without wrapping the encoder (the hlm loops call
the encoder directly, so a DDP wrapper would never see a forward pass). Contrastive in-batch negatives stay
per rank. Every `train.checkpoint_every` steps and at the end rank 0 reports a checkpoint that
`hlm.train.load_checkpoint` reads; running again with `--run-name NAME` (same `cluster.storage_path`) resumes
from the newest one. Writes OUT/model (an encoder folder), OUT/metrics.json, OUT/prune/layers-N (phase prune).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hlm.cli import init_ray, job_parser, start_job
from hlm.config import Config, ModelRef, Runtime
from hlm.data import DataError, qrels_from_labels, read_ads, read_embeddings, read_labels, read_queries
from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.mining import Pairs, mine_hard_negatives, positive_pairs
from hlm.pretrained import WeightsError, resolve_model
from hlm.pruning import num_layers, prune_layers, train_prune
from hlm.space import SpaceMismatch, check_same_space
from hlm.train import (
    TRAINER_STATE,
    evaluate_retrieval,
    load_checkpoint,
    prepare_student,
    save_checkpoint,
    total_steps,
    train_align,
    train_refine,
    train_teacher,
    truncated_space,
)

logger = logging.getLogger("pipelines.train")
PHASES = ("teacher", "align", "prune", "refine")
# Flags each phase must have and may have (beyond --dev-*); the rest are refused rather than silently ignored.
NEEDS = {"align": {"queries", "teacher_queries"}, "prune": {"queries", "teacher_queries"},
         "refine": {"queries", "labels", "teacher_queries", "ads_emb"}, "teacher": {"queries", "labels", "ads"}}
MAY = {"align": {"ads_emb"}, "prune": {"ads_emb"}, "refine": set(), "teacher": {"teacher_queries", "ads_emb"}}


@dataclass
class PhaseData:
    """What the workers train on; per-row fields are sharded across ranks, the rest are shared."""

    queries: list[str]
    teacher_q_emb: np.ndarray | None = None  # (n, D) teacher embedding of queries[i]
    positive_ad_idx: np.ndarray | None = None  # (n,) rows of ad_emb (refine)
    hard_negative_idx: np.ndarray | None = None  # (n, K) rows of ad_emb (refine)
    positive_texts: list[str] | None = None  # (n,) ad texts (teacher)
    hard_negative_texts: list[list[str]] | None = None  # (n, K) ad texts (teacher)
    ad_emb: np.ndarray | None = field(default=None, metadata={"shared": True})  # (N, D) frozen teacher ads
    teacher_space: str | None = field(default=None, metadata={"shared": True})

    def shard(self, rank: int, world: int) -> PhaseData:
        """Rows rank, rank + world, …: equal-sized shards (the last n mod world rows are dropped) so every rank
        takes the same number of steps and reaches each `ray.train.report` barrier."""
        n = len(self.queries) // world
        if n == 0:
            raise ValueError(f"{len(self.queries)} training rows cannot be split over {world} workers")
        rows = np.arange(rank, n * world, world)
        cut = {f.name: _take(getattr(self, f.name), rows) for f in fields(self)
               if not f.metadata.get("shared") and getattr(self, f.name) is not None}
        return replace(self, **cut)


def _take(values: Any, rows: np.ndarray) -> Any:
    return values[rows] if isinstance(values, np.ndarray) else [values[i] for i in rows]


# ---------------------------------------------------------------------------------------------- driver: inputs


def _by_id(ids: list[str], emb: np.ndarray, wanted: list[str], source: Path) -> np.ndarray:
    """Rows of emb for `wanted` ids, in that order; an id without an embedding is an error naming the file."""
    row = {q: i for i, q in enumerate(ids)}
    missing = [q for q in wanted if q not in row]
    if missing:
        raise DataError(f"{source}: no embedding for {len(missing)} of {len(wanted)} queries (e.g. {missing[:3]})")
    return emb[[row[q] for q in wanted]]


def _mined(pairs: Pairs, labels: pa.Table, q_emb: np.ndarray, ad_ids: list[str], ad_emb: np.ndarray,
           space: str) -> Pairs:
    """Hard negatives from a Flat teacher index; every ad labelled > 0 for the query is kept out of them."""
    row = {a: i for i, a in enumerate(ad_ids)}
    relevant: dict[str, set[int]] = {}
    for q, a, y in zip(*(labels[c].to_pylist() for c in ("query_id", "ad_id", "label")), strict=True):
        if y > 0 and a in row:
            relevant.setdefault(q, set()).add(row[a])
    return mine_hard_negatives(pairs, q_emb, AdIndex.build(ad_ids, ad_emb, space, "Flat"), relevant)


def read_inputs(phase: str, args: argparse.Namespace, objective: str) -> PhaseData:
    """Read and join the phase's inputs in the driver; raises DataError / SpaceMismatch naming the file."""
    queries = read_queries(args.queries)
    qids, texts = queries["query_id"].to_pylist(), queries["text"].to_pylist()
    teacher = ads = None
    if args.teacher_queries:
        t_ids, t_emb, t_space = read_embeddings(args.teacher_queries)
        teacher = (t_ids, t_emb, t_space["fingerprint"])
    if args.ads_emb:
        ad_ids, ad_emb, a_space = read_embeddings(args.ads_emb)
        ads = (ad_ids, ad_emb, a_space["fingerprint"])
        if teacher is not None:
            check_same_space(ads[2], teacher[2], f"--teacher-queries {args.teacher_queries} vs --ads-emb "
                                                 f"{args.ads_emb}")
    if phase in ("align", "prune"):
        return PhaseData(texts, _by_id(teacher[0], teacher[1], qids, args.teacher_queries),  # ads: score_kl only
                         ad_emb=ads[1] if objective == "score_kl" else None, teacher_space=teacher[2])
    labels = read_labels(args.labels)
    if phase == "refine":
        pairs = _with_file(args.labels, lambda: positive_pairs(queries, labels, ads[0]))
        pair_q = _by_id(teacher[0], teacher[1], pairs.query_ids, args.teacher_queries)
        pairs = _mined(pairs, labels, pair_q, *ads)
        return PhaseData(pairs.queries, pair_q, pairs.positive_ad_idx, pairs.hard_negative_idx, ad_emb=ads[1],
                         teacher_space=teacher[2])
    # teacher: texts of the positive (and mined) ads; rows index the ad embeddings when mining, else the ads file
    ad_table = read_ads(args.ads)
    ad_text = dict(zip(ad_table["ad_id"].to_pylist(), ad_table["text"].to_pylist(), strict=True))
    ad_ids = ads[0] if ads is not None else ad_table["ad_id"].to_pylist()
    pairs = _with_file(args.labels, lambda: positive_pairs(queries, labels, ad_ids))
    if ads is not None and teacher is not None:
        pairs = _mined(pairs, labels, _by_id(teacher[0], teacher[1], pairs.query_ids, args.teacher_queries), *ads)
    missing = {ad_ids[i] for i in np.unique(np.concatenate([pairs.positive_ad_idx.ravel(), *(
        [] if pairs.hard_negative_idx is None else [pairs.hard_negative_idx.ravel()])]))} - ad_text.keys()
    if missing:
        raise DataError(f"{args.ads}: no text for {len(missing)} ad(s) used in training (e.g. {sorted(missing)[:3]})")
    hard = None if pairs.hard_negative_idx is None else [[ad_text[ad_ids[j]] for j in row]
                                                         for row in pairs.hard_negative_idx]
    return PhaseData(pairs.queries, positive_texts=[ad_text[ad_ids[i]] for i in pairs.positive_ad_idx],
                     hard_negative_texts=hard)


def _with_file(path: Path, build: Any) -> Any:
    try:
        return build()
    except ValueError as e:  # positive_pairs: a label names an ad that has no embedding / text
        raise DataError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: load (or resume), train this rank's shard with the hlm loop, report checkpoints."""
    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data: PhaseData = ray.get(config["data"]).shard(rank, world)
    runtime = Runtime(device="cuda" if cfg.cluster.use_gpu else "cpu", dtype=cfg.runtime.dtype)
    torch.manual_seed(cfg.seed)  # a fresh projection head starts identical on every rank (and is broadcast too)

    checkpoint = ray.train.get_checkpoint()
    start_step, optimizer_state = 0, None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            encoder, optimizer_state, start_step = load_checkpoint(folder, runtime)
        logger.info("rank %d resumes from step %d", rank, start_step)
    else:
        encoder = Encoder.load(ModelRef.model_validate(config["init"]), runtime)
    if cfg.train.phase != "teacher":  # up front, so the encoder we checkpoint is the one fit trains
        encoder = prepare_student(encoder, data.ad_emb.shape[1] if data.ad_emb is not None
                                  else data.teacher_q_emb.shape[1], cfg.train.width, teacher_space=data.teacher_space)
    hook = _data_parallel(encoder, world)
    try:
        if cfg.train.phase == "prune":
            _prune(encoder, data, cfg, checkpoint is not None, world, rank)
        else:
            _train(encoder, data, cfg, start_step, optimizer_state, world, rank)
    finally:
        if hook is not None:
            hook.remove()


def _data_parallel(encoder: Encoder, world: int) -> Any:
    """With > 1 rank: start from rank 0's weights and average gradients over ranks before each optimizer step.

    A global optimizer step pre-hook rather than DDP, because the hlm loops call the encoder itself (and prune
    trains fresh copies); it sends one flat buffer per step. Gradient clipping in `fit` runs just before the
    step, so each rank's gradient is clipped before averaging (the average is still within `grad_clip`).
    """
    if world == 1:
        return None
    _broadcast(encoder)

    def average(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        dist.all_reduce(has_grad)  # a parameter with a gradient on any rank is averaged on all (zeros elsewhere)
        grads = []
        for p, n in zip(params, has_grad.tolist(), strict=True):
            if n and p.grad is None:
                p.grad = torch.zeros_like(p)
            if n:
                grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(summed / world)

    return register_optimizer_step_pre_hook(average)


def _broadcast(encoder: Encoder) -> None:
    for tensor in encoder.state_dict().values():
        dist.broadcast(tensor, src=0)


def _report(metrics: dict[str, Any], world: int, rank: int, write: Any = None, name: str | None = None) -> None:
    """ray.train.report on every rank (a barrier); losses averaged over ranks; rank 0 attaches the checkpoint
    that `write(folder)` saves."""
    losses = [k for k in ("loss", "first_loss") if k in metrics]
    if world > 1 and losses:
        t = torch.tensor([metrics[k] for k in losses], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        metrics = {**metrics, **{k: v / world for k, v in zip(losses, t.tolist(), strict=True)}}
    if rank != 0 or write is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write(Path(tmp) / "checkpoint")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def _train(encoder: Encoder, data: PhaseData, cfg: Config, start_step: int, optimizer_state: dict | None,
           world: int, rank: int) -> None:
    job = cfg.train
    total, first = total_steps(len(data.queries), job), {}

    def on_step(step: int, metrics: dict[str, Any], state_fn: Any) -> None:
        first.setdefault("loss", metrics["loss"])
        if step != total and not (job.checkpoint_every and step % job.checkpoint_every == 0):
            return
        out = {"step": step, "start_step": start_step, "loss": metrics["loss"], "first_loss": first["loss"],
               "lr": metrics["lr"], "samples_per_s": metrics["samples_per_s"] * world, "workers": world}
        _report(out, world, rank, lambda folder: save_checkpoint(folder, encoder, state_fn()["optimizer"], step, job,
                                                                 encoder.settings.target_space), f"step-{step:07d}")

    common = {"on_step": on_step, "start_step": start_step, "optimizer_state": optimizer_state}
    if job.phase == "align":
        train_align(encoder, data.queries, data.teacher_q_emb, job, ad_emb=data.ad_emb,
                    teacher_space=data.teacher_space, **common)
    elif job.phase == "refine":
        train_refine(encoder, data.queries, data.positive_ad_idx, data.ad_emb, job,
                     hard_negative_idx=data.hard_negative_idx, teacher_q_emb=data.teacher_q_emb,
                     teacher_space=data.teacher_space, **common)
    else:
        train_teacher(encoder, data.queries, data.positive_texts, job, hard_negative_texts=data.hard_negative_texts,
                      **common)


def _prune(encoder: Encoder, data: PhaseData, cfg: Config, resumed: bool, world: int, rank: int) -> None:
    """One `train_prune` call per schedule entry, so each `layers-N` folder is reported as its own checkpoint."""
    job, runtime = cfg.train, Runtime(device=encoder.device.type, dtype=cfg.runtime.dtype)
    per_stage, every = job.steps_per_prune, job.checkpoint_every
    todo = [n for n in job.prune_schedule if n < num_layers(encoder)]  # train_prune would skip the others
    done = len(job.prune_schedule) - len(todo) if resumed else 0  # stages a resumed run already has
    start_step = done * per_stage  # a layers-N checkpoint's own step counts its stage only
    for n in todo:
        offset, stats = done * per_stage, {}

        def on_step(step: int, metrics: dict[str, Any], _: Any, offset: int = offset, stats: dict = stats) -> None:
            stats.setdefault("first_loss", metrics["loss"])
            stats.update(loss=metrics["loss"], lr=metrics["lr"], samples_per_s=metrics["samples_per_s"] * world)
            if every and step % every == 0 and step % per_stage:  # progress only; the stage end reports below
                _report({"step": offset + step, "n_layers": n, **stats}, world, rank)

        with tempfile.TemporaryDirectory() as tmp:
            [folder] = train_prune(encoder, data.queries, data.teacher_q_emb, job.model_copy(
                update={"prune_schedule": [n]}), tmp, ad_emb=data.ad_emb, teacher_space=data.teacher_space,
                on_step=on_step)
            done += 1
            _report({"step": done * per_stage, "start_step": start_step, "n_layers": n, "workers": world, **stats},
                    world, rank, lambda _, folder=folder: folder, f"layers-{n}")
            # HF save_pretrained writes on torch.distributed rank 0 only: the other ranks take its weights
            encoder = load_checkpoint(folder, runtime)[0] if rank == 0 else prune_layers(encoder, n)
        if world > 1:
            _broadcast(encoder)


# ---------------------------------------------------------------------------------------------- driver: run


def run_train(cfg: Config, init: ModelRef, data: PhaseData, run_name: str) -> ray.train.Result:
    c = cfg.cluster
    storage = c.storage_path if "://" in c.storage_path else str(Path(c.storage_path).resolve())
    keep = None if cfg.train.phase == "prune" else c.num_to_keep  # every layers-N stage is a result to keep
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "init": init.model_dump(mode="json"),
                           "data": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=keep),
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    return trainer.fit()


def _copy_model(checkpoint: Checkpoint, dst: Path) -> Path:
    """A checkpoint as a plain encoder folder (no optimizer state), replacing dst whole."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    (tmp / TRAINER_STATE).unlink(missing_ok=True)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def evaluate_dev(cfg: Config, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Dev P@k & co. of the trained model over the teacher ad embeddings, the teacher's row, and recovery/*.

    Phase teacher changes the space, so its model re-embeds the `--ads` texts and is compared with the teacher
    it started from (when `--ads-emb --dev-teacher-queries` are given).
    """
    queries = read_queries(args.dev_queries)
    qids, texts = queries["query_id"].to_pylist(), queries["text"].to_pylist()
    qrels, k = qrels_from_labels(read_labels(args.dev_labels)), cfg.train.eval_k
    usable = cfg.runtime.device != "cuda" or torch.cuda.is_available()  # a CPU head node evaluates on CPU
    encoder = Encoder.load(model, cfg.runtime if usable else Runtime())
    teacher = None
    if args.ads_emb:
        ad_ids, ad_emb, space = read_embeddings(args.ads_emb)
        if args.dev_teacher_queries:
            t_ids, t_emb, _ = read_embeddings(args.dev_teacher_queries)
            teacher = evaluate_retrieval(_by_id(t_ids, t_emb, qids, args.dev_teacher_queries), qids, ad_emb, ad_ids,
                                         qrels, k)
    if cfg.train.phase == "teacher":
        ad_table = read_ads(args.ads)
        ad_ids, ad_emb = ad_table["ad_id"].to_pylist(), encoder.encode(ad_table["text"].to_pylist(), kind="ad")
    elif encoder.dim != ad_emb.shape[1]:  # truncate mode: the student's space is the teacher's first d dims
        check_same_space(truncated_space(space["fingerprint"], encoder.dim), encoder.space, f"model {model}")
        ad_emb = ad_emb[:, :encoder.dim] / np.linalg.norm(ad_emb[:, :encoder.dim], axis=1, keepdims=True)
    else:
        check_same_space(space["fingerprint"], encoder.space, f"model {model}")
    reference = {name: v for name, v in (teacher or {}).items() if v > 0}  # recovery is undefined over a 0
    student = evaluate_retrieval(encoder.encode(texts), qids, ad_emb, ad_ids, qrels, k, teacher_metrics=reference)
    return {"dev": student, **({"dev_teacher": teacher} if teacher else {})}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=PHASES, help="default: train.phase of the config")
    parser.add_argument("--out", required=True, type=Path, help="output folder: model/, metrics.json, prune/")
    parser.add_argument("--init", help="encoder to start from (default: config student, or teacher for --phase "
                        "teacher); ignored when resuming")
    parser.add_argument("--run-name", help="Ray Train run to resume (default: a new unique run)")
    data = parser.add_argument_group("data (Parquet files or folders; which ones depends on the phase)")
    data.add_argument("--queries", type=Path, help="training queries (queries contract)")
    data.add_argument("--teacher-queries", type=Path, help="teacher embeddings of --queries (pipelines.embed)")
    data.add_argument("--ads-emb", type=Path, help="teacher ad embeddings (refine, score_kl, hard negatives, eval)")
    data.add_argument("--labels", type=Path, help="labels of --queries (refine, teacher)")
    data.add_argument("--ads", type=Path, help="ad texts (teacher)")
    data.add_argument("--dev-queries", type=Path, help="held-out queries to evaluate on at the end")
    data.add_argument("--dev-labels", type=Path, help="labels of --dev-queries")
    data.add_argument("--dev-teacher-queries", type=Path, help="teacher embeddings of --dev-queries")
    args = parser.parse_args(argv)
    if args.phase:  # through the config, so the saved config says which phase ran
        args.overrides = [f"train.phase={args.phase}", *args.overrides]
    args.parser = parser
    return args


def check_flags(phase: str, args: argparse.Namespace, cfg: Config) -> None:
    if phase == "prune" and not cfg.train.prune_schedule:
        args.parser.error("phase prune needs train.prune_schedule, e.g. --set 'train.prune_schedule=[4, 2]'")
    given = {name for name in ("queries", "teacher_queries", "ads_emb", "labels", "ads") if getattr(args, name)}
    flag = lambda names: ", ".join(sorted("--" + n.replace("_", "-") for n in names))  # noqa: E731
    if missing := NEEDS[phase] - given:
        args.parser.error(f"phase {phase} needs {flag(missing)}")
    if unused := given - NEEDS[phase] - MAY[phase]:
        args.parser.error(f"phase {phase} does not use {flag(unused)}")
    if phase in ("align", "prune") and cfg.train.objective == "score_kl" and not args.ads_emb:
        args.parser.error("train.objective=score_kl needs --ads-emb")
    if phase == "teacher" and bool(args.teacher_queries) != bool(args.ads_emb):
        args.parser.error("hard negatives for phase teacher need both --teacher-queries and --ads-emb")
    if bool(args.dev_queries) != bool(args.dev_labels):
        args.parser.error("--dev-queries and --dev-labels go together")
    if args.dev_queries and phase != "teacher" and not args.ads_emb:
        args.parser.error(f"evaluating phase {phase} needs --ads-emb (the teacher ad embeddings)")
    if args.dev_teacher_queries and not (args.dev_queries and args.ads_emb):
        args.parser.error("--dev-teacher-queries needs --dev-queries, --dev-labels and --ads-emb")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    cfg = start_job("train", args)
    phase = cfg.train.phase
    check_flags(phase, args, cfg)  # before anything is written
    base = cfg.teacher if phase == "teacher" else cfg.student
    init = base.model_copy(update={"model": args.init}) if args.init else base
    try:
        resolve_model(init.model)
        data = read_inputs(phase, args, cfg.train.objective)
        for path in (args.dev_queries, args.dev_labels, args.dev_teacher_queries):  # fail now, not after training
            if path is not None and not path.exists():
                raise DataError(f"{path}: no such file")
    except (DataError, SpaceMismatch, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.save(out / "train.config.yaml")
    run_name = args.run_name or f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    init_ray(cfg.cluster.num_workers + 1)  # the trainer's coordinator takes a slot beside the workers
    started = time.perf_counter()
    try:
        result = run_train(cfg, init, data, run_name)
    except ray.train.TrainingFailedError as e:
        print(f"error: training run {run_name} failed: {e}", file=sys.stderr)
        return 1
    if result.checkpoint is None:
        print(f"error: training run {run_name} reported no checkpoint", file=sys.stderr)
        return 1
    seconds, m = time.perf_counter() - started, result.metrics or {}
    model = _copy_model(result.checkpoint, out / "model")
    record: dict[str, Any] = {
        "phase": phase, "run_name": run_name, "run_path": result.path, "model": str(model),
        "start_step": m.get("start_step"), "steps": m.get("step"), "first_loss": m.get("first_loss"),
        "final_loss": m.get("loss"), "samples_per_s": m.get("samples_per_s"), "workers": m.get("workers"),
        "seconds": round(seconds, 1)}
    if phase == "prune":
        stages = sorted(((c, r) for c, r in result.best_checkpoints or [] if "n_layers" in r),
                        key=lambda cr: -cr[1]["n_layers"])
        record["prune"] = {f"layers-{r['n_layers']}": str(_copy_model(c, out / "prune" / f"layers-{r['n_layers']}"))
                           for c, r in stages}
    if args.dev_queries:
        record |= evaluate_dev(cfg, model, args)
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    print(summary(record, out))
    return 0


def summary(r: dict[str, Any], out: Path) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"trained phase {r['phase']}: steps {r['start_step']} -> {r['steps']} on {r['workers']} worker(s) in "
             f"{r['seconds']:.0f}s, loss {fmt(r['first_loss'])} -> {fmt(r['final_loss'])}, "
             f"{r['samples_per_s'] or 0:.1f} samples/s"]
    if "dev" in r:
        dev = r["dev"]
        shown = [f"{name} {v:.4f}" for name, v in dev.items() if not name.startswith("recovery/")]
        lines.append("dev: " + ", ".join(shown))
        if "dev_teacher" in r:
            key = next(iter(r["dev_teacher"]))
            who = "starting teacher" if r["phase"] == "teacher" else "teacher"
            lines.append(f"{who} {key} {r['dev_teacher'][key]:.4f}; recovery {dev.get(f'recovery/{key}', 0):.1%}")
    lines += [f"stage: {p}" for p in r.get("prune", {}).values()]
    lines.append(f"wrote {r['model']} and {out / 'metrics.json'}; Ray run {r['run_name']} "
                 f"(resume: --run-name {r['run_name']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
