"""The whole HARNESS-LM recipe as one resumable job: teacher → embeddings → align → prune → refine → report.

    python -m pipelines.recipe --config configs/recipe.yaml
    ray job submit --runtime-env runtime_env.yaml -- python -m pipelines.recipe --config configs/recipe.yaml

Stages (`hlm.stages`), each one folder under `recipe.out`, written exactly once and keyed by its inputs and
settings, so a rerun skips what is done, resumes an interrupted training stage from its last checkpoint (its Ray
Train run is named after its key) and reruns only what lies downstream of a changed setting:

    teacher            phase 1 on the train pairs (skipped when recipe.teacher is null: teacher.model as is)
    ads, queries,      the teacher's ad, train-query and dev-query embeddings (Ray Data, `pipelines.embed`)
      dev-queries
    init-L{d}          the student cut to d layers (the start of align and of the baselines at that depth)
    align              phase 2 at the largest depth, on the train queries and (align_on_ads) every ad text
    prune              phase 3 down to the smaller depths, re-aligning after each step
    refine-L{d}        phase 4 at each depth, against the frozen teacher ad embeddings
    direct-L{d}(-ads)  baseline: the same init fine-tuned as its own dual encoder, and its own ad index
    paper-L{d}         baseline: contrastive only against the teacher ads, no align
    own-{model}        off-the-shelf models' own ad indexes
    evaluate           the report: quality on the dev split over the whole catalogue, speed side by side
    publish            the teacher ad index to Redis (recipe.publish)

Every training stage runs `pipelines.train.train_phase`, every embedding `pipelines.embed.run_embed`: the same
code paths as the single-phase jobs.

Writes OUT/<stage>/ (OUT = recipe.out), OUT/recipe.config.yaml, OUT/evaluate/report.{md,json} + plot, and per
evaluated model its ranking as a TREC run, OUT/evaluate/runs/<model>.trec, with OUT/evaluate/qrels.trec.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hlm.cli import init_ray, job_parser, start_job
from hlm.config import Config, ModelRef, Phase, Precision
from hlm.data import DataError, qrels_from_labels, read_embeddings, read_labels, read_queries
from hlm.encoder import Encoder, describe_space_of
from hlm.evaluation import Candidate, compare, write_report
from hlm.index import AdIndex
from hlm.phase_data import PhaseInputs, input_problem
from hlm.pretrained import portable
from hlm.pruning import num_layers, prune_layers
from hlm.recipe import RecipeConfig, phase_job
from hlm.redis_client import redis_client
from hlm.stages import Stage, StageResult, run_stages, stage_table
from hlm.store import IndexStore
from pipelines.embed import local_pool_cpus, rejected_folder, run_embed
from pipelines.train import JOB_ERRORS, report_error, train_phase

logger = logging.getLogger("pipelines.recipe")


class Recipe:
    """The stage list of one config; each stage's `run` writes into the fresh folder it is given."""

    def __init__(self, cfg: RecipeConfig) -> None:
        self.cfg, self.root = cfg, Path(cfg.recipe.out).resolve()
        data = cfg.recipe.data
        self.ads, self.queries, self.labels = (Path(data.train) / f"{n}.parquet" for n in ("ads", "queries", "labels"))
        self.dev_queries, self.dev_labels = Path(data.dev) / "queries.parquet", Path(data.dev) / "labels.parquet"
        self.layers = num_layers(Encoder.load(cfg.student.model_copy(update={"precision": None}), cfg.runtime))
        self.depths = cfg.recipe.depths or [self.layers]
        if self.depths[0] > self.layers:
            raise DataError(f"recipe.depths {self.depths}: the student has only {self.layers} layers")
        self.stages: list[Stage] = []

    # ------------------------------------------------------------------------------------------ paths
    def out(self, stage: str, *rest: str) -> Path:
        return self.root.joinpath(stage, *rest)

    def teacher_ref(self) -> ModelRef:
        if self.cfg.recipe.teacher is None:
            return self.cfg.teacher.model_copy(update={"model": portable(self.cfg.teacher.model)})
        return self.cfg.teacher.model_copy(update={"model": str(self.out("teacher", "model"))})

    def init(self, depth: int) -> tuple[ModelRef, tuple[str, ...]]:
        """Where a student of `depth` layers starts: the config's student, or the init-L{depth} stage."""
        if depth == self.layers:
            return self.cfg.student.model_copy(update={"model": portable(self.cfg.student.model)}), ()
        return self.cfg.student.model_copy(update={"model": str(self.out(f"init-L{depth}"))}), (f"init-L{depth}",)

    def weights(self, model: ModelRef) -> dict[str, str]:
        """A model no stage writes keys its users by its weights; a stage's model by that stage's key."""
        if model.model.startswith(str(self.root)):
            return {}
        return {"space": describe_space_of(model)["fingerprint"]}

    # ------------------------------------------------------------------------------------------ stage kinds
    def add(self, name: str, run: Callable[[Path, dict[str, str]], dict[str, Any]], settings: dict,
            inputs: tuple[Path, ...] = (), after: tuple[str, ...] = ()) -> None:
        self.stages.append(Stage(name, run, settings, inputs, after))

    def embed(self, name: str, model: ModelRef, path: Path, kind: str, after: tuple[str, ...] = ()) -> None:
        settings = {"kind": kind, "model": model.model_dump(mode="json"), "batch_size": self.cfg.embed.batch_size,
                    **self.weights(model)}

        def run(out: Path, _: dict[str, str]) -> dict[str, Any]:
            record = run_embed(self.cfg, model, path, kind, out)
            if rejected_folder(out).exists():  # beside the stage's folder, as beside any embed output
                shutil.rmtree(rejected_folder(self.out(name)), ignore_errors=True)
                os.replace(rejected_folder(out), rejected_folder(self.out(name)))
            return record

        self.add(name, run, settings, (path,), after)

    def train(self, name: str, phase: Phase, overrides: str, init: ModelRef, inputs: PhaseInputs,
              after: tuple[str, ...], **fixed: Any) -> None:
        job = phase_job(self.cfg, overrides, phase, **fixed)
        if problem := input_problem(job, inputs):
            raise DataError(f"recipe stage {name}: {problem}")
        given = tuple(p for p in vars(inputs).values() if p is not None and not str(p).startswith(str(self.root)))
        settings = {"train": job.model_dump(mode="json"), "init": init.model_dump(mode="json"), **self.weights(init)}

        def run(out: Path, keys: dict[str, str]) -> dict[str, Any]:
            cluster = self.cfg.cluster.model_copy(update={"storage_path": str(self.out("ray_results"))})
            cfg = Config.model_validate({**self.cfg.model_dump(exclude={"recipe"}), "train": job.model_dump(),
                                         "cluster": cluster.model_dump()})
            return train_phase(cfg, init, inputs, out, f"{name}-{keys[name][:12]}")  # same key, same run: resume

        self.add(name, run, settings, given, after)

    # ------------------------------------------------------------------------------------------ the plan
    def plan(self) -> list[Stage]:
        r, root = self.cfg.recipe, self.out
        dev = {"dev_queries": self.dev_queries, "dev_labels": self.dev_labels,
               "dev_teacher_queries": root("dev-queries")}
        # 1. the teacher, its embeddings
        if r.teacher is not None:
            self.teacher_stage()
        teacher, t_after = self.teacher_ref(), (("teacher",) if r.teacher is not None else ())
        self.embed("ads", teacher, self.ads, "ads", t_after)
        self.embed("queries", teacher, self.queries, "queries", t_after)
        self.embed("dev-queries", teacher, self.dev_queries, "queries", t_after)
        emb = {"teacher_queries": root("queries"), "ads_emb": root("ads")}
        for depth in self.depths:
            if depth < self.layers:
                self.add(f"init-L{depth}", lambda out, _, d=depth: self.cut_student(out, d), {"depth": depth})
        # 2. align at the largest depth, 3. prune to the others, 4. refine each
        top, top_after = self.init(self.depths[0])
        align_in = PhaseInputs(self.queries, **emb, **({"ads": self.ads} if r.align_on_ads else {}), **dev)
        self.train("align", Phase.align, "align", top, align_in, ("queries", "ads", "dev-queries", *top_after))
        starts = {self.depths[0]: (root("align", "model"), "align")}
        if len(self.depths) > 1:
            self.train("prune", Phase.prune, "prune", ModelRef(model=str(root("align", "model"))), align_in,
                       ("align", "queries", "ads", "dev-queries"), prune_schedule=self.depths[1:])
            starts |= {d: (root("prune", "prune", f"layers-{d}"), "prune") for d in self.depths[1:]}
        pairs = PhaseInputs(self.queries, labels=self.labels, **emb, **dev)
        for depth in self.depths:
            model, stage = starts[depth]
            self.train(f"refine-L{depth}", Phase.refine, "refine", ModelRef(model=str(model)), pairs,
                       (stage, "queries", "ads", "dev-queries"))
        # 5. baselines at the same depths, from the same inits
        for depth in self.depths:
            init, after = self.init(depth)
            if r.direct_baseline is not None:
                mined = emb if phase_job(self.cfg, "direct_baseline", Phase.teacher).hard_negatives else {}
                self.train(f"direct-L{depth}", Phase.teacher, "direct_baseline", init,
                           PhaseInputs(self.queries, labels=self.labels, ads=self.ads, **mined),
                           (*after, *(("queries", "ads") if mined else ())))
                self.embed(f"direct-L{depth}-ads", ModelRef(model=str(root(f"direct-L{depth}", "model"))), self.ads,
                           "ads", (f"direct-L{depth}",))
            if r.paper_baseline is not None:
                self.train(f"paper-L{depth}", Phase.refine, "paper_baseline", init, pairs,
                           (*after, "queries", "ads", "dev-queries"))
        for model in r.own_index:
            self.embed(f"own-{Path(model).name}", ModelRef(model=portable(model)), self.ads, "ads")
        # 6. the report, 7. publish
        self.add("evaluate", self.evaluate, {"int8": r.int8, "own_index": r.own_index},
                 (self.dev_queries, self.dev_labels), tuple(s.name for s in self.stages))
        if r.publish is not None:
            self.add("publish", self.publish, r.publish.model_dump(), (), ("ads",))
        return self.stages

    def teacher_stage(self) -> None:
        """Phase 1; mining hard negatives needs the starting teacher's embeddings, two more stages."""
        start = self.cfg.teacher.model_copy(update={"model": portable(self.cfg.teacher.model)})
        inputs = PhaseInputs(self.queries, labels=self.labels, ads=self.ads)
        after: tuple[str, ...] = ()
        if phase_job(self.cfg, "teacher", Phase.teacher).hard_negatives:
            self.embed("teacher-start-ads", start, self.ads, "ads")
            self.embed("teacher-start-queries", start, self.queries, "queries")
            inputs = PhaseInputs(self.queries, labels=self.labels, ads=self.ads,
                                 teacher_queries=self.out("teacher-start-queries"),
                                 ads_emb=self.out("teacher-start-ads"))
            after = ("teacher-start-ads", "teacher-start-queries")
        self.train("teacher", Phase.teacher, "teacher", start, inputs, after)

    # ------------------------------------------------------------------------------------------ stage bodies
    def cut_student(self, out: Path, depth: int) -> dict[str, Any]:
        student = Encoder.load(self.cfg.student.model_copy(update={"precision": None}), self.cfg.runtime)
        prune_layers(student, depth).save(out)
        return {"layers": depth, "from_layers": self.layers}

    def evaluate(self, out: Path, _: dict[str, str]) -> dict[str, Any]:
        r, root, runtime = self.cfg.recipe, self.out, self.cfg.runtime
        queries, qrels = read_queries(self.dev_queries), qrels_from_labels(read_labels(self.dev_labels))

        def index(folder: Path) -> AdIndex:
            ids, emb, space = read_embeddings(folder)
            return AdIndex.build(ids, emb, space["fingerprint"], "Flat")

        def load(folder: Path, precision: Precision | None = None) -> Encoder:
            return Encoder.load(ModelRef(model=str(folder), precision=precision), runtime)

        teacher_index = index(root("ads"))
        name = "teacher (fine-tuned)" if r.teacher is not None else "teacher"
        rows = [Candidate(name, Encoder.load(self.teacher_ref(), runtime), teacher_index, "teacher")]
        rows += [Candidate(f"{m} off-the-shelf", Encoder.load(ModelRef(model=portable(m)), runtime),
                           index(root(f"own-{Path(m).name}")), "off-the-shelf", own_index=True) for m in r.own_index]
        for d in self.depths:
            if r.direct_baseline is not None:
                rows.append(Candidate(f"direct dual encoder L{d}", load(root(f"direct-L{d}", "model")),
                                      index(root(f"direct-L{d}-ads")), "direct dual encoder", own_index=True))
            if r.paper_baseline is not None:
                rows.append(Candidate(f"paper baseline L{d}", load(root(f"paper-L{d}", "model")), teacher_index,
                                      "paper baseline (no align)"))
            rows.append(Candidate(f"HLM L{d}", load(root(f"refine-L{d}", "model")), teacher_index, "HLM fp32"))
            if r.int8:
                rows.append(Candidate(f"HLM L{d} int8", load(root(f"refine-L{d}", "model"), Precision.int8),
                                      teacher_index, "HLM int8"))
        reports = compare(rows, queries["text"].to_pylist(), queries["query_id"].to_pylist(), qrels, teacher=name)
        paths = write_report(reports, out, qrels, title=f"HLM recipe: {len(queries)} dev queries, "
                                                 f"{teacher_index.ntotal} ads")
        return {"report": str(root("evaluate", paths["md"].name)), "rows": [rep.name for rep in reports]}

    def publish(self, out: Path, _: dict[str, str]) -> dict[str, Any]:
        p = self.cfg.recipe.publish
        ids, emb, space = read_embeddings(self.out("ads"))
        index = AdIndex.build(ids, emb, space["fingerprint"], p.factory)
        version = IndexStore(redis_client(p.redis_url), p.index).publish(index, source=str(self.out("ads")))
        out.mkdir()
        return {"index": p.index, "version": version, "ads": index.ntotal}


def run_recipe(cfg: RecipeConfig) -> tuple[Recipe, list[StageResult]]:
    """Plan the stages, join (or start) Ray, run what is not done; raises DataError & co. before any stage runs."""
    recipe = Recipe(cfg)
    stages = recipe.plan()
    cfg.save(recipe.root / "recipe.config.yaml")
    stage_cpus = max(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1, local_pool_cpus(cfg))
    init_ray(stage_cpus * cfg.recipe.parallel_stages, log_to_driver=False)
    return recipe, run_stages(stages, recipe.root, cfg.recipe.parallel_stages)


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, __file__).parse_args(argv)
    cfg: RecipeConfig = start_job("recipe", args, schema=RecipeConfig)
    try:
        recipe, results = run_recipe(cfg)
    except JOB_ERRORS as e:
        return report_error(e)
    report = recipe.out("evaluate", "report.md")
    print(report.read_text())
    print(stage_table(results))
    print(f"wrote {recipe.root} (report: {report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
