"""Embed ads or queries with an encoder on Ray Data: read → validate → encode in an actor pool → write.

    python -m pipelines.embed --model teacher-default --input DATA/ads.parquet --kind ads --out EMB/ads
    python -m pipelines.embed --model teacher-default --input s3://BUCKET/ads/ --kind ads --out /mnt/hlm/emb/ads
    ray job submit --runtime-env runtime_env.yaml -- python -m pipelines.embed --model … --input … --kind ads --out …

The input is a Parquet file or folder, local or an object-store URI (read through pyarrow.fs), streamed by
`ray.data.read_parquet`: the driver reads only the files' footers. The output folder appears only when complete
(exactly once): a rerun after a crash starts cleanly, and a rerun of the same input and model into a finished folder
does nothing and says so. It holds only embeddings (`pandas.read_parquet(OUT)` reads them); rows that fail
validation go beside it, to `OUT.rejected/`, with file, row and reason.

Writes OUT/ (Parquet files of `id`, `embedding`, and `_SUCCESS.json`: counts, model, space) and OUT.rejected/.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from hlm.cli import init_ray, job_parser, start_job
from hlm.config import Config, ModelRef
from hlm.data import DataError, embedding_schema, space_metadata
from hlm.embedding import EmbedBatch, InputFiles, InputKind, ValidateRows, input_files
from hlm.encoder import describe_space_of
from hlm.staging import OutputBusy, OutputExists, StagedOutput, job_key

logger = logging.getLogger("pipelines.embed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, __file__)
    parser.add_argument("--model", help="encoder folder or teacher-default/student-default (default: config teacher)")
    parser.add_argument("--input", required=True,
                        help="Parquet file or folder (ads or queries contract), local or a URI such as s3://…")
    parser.add_argument("--kind", required=True, choices=["ads", "queries"])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created when the job completes)")
    return parser.parse_args(argv)


def rejected_folder(out: Path) -> Path:
    """Where the rows that failed validation go: beside the output, so the output holds only embeddings."""
    return out.with_name(f"{out.name}.rejected")


def run_embed(cfg: Config, model: ModelRef, input_path: str | Path, kind: InputKind, out: Path) -> dict:
    """The job; returns the success record (also written to OUT/_SUCCESS.json)."""
    started = time.perf_counter()
    space = describe_space_of(model)  # part of the job key; read from settings, so the driver needs no GPU
    inputs = input_files(input_path, kind)
    staged = StagedOutput(out, job_key({"inputs": _identity(inputs), "space": space, "kind": kind}))
    rejected = StagedOutput(rejected_folder(out), staged.key)
    staged.lock()  # before finished(): a concurrent run that completes meanwhile is then seen, not overwritten
    try:  # the locks go with this run: a failed run in a long-lived process must not block the next one
        if (done := staged.finished()) is not None:
            print(f"nothing to do: {out} already holds this job's output ({done['rows_written']} rows)")
            return done
        staging, rejected_staging = staged.begin(), rejected.begin()
        shutil.rmtree(rejected.final, ignore_errors=True)  # a crashed run's: `out` itself is not there yet
        _write_embeddings(cfg, model, inputs, kind, space, staging, rejected_staging)
        n_rejected = sum(pq.read_metadata(f).num_rows for f in rejected_staging.glob("*.parquet"))
        expected = inputs.rows - n_rejected - inputs.deleted  # deleted rows are dropped before validation
        written = sum(pq.read_metadata(f).num_rows for f in staging.glob("*.parquet"))
        if written != expected:  # never publish a short or doubled folder
            raise RuntimeError(f"wrote {written} rows but {expected} were valid; {staging} left for inspection")
        seconds = time.perf_counter() - started
        record = {"rows_written": written, "rows_rejected": n_rejected, "seconds": round(seconds, 2),
                  "rows_per_s": round(written / seconds, 1), "space": space, "kind": kind, "inputs": inputs.paths}
        if n_rejected:  # first, so a complete `out` never lacks its rejected rows
            rejected.commit({**record, "rejected": True})
        else:
            shutil.rmtree(rejected_staging)
        staged.commit(record)
        print(f"embedded {written} {kind} ({n_rejected} rejected) in {seconds:.1f}s "
              f"= {written / seconds:.1f} rows/s; space {space['fingerprint']}, dim {space['dim']}; wrote {out}")
        if n_rejected:
            print(f"rejected rows with file, row and reason: {rejected.final}")
        return record
    finally:
        staged.release()
        rejected.release()


def _write_embeddings(cfg: Config, model: ModelRef, inputs: InputFiles, kind: InputKind, space: dict, staging: Path,
                      rejected_staging: Path) -> None:
    """The Ray Data pipeline: read in file order, validate (bad rows to `rejected_staging`), embed, write."""
    ds = ray.data.read_parquet(inputs.paths, filesystem=inputs.filesystem, include_paths=True)
    # in order, so that ValidateRows numbers each file's rows; set on this dataset's own copy of the DataContext,
    # not the process-wide one, so that jobs of a recipe's parallel stages do not change each other's settings
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(ValidateRows, fn_constructor_kwargs={"kind": kind, "rejected_dir": str(rejected_staging)},
                        batch_size=cfg.embed.batch_size * 8, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    # blocks of ~8 encoder batches: enough to keep every actor busy, small enough that progress moves
    ds = ds.repartition(target_num_rows_per_block=cfg.embed.batch_size * 8)
    ds = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model": model.model_dump(), "kind": kind, "batch_size": cfg.embed.batch_size,
                               "runtime": cfg.runtime.model_dump()},
        batch_size=cfg.embed.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=_fit_actor_pool(cfg.embed.num_actors, cfg.embed.num_cpus,
                                                                cfg.embed.num_gpus)),
        num_cpus=cfg.embed.num_cpus,
        num_gpus=cfg.embed.num_gpus,
        udf_modifying_row_count=False,
    )
    schema = embedding_schema(space["dim"]).with_metadata(space_metadata(space))
    ds.write_parquet(str(staging), schema=schema, max_rows_per_file=cfg.embed.rows_per_file, mode="overwrite")


def _identity(inputs: InputFiles) -> list[tuple[str, int | None, int | None]]:
    """(path, size, mtime_ns) of each input: a changed input file makes a new job key."""
    return [(info.path, info.size, info.mtime_ns) for info in inputs.filesystem.get_file_info(inputs.paths)]


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
    except (DataError, OutputBusy, OutputExists) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
