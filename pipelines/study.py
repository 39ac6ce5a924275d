r"""The design study: a sweep of alignment choices as Ray Tune trials, gathered into one report and Pareto plot.

    python -m pipelines.study --config configs/study.yaml \
        --queries TRAIN/queries.parquet --teacher-queries EMB/queries_train --ads-emb EMB/ads \
        --dev-queries DEV/queries.parquet --dev-labels DEV/labels.parquet --dev-teacher-queries EMB/queries_dev \
        --out runs/study

Each trial (`hlm.study.run_trial`) aligns a fresh `student` with one setting of the `study` axes and is
scored on dev over the teacher's full ad index. Trials run one at a time so their latencies are measured
on the same idle cores as the teacher's.

Writes OUT/study.md, OUT/study.json and OUT/pareto.png.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from ray import tune

from hlm.cli import init_ray, job_parser, start_job
from hlm.data import DataError
from hlm.encoder import Encoder
from hlm.evaluation import encoder_speed
from hlm.pretrained import portable
from hlm.study import StudyConfig, StudyInputs, Trial, dev_split, run_trial, teacher_quality, trials, write_study_report


def parse_args(argv: list[str] | None):
    parser = job_parser(__doc__, __file__)
    for flag, what in (("--queries", "train queries (the unlabelled alignment set)"),
                       ("--teacher-queries", "teacher embeddings of the train queries (pipelines.embed)"),
                       ("--ads-emb", "teacher ad embeddings: the index every trial searches"),
                       ("--dev-queries", "dev queries"), ("--dev-labels", "dev labels"),
                       ("--dev-teacher-queries", "teacher embeddings of the dev queries")):
        parser.add_argument(flag, required=True, type=Path, help=what)
    parser.add_argument("--out", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    cfg: StudyConfig = start_job("study", args, out, schema=StudyConfig)
    cfg.student.model = portable(cfg.student.model)  # each trial loads it in a Tune worker's own directory
    inputs = StudyInputs(*(p.resolve() for p in (args.queries, args.teacher_queries, args.ads_emb, args.dev_queries,
                                                  args.dev_labels, args.dev_teacher_queries)))
    try:  # the teacher's side once, in the driver, before any trial competes for the cores
        _, dev_texts, _ = dev_split(inputs)
        teacher = {"quality": teacher_quality(inputs), "speed": encoder_speed(
            Encoder.load(cfg.teacher, cfg.runtime), dev_texts[:cfg.study.latency_queries],
            n_latency=cfg.study.latency_queries)}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid = trials(cfg.study)
    print(f"study: {len(grid)} trials ({cfg.study.design}): " + ", ".join(t.name for t in grid))

    def trainable(params: dict) -> None:
        tune.report({"study": run_trial(Trial(**params["trial"]), cfg, inputs, teacher["quality"])})

    init_ray(cfg.study.cpus_per_trial + 1)
    started = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.study.cpus_per_trial}),
        param_space={"trial": tune.grid_search([asdict(t) for t in grid])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name=f"study-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(out / "tune")),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    done = [r.metrics["study"] for r in results if r.error is None]
    if not done:
        print(f"error: all {len(failed)} trials failed; first error: {failed[0].error}", file=sys.stderr)
        return 1
    paths = write_study_report(done, teacher, out)
    print(paths["md"].read_text())
    print(f"{len(done)} trials in {time.perf_counter() - started:.0f}s ({len(failed)} failed); "
          f"wrote {paths['md']}, {paths['json']} and {paths['plot']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
