"""Run the benchmarks and write `bench/results/<name>.json`, a PNG or two per benchmark, and `SUMMARY.md`.

    python -m bench.run --out bench/results [--quick] [--only encoder --only faiss_scale] [--threads 1]

A benchmark is a module in `bench/` with `run(out_dir: Path, *, quick: bool) -> dict` that writes
`<out_dir>/<name>.json` through `bench.common.write_result`, and optionally `plot(record, out_dir) -> list[Path]`
and `problems(numbers) -> list[str]` (non-empty: the run exits 1 after writing everything, e.g. load's errors).
Add one by importing it and naming it in BENCHMARKS. The summary is rebuilt from every JSON in the folder, so a
run with `--only` keeps the other benchmarks' last results in it.

Threads: one torch and one FAISS thread by default, as a Serve replica gets (num_cpus=1 → OMP_NUM_THREADS=1). On
a shared 2-core machine OpenMP at 2 threads can be an order of magnitude slower than at 1 (measured with others'
jobs running: student batch-1 p50 1,981 ms at 2 threads vs 135 ms at 1; FAISS PQ training 87 s vs 9.5 s), which
would swamp every comparison; `--threads 2` measures the other policy on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from types import ModuleType

from bench import embed, encoder, faiss_scale, load, serving, stream, train_throughput
from bench.common import threads
from hlm.cli import setup_logging

logger = logging.getLogger(__name__)

BENCHMARKS: dict[str, ModuleType] = {"embed": embed, "encoder": encoder, "faiss_scale": faiss_scale,
                                     "train_throughput": train_throughput, "serving": serving, "load": load,
                                     "stream": stream}


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(numbers: dict) -> str:
    """Markdown for a `numbers` dict: scalars as one metric/value table, each list of rows and each sub-dict as its
    own table under the key's name."""
    scalars = {k: v for k, v in numbers.items() if not isinstance(v, dict | list)}
    parts = ["| metric | value |\n|---|---|\n" + "".join(f"| {k} | {_cell(v)} |\n" for k, v in scalars.items())]
    for key, value in numbers.items():
        if isinstance(value, dict):
            parts.append(f"**{key}**\n\n{table(value)}")
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            columns = list(dict.fromkeys(c for r in value for c in r))
            rows = "".join("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |\n" for r in value)
            parts.append(f"**{key}**\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n" + rows)
    return "\n".join(parts)


def summary(out_dir: Path) -> Path:
    """SUMMARY.md (and the plots) from every `<name>.json` in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    sections = []
    for f in sorted(out_dir.glob("*.json")):
        record = json.loads(f.read_text())
        module = BENCHMARKS.get(record["name"])
        plots = module.plot(record, out_dir) if module is not None and hasattr(module, "plot") else []
        m = record["machine"]
        sections.append(
            f"## {record['name']}\n\n{record['created_at']}; {m['cpus']} CPUs, torch {m['torch']} on "
            f"{m['torch_threads']} threads, load average {m.get('load_avg_1m', 'n/a')}; config "
            f"`{json.dumps(record['config'])}`\n\n{table(record['numbers'])}\n"
            + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    path = out_dir / "SUMMARY.md"
    path.write_text("# Benchmark summary\n\nSpeed is compared side by side within a run; a busy machine (high load "
                    "average) moves absolute numbers more than ratios.\n\n" + "\n".join(sections))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CI smoke run")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1, as a replica)")
    args = parser.parse_args(argv)
    setup_logging()
    failed = []
    with threads(args.threads):
        for name in args.only or BENCHMARKS:
            started = time.perf_counter()
            numbers = BENCHMARKS[name].run(args.out, quick=args.quick)
            print(f"{name} ({time.perf_counter() - started:.0f}s): {json.dumps(numbers)}")
            check = getattr(BENCHMARKS[name], "problems", None)
            failed += [f"{name}: {p}" for p in (check(numbers) if check else [])]
    print(f"wrote {summary(args.out)}")
    for problem in failed:
        print(f"FAILED {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
