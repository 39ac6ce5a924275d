"""The whole HARNESS-LM recipe as one typed job description: which stages run, with which training settings.

`pipelines.recipe` turns a `RecipeConfig` into cached stages (`hlm.stages`):

    teacher fine-tune → teacher ad / query embeddings → align (queries + ad texts) → prune steps → refine
    (per depth) → direct and paper baselines (per depth) → evaluate → publish (optional)

Each phase's settings are the config's `train` section with the stage's overrides on top (`phase_job`), checked
against `TrainJob` when the config loads, so a misspelt key fails before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from hlm.config import Config, Phase, Section, TrainJob

TrainOverrides = dict[str, Any]  # keys of TrainJob; validated by RecipeConfig


class RecipeData(Section):
    """Prepared splits (`pipelines.prepare`): folders holding ads.parquet, queries.parquet, labels.parquet."""

    train: str = Field(description="training split: its ads.parquet is the catalogue every model searches")
    dev: str = Field(description="held-out split the report is computed on (its queries.parquet, labels.parquet)")


class PublishSettings(Section):
    redis_url: str | None = Field(None, description="None = $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    index: str = Field("ads", description="index name in Redis (keys hlm:{index}:*)")
    factory: str = Field("Flat", description="FAISS index_factory string of the published index")


class RecipeJob(Section):
    data: RecipeData
    out: str = Field("runs/recipe", description="root folder: one sub-folder per stage, the report in evaluate/")
    teacher: TrainOverrides | None = Field(
        default_factory=dict, description="phase 1 overrides of `train`; null = use teacher.model as it is")
    align: TrainOverrides = Field(default_factory=dict, description="phase 2 overrides of `train`")
    align_on_ads: bool = Field(True, description="align on every ad text as well (target: its teacher ad embedding)")
    depths: list[int] = Field(default_factory=list, description="student depths (layers) to train and report; "
                              "[] = the student as it is; depths below it are reached by prune steps, in order")
    prune: TrainOverrides = Field(default_factory=dict, description="phase 3 overrides (steps_per_prune, lr, …)")
    refine: TrainOverrides = Field(default_factory=dict, description="phase 4 overrides of `train`")
    direct_baseline: TrainOverrides | None = Field(
        None, description="the student architecture at each depth fine-tuned as its own dual encoder on the same "
        "pairs and searched in its own index (phase teacher overrides); null = skip")
    paper_baseline: TrainOverrides | None = Field(
        None, description="contrastive only against the teacher's ads, no align (refine overrides); null = skip")
    own_index: list[str] = Field(default_factory=list, description="models evaluated off the shelf, each in its "
                                 "own re-embedded ad index (e.g. [teacher-default, student-default])")
    int8: bool = Field(True, description="also report every HLM student at int8 (CPU)")
    parallel_stages: int = Field(1, ge=1, description="stages run at once when their inputs are ready (baselines "
                                 "beside the students, one depth beside another); each needs its own room on the "
                                 "cluster: a train stage cluster.num_workers workers, an embed stage its actor pool")
    publish: PublishSettings | None = Field(None, description="publish the teacher ad index to Redis at the end")

    @model_validator(mode="after")
    def _depths_decrease(self) -> RecipeJob:
        if any(n < 1 for n in self.depths) or any(a <= b for a, b in zip(self.depths, self.depths[1:], strict=False)):
            raise ValueError(f"depths must be positive layer counts in decreasing order, got {self.depths}")
        return self


class RecipeConfig(Config):
    recipe: RecipeJob

    @model_validator(mode="after")
    def _overrides_fit_train(self) -> RecipeConfig:
        for phase, name in ((Phase.teacher, "teacher"), (Phase.align, "align"), (Phase.prune, "prune"),
                            (Phase.refine, "refine"), (Phase.teacher, "direct_baseline"),
                            (Phase.refine, "paper_baseline")):
            if getattr(self.recipe, name) is not None:
                try:
                    phase_job(self, name, phase)
                except ValueError as e:
                    raise ValueError(f"recipe.{name}: {e}") from e
        return self

    def path(self, name: str) -> Path:
        return Path(self.recipe.out) / name


def phase_job(cfg: RecipeConfig, stage: str, phase: Phase, **fixed: Any) -> TrainJob:
    """`cfg.train` with `recipe.<stage>`'s overrides and `fixed` on top, as phase `phase`."""
    overrides = getattr(cfg.recipe, stage) or {}
    return TrainJob.model_validate({**cfg.train.model_dump(), **overrides, **fixed, "phase": phase})
