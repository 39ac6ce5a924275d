"""The design study: how much recovery each alignment choice buys, and at what query-encoder latency.

Axes, as in the paper's ablations: the alignment objective (l2 | cosine | score_kl), width handling
(a projection into the teacher's width, or truncation of the teacher space to the student's width, which
is also the embedding-dimension axis), student depth (layers kept by one-shot pruning before alignment)
and the learning rate / schedule. `trials` lays them out one axis at a time around a base point (the first
value of every axis; each other trial changes exactly one value) or as the full grid.

One trial aligns a fresh student on the train queries' teacher embeddings, searches the dev queries in the
teacher's ad index (cut to the student's width under truncation) and times the encoder. `run_trial` is a
plain function of file paths, so a Ray Tune trial, a test or a notebook runs the same thing.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from hlm.config import AlignmentObjective, Config, Schedule, Section, Width
from hlm.data import qrels_from_labels, read_embeddings, read_labels, read_queries
from hlm.encoder import Encoder
from hlm.evaluation import encoder_speed, retrieval_quality
from hlm.index import AdIndex
from hlm.metrics import PRIMARY_METRIC, recovery_table
from hlm.pruning import num_layers, prune_layers
from hlm.space import Embeddings, space_at_width, truncate
from hlm.train import train_align

logger = logging.getLogger(__name__)


class StudySweep(Section):
    """The axes of `pipelines.study`; the first value of each axis is the base point."""

    objectives: list[AlignmentObjective] = Field(list(AlignmentObjective), min_length=1)
    widths: list[Width] = Field(["projection", "truncate"], min_length=1)
    depths: list[int] = Field([6, 3], min_length=1, description="student layers kept (one-shot pruning before "
                              "alignment); a value ≥ the student's depth means unpruned")
    lrs: list[float] = Field([1e-4, 3e-4], min_length=1, description="peak learning rates (train.schedule applies)")
    schedules: list[Schedule] = Field(["cosine"], min_length=1)
    design: Literal["one_at_a_time", "grid"] = Field("one_at_a_time", description="one_at_a_time: the base point "
                                                     "plus one trial per other value of each axis; grid: all")
    cpus_per_trial: float = Field(2.0, gt=0, description="trials run one at a time so latencies are comparable")
    latency_queries: int = Field(200, gt=0, description="batch-1 encodes timed per model")


class StudyConfig(Config):
    study: StudySweep = StudySweep()


@dataclass(frozen=True)
class Trial:
    objective: AlignmentObjective
    width: Width
    depth: int
    lr: float
    schedule: Schedule = "cosine"

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.width}-L{self.depth}-lr{self.lr:g}-{self.schedule}"


@dataclass(frozen=True)
class StudyInputs:
    """Files a trial reads: train queries and their teacher embeddings, teacher ad embeddings, the dev split."""

    train_queries: Path
    teacher_queries: Path
    ads_emb: Path
    dev_queries: Path
    dev_labels: Path
    dev_teacher_queries: Path


def trials(sweep: StudySweep) -> list[Trial]:
    axes = {"objective": sweep.objectives, "width": sweep.widths, "depth": sweep.depths, "lr": sweep.lrs,
            "schedule": sweep.schedules}
    if sweep.design == "grid":
        return [Trial(*combo) for combo in itertools.product(*axes.values())]
    base = {axis: values[0] for axis, values in axes.items()}
    varied = [Trial(**{**base, axis: v}) for axis, values in axes.items() for v in values[1:]]
    return list(dict.fromkeys([Trial(**base), *varied]))  # a repeated value would repeat the base


def dev_split(inputs: StudyInputs) -> tuple[list[str], list[str], dict]:
    """(query ids, texts, qrels) of the dev split."""
    queries, qrels = read_queries(inputs.dev_queries), qrels_from_labels(read_labels(inputs.dev_labels))
    return queries["query_id"].to_pylist(), queries["text"].to_pylist(), qrels


def teacher_quality(inputs: StudyInputs) -> dict[str, float]:
    """The teacher's dev metrics from its stored dev query embeddings: no teacher forward pass is needed."""
    ids, _, qrels = dev_split(inputs)
    ads = Embeddings.read(inputs.ads_emb)
    q_emb = Embeddings.read(inputs.dev_teacher_queries).rows_for(ids)
    return retrieval_quality(AdIndex.build(ads.ids, ads.emb, ads.space, "Flat"), q_emb, ids, qrels)


