r"""Train one phase of the recipe on Ray Train (teacher | align | prune | refine), with checkpoints and resume.

    python -m pipelines.train --phase align --queries DATA/queries.parquet --teacher-queries EMB/queries \
        --ads-emb EMB/ads --dev-queries DEV/queries.parquet --dev-labels DEV/labels.parquet \
        --dev-teacher-queries EMB/queries_dev --out runs/align
    python -m pipelines.train --phase refine --init runs/align/model --queries DATA/queries.parquet \
        --labels DATA/labels.parquet --teacher-queries EMB/queries --ads-emb EMB/ads --out runs/refine
    python -m pipelines.train --phase prune --init runs/align/model --set "train.prune_schedule=[4, 2]" …
    python -m pipelines.train --phase teacher --queries … --labels … --ads DATA/ads.parquet --out runs/teacher
    ray job submit --runtime-env runtime_env.yaml -- python -m pipelines.train --phase align … \
        --set cluster.num_workers=4

Which inputs each phase needs is `hlm.phase_data`'s rule (anything else is refused); `--dev-queries
--dev-labels` evaluate the result over the teacher ad embeddings (`--dev-teacher-queries` adds the teacher row
and `recovery/*`).

Load → train → write. The driver reads the (small) inputs once and runs one `TorchTrainer` of `cluster.num_workers`
workers (`hlm.train_worker`). Each rank trains the phase's hlm loop on every n-th row (`train.batch_size` is per
worker); the loop runs its forward passes through DistributedDataParallel over the process group Ray Train set up
(gloo on CPU, NCCL on GPU), so gradients are averaged in backward. Contrastive phases gather the batch over ranks,
so every rank's pairs are in-batch negatives (num_workers × batch_size of them). Every `train.checkpoint_every`
steps and at the end rank 0 reports a checkpoint that `hlm.checkpoint.load_checkpoint` reads; running again with
`--run-name NAME` (same `cluster.storage_path`) resumes from the newest one.

Writes OUT/model (an encoder folder), OUT/metrics.json, OUT/prune/layers-N (prune), and OUT/loss.csv (one row per
optimizer step: step, phase, loss, lr, loss/<term> for a loss of several terms; `hlm.loss_log`) with its plot
OUT/loss.png.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from argparse import Namespace
from dataclasses import fields
from pathlib import Path
from typing import Any

import ray
from ray.train import Checkpoint

from hlm.checkpoint import TRAINER_STATE
from hlm.cli import init_ray, job_parser, start_job
from hlm.config import Config, ModelRef, Phase
from hlm.data import DataError
from hlm.evaluation import evaluate_dev
from hlm.loss_log import LOSS_CSV, LOSS_PNG, LossLog
from hlm.phase_data import PhaseData, PhaseInputs, input_problem, read_phase_data
from hlm.pretrained import WeightsError, portable, resolve_model
from hlm.space import SpaceMismatch
from hlm.train_worker import run_train


def _copy_model(checkpoint: Checkpoint, dst: Path) -> Path:
    """A checkpoint as a plain encoder folder (no trainer state, no loss record), replacing dst whole."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    (tmp / TRAINER_STATE).unlink(missing_ok=True)
    (tmp / LOSS_CSV).unlink(missing_ok=True)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def parse_args(argv: list[str] | None) -> Namespace:
    parser = job_parser(__doc__, __file__)
    parser.add_argument("--phase", choices=[p.value for p in Phase], help="default: train.phase of the config")
    parser.add_argument("--out", required=True, type=Path, help="output folder: model/, metrics.json, loss.csv, "
                        "loss.png, prune/")
    parser.add_argument("--init", help="encoder to start from (default: config student, or teacher for --phase "
                        "teacher); ignored when resuming")
    parser.add_argument("--run-name", help="Ray Train run to resume (default: a new unique run)")
    data = parser.add_argument_group("data (Parquet files or folders; which ones depends on the phase)")
    data.add_argument("--queries", type=Path, help="training queries (queries contract)")
    data.add_argument("--teacher-queries", type=Path, help="teacher embeddings of --queries (pipelines.embed)")
    data.add_argument("--ads-emb", type=Path, help="teacher ad embeddings (refine, score_kl, hard negatives, eval)")
    data.add_argument("--labels", type=Path, help="labels of --queries (refine, teacher)")
    data.add_argument("--ads", type=Path, help="ad texts (teacher; align, prune: align on them too)")
    data.add_argument("--dev-queries", type=Path, help="held-out queries to evaluate on at the end")
    data.add_argument("--dev-labels", type=Path, help="labels of --dev-queries")
    data.add_argument("--dev-teacher-queries", type=Path, help="teacher embeddings of --dev-queries")
    args = parser.parse_args(argv)
    if args.phase:  # through the config, so the saved config says which phase ran
        args.overrides = [f"train.phase={args.phase}", *args.overrides]
    args.parser = parser
    return args


