"""Query-encoder speed, teacher vs student variants, on the same cores in one run; and the int8 path's recovery.

Variants: the teacher; the student in fp32, int8 and bf16 (`ModelRef.precision`); the fp32 student cut to 4, 3
and 2 layers with `hlm.pruning.prune_layers` (not re-aligned: speed depends only on the architecture). Each is
timed on realistic queries at batch 1 (latency p50/p99) and at batch 64 (throughput; 16 in quick mode), the
variants taken in turn for every input (`bench.common.interleaved_timings`) so that load from other processes
hits them alike. Ratios are against the teacher: `latency_speedup` = teacher p50 / variant p50,
`throughput_speedup` = variant q/s / teacher q/s.

Recovery: the int8 student must keep R@100 within 0.5 points of the fp32 student. On the built-in catalogue the
fp32 student embeds the ads (the index as the offline job would build it), the queries are encoded in fp32 and
in int8, and both runs are scored by `hlm.evaluation.retrieval_quality`.

torch.compile is not a variant. Measured once on the 2-core CPU (student, one thread, dynamic shapes, eager and
compiled taken in turn): 1.2× faster at batch 1 (21.9 → 18.1 ms p50) and 1.1× at batch 64, but the first call
compiled for 225–526 s, which would add minutes to this benchmark and to every Serve replica start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bench.common import interleaved_timings, ms_percentiles, realistic_queries, save_figure, write_result
from hlm.catalog import generate_catalog
from hlm.config import ModelRef, Precision, Runtime
from hlm.data import qrels_from_labels
from hlm.encoder import Encoder
from hlm.evaluation import retrieval_quality
from hlm.index import AdIndex
from hlm.pruning import num_layers, prune_layers

logger = logging.getLogger(__name__)

DEPTHS = (4, 3, 2)
MAX_R100_DROP_POINTS = 0.5


def variants(teacher: str, student: str) -> dict[str, tuple[Encoder, dict]]:
    """name -> (encoder, what it is); CPU, so fp16 (GPU only) is not among them."""
    cpu = Runtime(device="cpu", dtype="float32")
    fp32 = Encoder.load(ModelRef(model=student, precision=Precision.fp32), cpu)
    out = {"teacher": (Encoder.load(ModelRef(model=teacher, precision=Precision.fp32), cpu), {"precision": "fp32"}),
           "student": (fp32, {"precision": "fp32"})}
    for precision in (Precision.int8, Precision.bf16):
        out[f"student-{precision.value}"] = (Encoder.load(ModelRef(model=student, precision=precision), cpu),
                                             {"precision": precision.value})
    for n in (d for d in DEPTHS if d < num_layers(fp32)):
        out[f"student-{n}L"] = (prune_layers(fp32, n), {"precision": "fp32"})
    return out


def speed(encoders: dict[str, Encoder], queries: list[str], n_latency: int, batch: int,
          n_batches: int) -> dict[str, dict]:
    """Latency at batch 1 over `n_latency` queries and throughput at `batch` over `n_batches` batches, per encoder."""
    single = interleaved_timings({name: (lambda q, e=e: e.encode([q])) for name, e in encoders.items()},
                                 queries[:n_latency])
    pool = (queries * (batch * n_batches // len(queries) + 1))[:batch * n_batches]
    batches = [pool[i * batch:(i + 1) * batch] for i in range(n_batches)]
    batched = interleaved_timings({name: (lambda b, e=e: e.encode(b, batch_size=batch))
                                   for name, e in encoders.items()}, batches, warmup=1)
    out = {}
    for name in encoders:
        lat = ms_percentiles(single[name])
        out[name] = {"latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
                     "throughput_qps": round(batch / float(np.median(batched[name])), 1)}
    return out


def int8_recovery(student: str, n_ads: int, n_queries: int) -> dict:
    """R@100 (and R@10, cosines) of int8 vs fp32 queries over the fp32 student's own ad index."""
    ds = generate_catalog(n_ads=n_ads, n_queries=n_queries)
    cpu = Runtime(device="cpu", dtype="float32")
    fp32 = Encoder.load(ModelRef(model=student, precision=Precision.fp32), cpu)
    int8 = Encoder.load(ModelRef(model=student, precision=Precision.int8), cpu)
    index = AdIndex.build(ds.ads["ad_id"].to_pylist(), fp32.encode(ds.ads["text"].to_pylist(), kind="ad"), fp32.space)
    texts, qids = ds.queries["text"].to_pylist(), ds.queries["query_id"].to_pylist()
    qrels = qrels_from_labels(ds.labels)
    q_fp32, q_int8 = fp32.encode(texts), int8.encode(texts)  # (B, d) each
    ref, fast = (retrieval_quality(index, q, qids, qrels) for q in (q_fp32, q_int8))
    cosine = (q_fp32 * q_int8).sum(axis=1)  # (B,) both unit-norm
    drop = round((ref["R@100"] - fast["R@100"]) * 100, 3)
    return {"catalogue": f"{n_ads} ads, {n_queries} queries", "R@100_fp32": round(ref["R@100"], 4),
            "R@100_int8": round(fast["R@100"], 4), "R@100_drop_points": drop, "R@10_fp32": round(ref["R@10"], 4),
            "R@10_int8": round(fast["R@10"], 4), "min_cosine": round(float(cosine.min()), 4),
            "mean_cosine": round(float(cosine.mean()), 4), "goal_max_drop_points": MAX_R100_DROP_POINTS,
            "within_goal": bool(drop <= MAX_R100_DROP_POINTS)}


