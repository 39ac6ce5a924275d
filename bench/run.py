"""Run every benchmark and write `bench/results/<name>.json` plus `SUMMARY.md`.

    python -m bench.run --out bench/results [--quick] [--only embed]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import embed
from hlm.cli import setup_logging

BENCHMARKS = {"embed": embed.run}


def summary(out_dir: Path) -> Path:
    rows = ["| benchmark | numbers |", "|---|---|"]
    for f in sorted(out_dir.glob("*.json")):
        record = json.loads(f.read_text())
        rows.append(f"| {record['name']} | " + ", ".join(f"{k}={v}" for k, v in record["numbers"].items()) + " |")
    path = out_dir / "SUMMARY.md"
    path.write_text("# Benchmark summary\n\n" + "\n".join(rows) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CI smoke run")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = parser.parse_args(argv)
    setup_logging()
    for name in args.only or BENCHMARKS:
        numbers = BENCHMARKS[name](args.out, quick=args.quick)
        print(f"{name}: {numbers}")
    print(f"wrote {summary(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
