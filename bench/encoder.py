"""Query-encoder speed, teacher vs student variants, on the same cores in one run; and the int8 path's recovery.

Variants: the teacher; the student in fp32, int8 and bf16 (`ModelRef.precision`), and on ONNX Runtime in fp32 and
int8 (`onnx`, `onnx_int8`: the student exported by `hlm.onnx_runtime` into a temporary folder); the fp32 student cut
to 4, 3 and 2 layers with `hlm.pruning.prune_layers` (not re-aligned: speed depends only on the architecture). Each is
timed on realistic queries at batch 1 (latency p50/p99) and at batch 64 (throughput; 16 in quick mode), the
variants taken in turn for every input (`bench.common.interleaved_timings`) so that load from other processes
hits them alike. Ratios are against the teacher: `latency_speedup` = teacher p50 / variant p50,
`throughput_speedup` = variant q/s / teacher q/s.

Recovery: each faster path (torch int8, ONNX fp32, ONNX int8) must keep R@100 within 0.5 points of the fp32
student. On the built-in catalogue the fp32 student embeds the ads (the index as the offline job would build it), the
queries are encoded in fp32 and on each path, and every run is scored by `hlm.evaluation.retrieval_quality`. The
ONNX goal is ≥ 2× torch fp32 (`onnx_int8_over_fp32_*_speedup`) at that recovery.

torch.compile is not a variant. Measured once on the 2-core CPU (student, one thread, dynamic shapes, eager and
compiled taken in turn): 1.2× faster at batch 1 (21.9 → 18.1 ms p50) and 1.1× at batch 64, but the first call
compiled for 225–526 s, which would add minutes to this benchmark and to every Serve replica start.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from bench.common import interleaved_timings, ms_percentiles, realistic_queries, save_figure, write_result
from hlm.catalog import generate_catalog
from hlm.config import ModelRef, Precision, Runtime
from hlm.data import qrels_from_labels
from hlm.encoder import Encoder
from hlm.evaluation import retrieval_quality
from hlm.index import AdIndex
from hlm.onnx_runtime import export_onnx
from hlm.pruning import num_layers, prune_layers

logger = logging.getLogger(__name__)

DEPTHS = (4, 3, 2)
MAX_R100_DROP_POINTS = 0.5
SIZES = {True: (10, 16, 2, 200, 40), False: (200, 64, 5, 2000, 400)}  # quick: n_latency, batch, n_batches, ads, queries
FAST_PATHS = (Precision.int8, Precision.onnx, Precision.onnx_int8)  # each against torch fp32 in `recovery`


def variants(teacher: str, student: str, exported: Path) -> dict[str, tuple[Encoder, dict]]:
    """name -> (encoder, what it is); CPU, so fp16 (GPU only) is not among them. `exported`: the student saved with
    its ONNX graphs."""
    cpu = Runtime(device="cpu", dtype="float32")
    fp32 = Encoder.load(ModelRef(model=student, precision=Precision.fp32), cpu)
    out = {"teacher": (Encoder.load(ModelRef(model=teacher, precision=Precision.fp32), cpu), {"precision": "fp32"}),
           "student": (fp32, {"precision": "fp32"})}
    for precision in (Precision.int8, Precision.bf16, Precision.onnx, Precision.onnx_int8):
        model = str(exported) if precision in (Precision.onnx, Precision.onnx_int8) else student
        out[f"student-{precision.value}"] = (Encoder.load(ModelRef(model=model, precision=precision), cpu),
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


def recovery(exported: Path, n_ads: int, n_queries: int) -> dict[str, dict]:
    """Per fast path: R@100 (and R@10, cosines) of its queries vs fp32 queries over the fp32 student's own ad index."""
    ds = generate_catalog(n_ads=n_ads, n_queries=n_queries)
    cpu = Runtime(device="cpu", dtype="float32")
    fp32 = Encoder.load(ModelRef(model=str(exported), precision=Precision.fp32), cpu)
    index = AdIndex.build(ds.ads["ad_id"].to_pylist(), fp32.encode(ds.ads["text"].to_pylist(), kind="ad"), fp32.space)
    texts, qids = ds.queries["text"].to_pylist(), ds.queries["query_id"].to_pylist()
    qrels = qrels_from_labels(ds.labels)
    q_fp32 = fp32.encode(texts)  # (B, d)
    ref = retrieval_quality(index, q_fp32, qids, qrels)
    out = {}
    for precision in FAST_PATHS:
        q_fast = Encoder.load(ModelRef(model=str(exported), precision=precision), cpu).encode(texts)  # (B, d)
        fast = retrieval_quality(index, q_fast, qids, qrels)
        cosine = (q_fp32 * q_fast).sum(axis=1)  # (B,) both unit-norm
        drop = round((ref["R@100"] - fast["R@100"]) * 100, 3)
        out[precision.value] = {
            "catalogue": f"{n_ads} ads, {n_queries} queries", "R@100_fp32": round(ref["R@100"], 4),
            "R@100": round(fast["R@100"], 4), "R@100_drop_points": drop, "R@10_fp32": round(ref["R@10"], 4),
            "R@10": round(fast["R@10"], 4), "min_cosine": round(float(cosine.min()), 4),
            "mean_cosine": round(float(cosine.mean()), 4), "goal_max_drop_points": MAX_R100_DROP_POINTS,
            "within_goal": bool(drop <= MAX_R100_DROP_POINTS)}
    return out


