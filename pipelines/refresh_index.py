"""The nightly index refresh: embed new and changed ads (Ray Data), reuse the rest, build FAISS, gate, publish.

    python -m pipelines.refresh_index --config configs/refresh.yaml [--set refresh.index=ads …]
    ray job submit --runtime-env runtime_env.yaml -- python -m pipelines.refresh_index --config configs/refresh.yaml

Exit status: 0 published, or nothing changed (nothing published); 1 the gate refused (nothing published);
2 bad config or data, or Redis unreachable. The logic is `hlm.refresh`; this file only wires the Ray Data
embedding job into it.

Writes a new index version to Redis (keys hlm:{refresh.index}:*) when the gate passes, and for every run
`refresh.work_dir/<run>/`: its embeddings, text hashes and run.json (counts, gate checks, version).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hlm.cli import init_ray, job_parser, start_job
from hlm.config import ConfigError
from hlm.refresh import EXIT_CODES, refresh
from pipelines.embed import local_pool_cpus, run_embed


def summary(rec: dict) -> str:
    """What the job prints: status, counts, gate checks, version, where the record is."""
    lines = [f"refresh {rec['index']} run {rec['run']}: {rec['status']}"
             + (f", published version {rec['published_version']}" if rec["published_version"] else "")]
    if rec["why_not"]:
        lines.append(f"  why: {rec['why_not']}")
    if counts := rec.get("counts"):
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if override := rec.get("override"):
        lines.append(f"  shrink guard overridden ({override['reason']}): {override['overridden']}")
    for name, c in (rec.get("gate") or {}).get("checks", {}).items():
        lines.append(f"  gate {name}: {c['status']} (value {c['value']}, threshold {c['threshold']}) {c['note']}")
    lines.append(f"  timings_s {rec['timings_s']}; run record {rec['record']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, __file__).parse_args(argv)
    cfg = start_job("refresh_index", args)

    def embed(input_path: Path, kind: str, out: Path) -> Path:  # Ray starts only when something must be embedded
        init_ray(local_pool_cpus(cfg), log_to_driver=False)
        run_embed(cfg, cfg.teacher, input_path, kind, out)
        return out

    try:
        record = refresh(cfg, embed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(record))
    return EXIT_CODES[record["status"]]


if __name__ == "__main__":
    sys.exit(main())
