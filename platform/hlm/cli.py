"""What every job shares: the `--config`/`--set` flags, logging, seeding, and echoing the config it ran."""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np

from hlm.config import Config, ConfigError, load_config
from hlm.redis_client import redact

logger = logging.getLogger("hlm")


def command_parser(doc: str, module_file: str) -> argparse.ArgumentParser:
    """The parser of the job in `module_file`, with its `--help` written from the module docstring `doc`.

    The usage line names the command a user types (`python -m pipelines.<job>`; argparse alone says `<job>.py`, or
    `__main__.py`), the first docstring line is the description, and the rest (examples, what the job writes) is
    printed as written after the options. The command comes from the file, not from `__main__`, so the help is the
    same however the parser is built (a test, `ray job submit`).
    """
    path = Path(module_file)
    first, _, rest = doc.strip("\n").partition("\n")
    return argparse.ArgumentParser(prog=f"python -m {path.parent.name}.{path.stem}", description=first,
                                   epilog=rest.strip("\n") or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def job_parser(doc: str, module_file: str) -> argparse.ArgumentParser:
    """`command_parser` plus the `--config`/`--set` flags of every job that reads the typed config."""
    parser = command_parser(doc, module_file)
    parser.add_argument("--config", type=Path, help="YAML config (typed; see hlm/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set embed.batch_size=128 (repeatable)")
    return parser


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from packages or paths, never a hub


def start_job(name: str, args: argparse.Namespace, out_dir: Path | None = None,
              schema: type[Config] = Config) -> Config:
    """Logging, config (printed, and saved into `out_dir` when given), seeds. Exits 2 on a bad config."""
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides, schema)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    logger.info("%s: config\n%s", name, redact(cfg.to_yaml()))  # a Redis URL may carry a password: never log it
    if out_dir is not None:
        cfg.save(Path(out_dir) / f"{name}.config.yaml")  # redacted too
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    try:
        import torch

        torch.manual_seed(cfg.seed)
    except ImportError:
        pass
    return cfg


def init_ray(local_cpus: float | None = None, **kwargs) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS, or a `ray start` cluster on this machine), else
    start a local one with at least `local_cpus` logical CPUs.

    Jobs size `local_cpus` as their actors plus one: a cluster with only as many CPUs as cores cannot hold
    two encoder actors *and* give Ray Data a slot to read and write on a 2-core machine.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    cpus = max(os.cpu_count() or 1, math.ceil(local_cpus)) if local_cpus else None
    try:
        ray.init(num_cpus=cpus, **kwargs)
    except ValueError:  # found a running `ray start` cluster: its size is not ours to set
        ray.init(**kwargs)
    logger.info("ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