def run(out_dir: Path, *, quick: bool = False, teacher: str = "teacher-default",
        student: str = "student-default") -> dict:
    n_latency, batch, n_batches, n_ads, n_queries = (10, 16, 2, 200, 40) if quick else (200, 64, 5, 2000, 400)
    queries, source = realistic_queries(max(n_latency, batch * n_batches))
    models = variants(teacher, student)
    measured = speed({name: enc for name, (enc, _) in models.items()}, queries, n_latency, batch, n_batches)
    base = measured["teacher"]
    rows = [{"variant": name, "layers": num_layers(enc), **info, **measured[name],
             "latency_speedup": round(base["latency_p50_ms"] / measured[name]["latency_p50_ms"], 2),
             "throughput_speedup": round(measured[name]["throughput_qps"] / base["throughput_qps"], 2)}
            for name, (enc, info) in models.items()]
    del models
    student_row = next(r for r in rows if r["variant"] == "student")
    int8_row = next(r for r in rows if r["variant"] == "student-int8")
    numbers = {"queries": source, "latency_speedup_student": student_row["latency_speedup"],
               "throughput_speedup_student": student_row["throughput_speedup"],
               "int8_over_fp32_latency_speedup": round(student_row["latency_p50_ms"] / int8_row["latency_p50_ms"], 2),
               "variants": rows, "int8_recovery": int8_recovery(student, n_ads, n_queries)}
    config = {"teacher": teacher, "student": student, "depths": list(DEPTHS), "batch": batch,
              "n_latency": n_latency, "n_batches": n_batches, "quick": quick}
    path = write_result(out_dir, "encoder", config, numbers)
    logger.info("encoder benchmark -> %s", path)
    return numbers


def plot(record: dict, out_dir: Path) -> list[Path]:
    """encoder.png: latency p50 (p99 as a tick) and throughput per variant, side by side."""
    import matplotlib.pyplot as plt

    rows = record["numbers"]["variants"]
    names = [r["variant"] for r in rows]
    x = np.arange(len(rows))
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4))
    lat.bar(x, [r["latency_p50_ms"] for r in rows], color="tab:blue", label="p50")
    lat.scatter(x, [r["latency_p99_ms"] for r in rows], color="black", marker="_", s=200, label="p99")
    lat.set_ylabel("ms per query (batch 1)")
    lat.legend()
    thr.bar(x, [r["throughput_qps"] for r in rows], color="tab:green")
    thr.set_ylabel(f"queries/s (batch {record['config']['batch']})")
    for ax in (lat, thr):
        ax.set_xticks(x, names, rotation=30, ha="right")
    fig.suptitle("query encoder: teacher vs student depth and precision (same cores, one run)")
    return save_figure(fig, out_dir, "encoder")