def run_trial(trial: Trial, cfg: StudyConfig, inputs: StudyInputs, teacher: dict[str, float]) -> dict:
    """Align a fresh student with `trial`'s settings; its dev quality, recovery vs `teacher` and speed."""
    train = read_queries(inputs.train_queries)
    teacher_queries = Embeddings.read(inputs.teacher_queries)
    target, space = teacher_queries.rows_for(train["query_id"].to_pylist()), teacher_queries.space
    ad_ids, ad_emb, _ = read_embeddings(inputs.ads_emb)

    student = Encoder.load(cfg.student, cfg.runtime)
    if trial.depth < num_layers(student):
        student = prune_layers(student, trial.depth)
    train_cfg = cfg.train.model_copy(update={"objective": trial.objective, "width": trial.width, "lr": trial.lr,
                                             "schedule": trial.schedule})
    result = train_align(student, train["text"].to_pylist(), target, train_cfg, teacher_space=space,
                         ad_emb=ad_emb if trial.objective == AlignmentObjective.SCORE_KL else None)
    student = result.encoder

    ids, texts, qrels = dev_split(inputs)
    d = student.dim
    index = AdIndex.build(ad_ids, truncate(ad_emb, d), space_at_width(space, ad_emb.shape[1], d), "Flat")
    quality = retrieval_quality(index, student.encode(texts), ids, qrels)
    speed = encoder_speed(student, texts[:cfg.study.latency_queries], n_latency=cfg.study.latency_queries)
    return {"trial": trial.name, **asdict(trial), "dim": d, "layers": num_layers(student),
            "params": sum(p.numel() for p in student.parameters()), "steps": result.step,
            "final_loss": result.losses[-1] if result.losses else None, "quality": quality,
            "recovery": recovery_table(quality, teacher), "speed": speed}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, recovery) points no other point beats on both (lower latency, higher recovery)."""
    return [i for i, (lat, rec) in enumerate(points)
            if not any(lat2 <= lat and rec2 >= rec and (lat2, rec2) != (lat, rec) for lat2, rec2 in points)]


def write_study_report(results: list[dict], teacher: dict, out: Path) -> dict[str, Path]:
    """study.json, study.md (one row per trial, Pareto-optimal ones marked) and pareto.png (recovery vs latency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    latency_ratio = teacher["speed"]["latency_p50_ms"]
    points = [(r["speed"]["latency_p50_ms"], r["recovery"][PRIMARY_METRIC]) for r in results]
    front = set(pareto_front(points))
    (out / "study.json").write_text(json.dumps({"teacher": teacher, "trials": results}, indent=2))
    lines = ["# Design study: alignment choices vs recovery and latency", "",
             f"Teacher on dev: P@100 {teacher['quality']['P@100']:.4f}, R@100 {teacher['quality']['R@100']:.4f}, "
             f"nDCG@10 {teacher['quality']['nDCG@10']:.4f}; p50 {latency_ratio:.1f} ms at batch 1.", "",
             "| trial | dim | layers | P@100 | R@100 | nDCG@10 | recovery P@100 | recovery R@100 | p50 ms | "
             "latency × | final loss | Pareto |", "|" + "---|" * 12]
    for r in sorted(results, key=lambda r: -r["recovery"][PRIMARY_METRIC]):
        q, s = r["quality"], r["speed"]
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append(f"| {r['trial']} | {r['dim']} | {r['layers']} | {q['P@100']:.4f} | {q['R@100']:.4f} | "
                     f"{q['nDCG@10']:.4f} | {r['recovery']['P@100']:.1%} | {r['recovery']['R@100']:.1%} | "
                     f"{s['latency_p50_ms']:.1f} | {latency_ratio / s['latency_p50_ms']:.1f} | {loss} | "
                     f"{'yes' if results.index(r) in front else ''} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((lat, rec), r) in enumerate(zip(points, results, strict=True)):
        ax.scatter(lat, rec, c="tab:red" if i in front else "tab:blue")
        ax.annotate(r["trial"], (lat, rec), fontsize=7)
    ordered = sorted(points[i] for i in front)
    ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "r--", lw=1, label="Pareto front")
    ax.set_xlabel("student query-encoder latency p50 at batch 1 (ms)")
    ax.set_ylabel(f"recovery of the teacher's {PRIMARY_METRIC}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return {"json": out / "study.json", "md": out / "study.md", "plot": out / "pareto.png"}
