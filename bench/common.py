"""What every benchmark shares: machine description, result record, realistic queries, timing, threads, Redis."""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
HOMEDEPOT_DEV = REPO / "../shared/data/homedepot/dev.csv"


def machine() -> dict:
    # The load average says how much of the 2 cores other work took: absolute numbers from a busy box are
    # not comparable with a quiet one (ratios measured side by side still are).
    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "faiss_threads": faiss.omp_get_max_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch and FAISS (OpenMP) use `n` threads inside the block; the previous counts come back after it."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def write_result(out_dir: Path, name: str, config: dict, numbers: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    record = {"name": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "config": config, "numbers": numbers}
    path.write_text(json.dumps(record, indent=2))
    return path


def realistic_queries(n: int, seed: int = 0) -> tuple[list[str], str]:
    """(n distinct search strings, where they came from): Home Depot `search_term`s when the file is there."""
    if HOMEDEPOT_DEV.exists():
        with open(HOMEDEPOT_DEV, newline="", encoding="utf-8") as f:
            terms = list(dict.fromkeys(row["search_term"] for row in csv.DictReader(f) if row["search_term"].strip()))
        source = "homedepot dev.csv search_term"
    else:
        from hlm.catalog import generate_catalog

        terms = generate_catalog(n_ads=2000, n_queries=n, seed=seed).queries["text"].to_pylist()
        source = "hlm.catalog.generate_catalog"
    rng = np.random.default_rng(seed)
    return [terms[i] for i in rng.permutation(len(terms))[:n]], source


def interleaved_timings(fns: dict[str, Callable[[object], object]], inputs: list, *, warmup: int = 2,
                        ) -> dict[str, np.ndarray]:
    """Seconds per call of every fn on every input, taking the fns in turn for each input.

    Interleaving puts a burst of load from other processes on every variant alike, so the ratios between
    them hold on a shared machine even when the absolute numbers drift (`hlm.evaluation.encoder_speed`
    times one model after the other, which is fine on a quiet box only).
    """
    for fn in fns.values():
        for x in inputs[:warmup]:  # first calls pay for allocation and lazy init
            fn(x)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for x in inputs:
        for name, fn in fns.items():
            started = time.perf_counter()
            fn(x)
            seconds[name].append(time.perf_counter() - started)
    return {name: np.asarray(s) for name, s in seconds.items()}


def ms_percentiles(seconds: np.ndarray) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1e3, 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_redis(folder: Path) -> Iterator[str]:
    """A redis-server on a free loopback port, started with infra/redis/start.sh (as the tests do), stopped on exit."""
    port = free_port()
    pid = subprocess.run([str(REPO / "infra/redis/start.sh"), str(port), str(folder)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        subprocess.run(["kill", pid], check=False)


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """`<out_dir>/<name>.png` from a matplotlib figure (then closed): what a benchmark's `plot` returns."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