class TrainingFailed(RuntimeError):
    """The Ray Train run failed (after its retries) or reported no checkpoint."""


JOB_ERRORS = (DataError, SpaceMismatch, WeightsError, TrainingFailed)  # what a training job reports and exits on


def report_error(error: Exception) -> int:
    """Print one of JOB_ERRORS; the exit code: 1 when training failed, 2 for bad input, a model or a space."""
    print(f"error: {error}", file=sys.stderr)
    return 1 if isinstance(error, TrainingFailed) else 2


def read_inputs(cfg: Config, init: ModelRef, inputs: PhaseInputs) -> PhaseData:
    """Check and read everything the phase needs before anything is written; raises DataError, SpaceMismatch or
    WeightsError naming the file or model."""
    resolve_model(init.model)
    data = read_phase_data(cfg.train, inputs)
    for path in (inputs.dev_queries, inputs.dev_labels, inputs.dev_teacher_queries):  # fail now, not later
        if path is not None and not path.exists():
            raise DataError(f"{path}: no such file")
    return data


def train_phase(cfg: Config, init: ModelRef, inputs: PhaseInputs, out: Path, run_name: str) -> dict[str, Any]:
    """Train `cfg.train.phase` from `init` on Ray Train (the run `run_name` resumes if it exists); write OUT/model,
    OUT/prune/layers-N (prune) and OUT/metrics.json (with the dev evaluation when asked); return that record."""
    # 1. load: inputs, checked before anything is written
    data = read_inputs(cfg, init, inputs)
    cfg.save(out / "train.config.yaml")
    # 2. train the phase on Ray Train
    init_ray(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1)  # + a slot for the trainer's coordinator
    started = time.perf_counter()
    try:
        result = run_train(cfg, init, data, run_name)
    except ray.train.TrainingFailedError as e:
        raise TrainingFailed(f"training run {run_name} failed: {e}") from e
    if result.checkpoint is None:
        raise TrainingFailed(f"training run {run_name} reported no checkpoint")
    # 3. write: the model, the prune stages, metrics (with dev evaluation)
    seconds, m, phase = time.perf_counter() - started, result.metrics or {}, cfg.train.phase
    with result.checkpoint.as_directory() as folder:  # the last checkpoint holds the record of every step
        log = LossLog.read_csv(Path(folder) / LOSS_CSV, phase.value)
    log.write_csv(out / LOSS_CSV)
    log.plot(out / LOSS_PNG)
    model = _copy_model(result.checkpoint, out / "model")
    record: dict[str, Any] = {
        "phase": phase, "run_name": run_name, "run_path": result.path, "model": str(model),
        "start_step": m.get("start_step"), "steps": m.get("step"), "first_loss": m.get("first_loss"),
        "final_loss": m.get("loss"), "samples_per_s": m.get("samples_per_s"), "workers": m.get("workers"),
        "seconds": round(seconds, 1), "loss_csv": str(out / LOSS_CSV), "loss_plot": str(out / LOSS_PNG)}
    if phase is Phase.prune:
        stages = sorted(((c, r) for c, r in result.best_checkpoints or [] if "n_layers" in r),
                        key=lambda cr: -cr[1]["n_layers"])
        record["prune"] = {f"layers-{r['n_layers']}": str(_copy_model(c, out / "prune" / f"layers-{r['n_layers']}"))
                           for c, r in stages}
    if inputs.dev_queries:
        record |= evaluate_dev(model, phase, inputs, cfg.train.eval_k, cfg.runtime)
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    cfg = start_job("train", args)
    inputs = PhaseInputs(**{f.name: getattr(args, f.name) for f in fields(PhaseInputs)})
    if problem := input_problem(cfg.train, inputs, lambda name: "--" + name.replace("_", "-")):
        args.parser.error(problem)
    base = cfg.teacher if cfg.train.phase is Phase.teacher else cfg.student
    init = base.model_copy(update={"model": portable(args.init or base.model)})
    run_name = args.run_name or f"{cfg.train.phase}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        record = train_phase(cfg, init, inputs, out, run_name)
    except JOB_ERRORS as e:
        return report_error(e)
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
            who = "starting teacher" if r["phase"] == Phase.teacher else "teacher"
            lines.append(f"{who} {key} {r['dev_teacher'][key]:.4f}; recovery {dev.get(f'recovery/{key}', 0):.1%}")
    lines += [f"stage: {p}" for p in r.get("prune", {}).values()]
    lines.append(f"wrote {r['model']}, {out / 'metrics.json'}, the loss per step {r['loss_csv']} and its plot "
                 f"{r['loss_plot']}; Ray run {r['run_name']} "
                 f"(resume: --run-name {r['run_name']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
