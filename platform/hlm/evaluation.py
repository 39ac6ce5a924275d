"""Teacher vs students, side by side: retrieval quality over the full ad index and query-encoder speed.

Quality: every model's dev queries are searched in its ad index (FAISS; the teacher's for a student, its own
re-embedded one for a baseline dual encoder) and scored with `hlm.metrics`; recovery is each metric over the
teacher's. Speed: latency at batch 1 (p50/p99 over
real query strings) and throughput at batch 64, measured for every model in the same run on the same
cores, so ratios are fair even where absolute numbers are not comparable across machines.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.metrics import evaluate, recovery_table, run_from_search

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


@dataclass
class Candidate:
    """One row of a comparison: a query encoder and the ad index it searches."""

    name: str
    encoder: Encoder
    index: AdIndex
    family: str = ""
    own_index: bool = False  # True for a dual encoder searched in its own re-embedded ads


def retrieval_quality(index: AdIndex, q_emb: np.ndarray, query_ids: list[str], qrels: dict, *,
                      ks: tuple[int, ...] = (10, 100)) -> dict[str, float]:
    D, I = index.search(q_emb, max(ks))  # noqa: E741 (B, k)
    return evaluate(run_from_search(query_ids, D, I, index.ids), qrels, ks=ks)


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


def compare(candidates: list[Candidate], queries: list[str], query_ids: list[str], qrels: dict, *, teacher: str,
            speed_queries: list[str] | None = None) -> list[ModelReport]:
    """One report per candidate; recovery and speed ratios are relative to the candidate named `teacher`."""
    reports = []
    for c in candidates:
        logger.info("evaluating %s", c.name)
        quality = retrieval_quality(c.index, c.encoder.encode(queries), query_ids, qrels)
        speed = encoder_speed(c.encoder, speed_queries or queries)
        reports.append(ModelReport(c.name, sum(p.numel() for p in c.encoder.parameters()), quality, speed,
                                   family=c.family, index="own" if c.own_index else "teacher"))
    base = next(r for r in reports if r.name == teacher)
    for r in reports:
        r.recovery = recovery_table(r.quality, base.quality)
        r.speed["latency_speedup"] = base.speed["latency_p50_ms"] / r.speed["latency_p50_ms"]
        r.speed["throughput_speedup"] = next(r.speed[k] / base.speed[k] for k in r.speed if k.startswith("throughput"))
    return reports


def write_report(reports: list[ModelReport], out: Path, *, title: str = "Teacher vs students") -> dict[str, Path]:
    """report.json, report.md (a table) and quality_vs_latency.png (R@100 vs p50, one curve per family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps([asdict(r) for r in reports], indent=2))
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
    return {"json": out / "report.json", "md": out / "report.md", "plot": out / "quality_vs_latency.png"}
