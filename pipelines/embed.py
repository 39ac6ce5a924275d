"""Embed ads or queries with an encoder on Ray Data: read → validate → encode in an actor pool → write.

    python -m pipelines.embed --model teacher-default --input DATA/ads.parquet --kind ads --out EMB/ads
    ray job submit --runtime-env runtime_env.yaml -- python -m pipelines.embed --model … --input … --kind ads --out …

The output folder appears only when complete (exactly once): a rerun after a crash starts cleanly,
and a rerun of the same input and model into a finished folder does nothing and says so. Rows that
fail validation go to `OUT/rejected/rejected.parquet` with file, row and reason.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from hlm.cli import init_ray, job_parser, start_job
from hlm.config import Config, ModelRef
from hlm.data import DataError, embedding_schema, space_metadata
from hlm.embedding import EmbedBatch, InputKind, validate_inputs
from hlm.encoder import describe_space_of
from hlm.staging import OutputExists, StagedOutput, file_identity, job_key

logger = logging.getLogger("pipelines.embed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", help="encoder folder or teacher-default/student-default (default: config teacher)")
    parser.add_argument("--input", required=True, type=Path, help="Parquet file or folder (ads or queries contract)")
    parser.add_argument("--kind", required=True, choices=["ads", "queries"])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created when the job completes)")
    return parser.parse_args(argv)


def run_embed(cfg: Config, model: ModelRef, input_path: Path, kind: InputKind, out: Path) -> dict:
    """The job; returns the success record (also written to OUT/_SUCCESS.json)."""
    started = time.perf_counter()
    space = describe_space_of(model)  # part of the job key; read from settings, so the driver needs no GPU
    inputs = validate_inputs(input_path, kind)
    staged = StagedOutput(out, job_key({"inputs": file_identity(inputs.files), "space": space, "kind": kind}))
    if (done := staged.finished()) is not None:
        print(f"nothing to do: {out} already holds this job's output ({done['rows_written']} rows)")
        return done
    staging = staged.begin()

    actors = _fit_actor_pool(cfg.embed.num_actors, cfg.embed.num_cpus, cfg.embed.num_gpus)
    # blocks of ~8 encoder batches: enough to keep every actor busy, small enough that progress moves
    blocks = max(actors * 4, math.ceil(inputs.rows.num_rows / (cfg.embed.batch_size * 8)))
    ds = ray.data.from_arrow(inputs.rows).repartition(blocks)
    ds = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model": model.model_dump(), "kind": kind, "batch_size": cfg.embed.batch_size,
                               "runtime": cfg.runtime.model_dump()},
        batch_size=cfg.embed.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.embed.num_cpus,
        num_gpus=cfg.embed.num_gpus,
        udf_modifying_row_count=False,
    )
    schema = embedding_schema(space["dim"]).with_metadata(space_metadata(space))
    ds.write_parquet(str(staging), schema=schema, max_rows_per_file=cfg.embed.rows_per_file, mode="overwrite")

    if inputs.rejected.num_rows:
        (staging / "rejected").mkdir()
        pq.write_table(inputs.rejected, staging / "rejected" / "rejected.parquet")
    written = sum(pq.read_metadata(f).num_rows for f in staging.glob("*.parquet"))
    if written != inputs.rows.num_rows:  # never publish a short or doubled folder
        raise RuntimeError(f"wrote {written} rows but {inputs.rows.num_rows} were valid; {staging} left for inspection")
    seconds = time.perf_counter() - started
    record = {"rows_written": written, "rows_rejected": inputs.rejected.num_rows, "seconds": round(seconds, 2),
              "rows_per_s": round(written / seconds, 1), "space": space, "kind": kind,
              "inputs": [str(f) for f in inputs.files]}
    staged.commit(record)
    print(f"embedded {written} {kind} ({inputs.rejected.num_rows} rejected) in {seconds:.1f}s "
          f"= {written / seconds:.1f} rows/s; space {space['fingerprint']}, dim {space['dim']}; wrote {out}")
    if inputs.rejected.num_rows:
        print(f"rejected rows and reasons: {out / 'rejected' / 'rejected.parquet'}")
    return record


def _fit_actor_pool(actors: int, cpus: float, gpus: float) -> int:
    """Shrink a CPU actor pool that would take every CPU: Ray Data then has no slot to read or write and hangs."""
    total = ray.cluster_resources().get("CPU", 0.0)
    if gpus == 0 and cpus > 0 and actors * cpus > total - 1:
        fitted = max(1, int((total - 1) // cpus))
        if fitted < actors:
            logger.warning("embed.num_actors=%d x num_cpus=%g leaves no CPU for reading and writing on this "
                           "%g-CPU cluster; using %d actor(s)", actors, cpus, total, fitted)
            return fitted
    return actors


def local_pool_cpus(cfg: Config) -> float:
    """CPUs a local cluster needs for the configured actor pool plus one slot for reading and writing."""
    return cfg.embed.num_actors * cfg.embed.num_cpus + 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = start_job("embed", args)
    model = cfg.teacher.model_copy(update={"model": args.model}) if args.model else cfg.teacher
    init_ray(local_pool_cpus(cfg), log_to_driver=False)
    try:
        run_embed(cfg, model, args.input, args.kind, args.out)
    except (DataError, OutputExists) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