def run(out_dir: Path, *, quick: bool = False, teacher: str = "teacher-default",
        student: str = "student-default") -> dict:
    n_latency, batch, n_batches, _, _ = SIZES[quick]
    queries, source = realistic_queries(max(n_latency, batch * n_batches))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Encoder.load(ModelRef(model=student, precision=Precision.fp32), Runtime(device="cpu", dtype="float32"))
        exported = fp32.save(Path(tmp) / "student")
        export_onnx(fp32, exported)
        del fp32
        numbers = _measure(teacher, student, exported, queries, source, quick)
    config = {"teacher": teacher, "student": student, "depths": list(DEPTHS), "batch": batch,
              "n_latency": n_latency, "n_batches": n_batches, "quick": quick}
    path = write_result(out_dir, "encoder", config, numbers)
    logger.info("encoder benchmark -> %s", path)
    return numbers


def _measure(teacher: str, student: str, exported: Path, queries: list[str], source: str, quick: bool) -> dict:
    n_latency, batch, n_batches, n_ads, n_queries = SIZES[quick]
    models = variants(teacher, student, exported)
    measured = speed({name: enc for name, (enc, _) in models.items()}, queries, n_latency, batch, n_batches)
    base = measured["teacher"]
    rows = [{"variant": name, "layers": num_layers(enc), **info, **measured[name],
             "latency_speedup": round(base["latency_p50_ms"] / measured[name]["latency_p50_ms"], 2),
             "throughput_speedup": round(measured[name]["throughput_qps"] / base["throughput_qps"], 2)}
            for name, (enc, info) in models.items()]
    del models
    row = {r["variant"]: r for r in rows}
    fp32 = row["student"]
    over_fp32 = {f"{p.value}_over_fp32_{what}_speedup": round(ratio, 2) for p in FAST_PATHS for what, ratio in (
        ("latency", fp32["latency_p50_ms"] / row[f"student-{p.value}"]["latency_p50_ms"]),
        ("throughput", row[f"student-{p.value}"]["throughput_qps"] / fp32["throughput_qps"]))}
    return {"queries": source, "latency_speedup_student": fp32["latency_speedup"],
            "throughput_speedup_student": fp32["throughput_speedup"], **over_fp32,
            "variants": rows, "recovery": recovery(exported, n_ads, n_queries)}


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
