"""How models score: retrieval quality over an ad index, query-encoder speed, and teacher vs students side by side.

Quality: a model's queries are searched in an ad index (FAISS; exact with a Flat index; the teacher's for a
student, its own re-embedded one for a baseline dual encoder) and scored with `hlm.metrics`, the pure metric
functions; recovery is each metric over the teacher's. `search_run` → `hlm.metrics.evaluate` is the one
search-and-score path (`retrieval_quality` is the two together): `compare` (`pipelines.evaluate`, the recipe's
report), `evaluate_dev` (after a `pipelines.train` phase) and the design study all use it. `write_report` also
writes each model's run as a TREC run file, with the labels as a qrels file (`hlm.trec`), so trec_eval,
ir_measures or ranx score exactly what the report scored.

Speed: latency at batch 1 (p50/p99 over real query strings) and throughput at batch 64, measured for every model
in the same run on the same cores, so ratios are fair even where absolute numbers are not comparable across
machines.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlm.config import Phase, Runtime
from hlm.data import qrels_from_labels, read_ads, read_labels, read_queries
from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.metrics import Qrels, Run, evaluate, recovery_table, run_from_search
from hlm.phase_data import PhaseInputs
from hlm.space import Embeddings, check_same_space, space_at_width, truncate
from hlm.trec import write_qrels, write_runs

logger = logging.getLogger(__name__)


@dataclass
class ModelReport:
    name: str
    params: int
    quality: dict[str, float]
    speed: dict[str, float]
    recovery: dict[str, float] = field(default_factory=dict)
    family: str = ""  # rows of one family form one curve of the quality-vs-latency plot
    index: str = "teacher"  # which ad index the row searched: "teacher" or "own"
    run: Run = field(default_factory=dict, repr=False)  # the ranking scored: {query_id: {ad_id: score}}, top 100


@dataclass
class Candidate:
    """One row of a comparison: a query encoder and the ad index it searches."""

    name: str
    encoder: Encoder
    index: AdIndex
    family: str = ""
    own_index: bool = False  # True for a dual encoder searched in its own re-embedded ads


def search_run(index: AdIndex, q_emb: np.ndarray, query_ids: list[str], k: int) -> Run:
    """The top k ads of `index` for each q_emb (B, d) row (exact when Flat), as a run keyed by query_ids."""
    D, I = index.search(q_emb, k)  # noqa: E741 (B, k)
    return run_from_search(query_ids, D, I, index.ids)


def retrieval_quality(index: AdIndex, q_emb: np.ndarray, query_ids: list[str], qrels: dict, *,
                      ks: tuple[int, ...] = (10, 100)) -> dict[str, float]:
    """`hlm.metrics.evaluate` at `ks` of the top max(ks) ads of `index` for each q_emb (B, d) row (exact when Flat)."""
    return evaluate(search_run(index, q_emb, query_ids, max(ks)), qrels, ks=ks)


def evaluate_dev(model: Path, phase: Phase, inputs: PhaseInputs, k: int, runtime: Runtime) -> dict[str, Any]:
    """{"dev": the model's metrics at k (+ recovery/*), "dev_teacher": the teacher's (with dev_teacher_queries)}.

    What `pipelines.train` reports after a phase; every search is exact (Flat). Phase teacher changes the space,
    so its model re-embeds the `ads` texts and is compared with the teacher it started from (when `ads_emb` and
    `dev_teacher_queries` are given); a student searches the teacher ad embeddings, cut to its width in truncate
    mode.
    """
    queries = read_queries(inputs.dev_queries)
    qids, texts = queries["query_id"].to_pylist(), queries["text"].to_pylist()
    qrels = qrels_from_labels(read_labels(inputs.dev_labels))
    usable = runtime.device != "cuda" or torch.cuda.is_available()  # a CPU head node evaluates on CPU
    encoder = Encoder.load(model, runtime if usable else Runtime())
    ads = Embeddings.read(inputs.ads_emb) if inputs.ads_emb else None
    teacher = None
    if ads is not None and inputs.dev_teacher_queries:
        t_emb = Embeddings.read(inputs.dev_teacher_queries).rows_for(qids)
        teacher = retrieval_quality(AdIndex.build(ads.ids, ads.emb, ads.space), t_emb, qids, qrels, ks=(k,))
    if phase is Phase.teacher:
        ad_table = read_ads(inputs.ads)
        index = AdIndex.build(ad_table["ad_id"].to_pylist(), encoder.encode(ad_table["text"].to_pylist(), kind="ad"),
                              encoder.space)
    else:  # in truncate mode the student's space is the teacher's first d dims
        space = space_at_width(ads.space, ads.emb.shape[1], encoder.dim)
        check_same_space(space, encoder.space, f"model {model}")
        index = AdIndex.build(ads.ids, truncate(ads.emb, encoder.dim), space)
    student = retrieval_quality(index, encoder.encode(texts), qids, qrels, ks=(k,))
    reference = {name: v for name, v in (teacher or {}).items() if v > 0}  # recovery is undefined over a 0
    student |= {f"recovery/{name}": v for name, v in recovery_table(student, reference).items()}
    return {"dev": student, **({"dev_teacher": teacher} if teacher else {})}


def encoder_speed(encoder: Encoder, queries: list[str], *, n_latency: int = 200, batch: int = 64,
                  n_batches: int = 5) -> dict[str, float]:
    """Latency p50/p99 (ms) at batch 1 and throughput (queries/s) at `batch`, after a warm-up."""
    encoder.encode(queries[:batch])  # warm-up: first calls pay for allocation and lazy init
    lat = []
    for q in (queries * (n_latency // max(len(queries), 1) + 1))[:n_latency]:
        t = time.perf_counter()
        encoder.encode([q])
        lat.append((time.perf_counter() - t) * 1e3)
    pool = (queries * (batch * n_batches // max(len(queries), 1) + 1))[:batch * n_batches]
    t = time.perf_counter()
    for i in range(n_batches):
        encoder.encode(pool[i * batch:(i + 1) * batch], batch_size=batch)
    qps = batch * n_batches / (time.perf_counter() - t)
    return {"latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
            f"throughput_qps_b{batch}": qps}


def model_labels(paths: list[str | Path]) -> list[str]:
    """Distinct short names for model folders: the fewest trailing path parts (the same number for all) that tell
    them apart (runs/align/model, runs/refine/model -> align/model, refine/model). The same folder twice is an error."""
    parts = [Path(p).expanduser().resolve().parts for p in paths]
    for n in range(1, max(map(len, parts), default=1) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"the same model folder is given more than once: {[str(p) for p in paths]}")


REPORT_KS = (10, 100)  # the report's cutoffs: nDCG@10, MRR@10 and P@100, R@100 (the paper's)


def compare(candidates: list[Candidate], queries: list[str], query_ids: list[str], qrels: dict, *, teacher: str,
            speed_queries: list[str] | None = None) -> list[ModelReport]:
    """One report per candidate; recovery and speed ratios are relative to the candidate named `teacher`."""
    reports = []
    for c in candidates:
        logger.info("evaluating %s", c.name)
        run = search_run(c.index, c.encoder.encode(queries), query_ids, max(REPORT_KS))
        speed = encoder_speed(c.encoder, speed_queries or queries)
        reports.append(ModelReport(c.name, sum(p.numel() for p in c.encoder.parameters()),
                                   evaluate(run, qrels, ks=REPORT_KS), speed, family=c.family,
                                   index="own" if c.own_index else "teacher", run=run))
    base = next(r for r in reports if r.name == teacher)
    for r in reports:
        r.recovery = recovery_table(r.quality, base.quality)
        r.speed["latency_speedup"] = base.speed["latency_p50_ms"] / r.speed["latency_p50_ms"]
        r.speed["throughput_speedup"] = next(r.speed[k] / base.speed[k] for k in r.speed if k.startswith("throughput"))
    return reports


def write_report(reports: list[ModelReport], out: Path, qrels: Qrels, *,
                 title: str = "Teacher vs students") -> dict[str, Path]:
    """report.json, report.md (a table), quality_vs_latency.png (R@100 vs p50, one curve per family), and the
    TREC files (`hlm.trec`): qrels.trec (`qrels`, the labels scored) and runs/<model>.trec (each report's run).

    Returns {"json", "md", "plot", "qrels": path, "runs": {model name: path}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    runs = write_runs({r.name: r.run for r in reports}, out / "runs")  # first: a clash of names writes nothing
    (out / "report.json").write_text(json.dumps([{k: v for k, v in vars(r).items() if k != "run"} for r in reports],
                                                indent=2))
    head = ("| model | index | params (M) | P@100 | R@100 | nDCG@10 | MRR@10 | recovery P@100 | recovery R@100 | "
            "p50 ms (b=1) | p99 ms | q/s (b=64) | latency × | throughput × |")
    lines = [f"# {title}", "", head, "|" + "---|" * 14]
    for r in reports:
        q, s = r.quality, r.speed
        qps = next(v for k, v in s.items() if k.startswith("throughput_qps"))
        lines.append(f"| {r.name} | {r.index} | {r.params / 1e6:.1f} | {q['P@100']:.4f} | {q['R@100']:.4f} | "
                     f"{q['nDCG@10']:.4f} | {q['MRR@10']:.4f} | {r.recovery.get('P@100', float('nan')):.1%} | "
                     f"{r.recovery.get('R@100', float('nan')):.1%} | {s['latency_p50_ms']:.1f} | "
                     f"{s['latency_p99_ms']:.1f} | {qps:.0f} | {s['latency_speedup']:.1f} | "
                     f"{s['throughput_speedup']:.1f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[ModelReport]] = {}
    for r in reports:
        families.setdefault(r.family or r.name, []).append(r)
    for family, rows in families.items():  # one curve per family, fastest first
        rows = sorted(rows, key=lambda r: r.speed["latency_p50_ms"])
        ax.plot([r.speed["latency_p50_ms"] for r in rows], [r.quality["R@100"] for r in rows], "o-", label=family)
        for r in rows:
            ax.annotate(r.name, (r.speed["latency_p50_ms"], r.quality["R@100"]), fontsize=7)
    ax.legend(fontsize=7)
    ax.set_xlabel("query-encoder latency p50 at batch 1 (ms)")
    ax.set_ylabel("R@100")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_latency.png", dpi=120)
    plt.close(fig)
    return {"json": out / "report.json", "md": out / "report.md", "plot": out / "quality_vs_latency.png",
            "qrels": write_qrels(qrels, out / "qrels.trec"), "runs": runs}
