"""The streaming updater: ad events → teacher embeddings (a Ray actor pool) → the delta log of the served version.

    python -m pipelines.stream_ads [--config configs/stream.yaml] [--set stream.index=ads]
    ray job submit --runtime-env runtime_env.yaml -- python -m pipelines.stream_ads --set stream.index=ads

Runs until SIGTERM/SIGINT. The actors are `embed.num_actors` teachers with `embed.num_cpus`/`embed.num_gpus` each
(`profile: gpu` puts them on GPUs). The logic is `hlm.updater.StreamUpdater`; this file only wires Ray into it.

Writes to Redis only: delta entries to hlm:{index}:v:{version}:delta (the version `current` names), malformed
events to hlm:{index}:ad_events:dead with their reason; it logs each batch and prints its counts when stopped.
"""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np
import ray
from ray.util import ActorPool

from hlm.cli import init_ray, job_parser, start_job
from hlm.config import ModelRef, Runtime
from hlm.encoder import Encoder, space_of
from hlm.redis_client import redis_client
from hlm.updater import StreamConfig, StreamUpdater


class Teacher:
    """One teacher per actor; `encode` is the `Encoder.encode` contract on ad texts."""

    def __init__(self, model: dict, runtime: dict, batch_size: int) -> None:
        self.encoder = Encoder.load(ModelRef.model_validate(model), Runtime.model_validate(runtime))
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts, kind="ad", batch_size=self.batch_size)  # (n, d)


class PoolEncode:
    """texts -> (n, d): one micro-batch split over the actor pool, results in input order."""

    def __init__(self, cfg: StreamConfig) -> None:
        actor = ray.remote(num_cpus=cfg.embed.num_cpus, num_gpus=cfg.embed.num_gpus)(Teacher)
        self.n = cfg.embed.num_actors
        self.pool = ActorPool([actor.remote(cfg.teacher.model_dump(), cfg.runtime.model_dump(), cfg.embed.batch_size)
                               for _ in range(self.n)])

    def __call__(self, texts: list[str]) -> np.ndarray:
        size = -(-len(texts) // self.n)
        parts = [texts[i:i + size] for i in range(0, len(texts), size)]
        return np.concatenate(list(self.pool.map(lambda a, part: a.encode.remote(part), parts)))


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, __file__).parse_args(argv)
    cfg: StreamConfig = start_job("stream_ads", args, schema=StreamConfig)
    job = cfg.stream
    init_ray(cfg.embed.num_actors * cfg.embed.num_cpus + 1, log_to_driver=False)
    updater = StreamUpdater(redis_client(job.redis_url), job.index, PoolEncode(cfg), space_of(cfg.teacher),
                            consumer=job.consumer, batch_size=job.batch_size, read_ahead=job.read_ahead,
                            block_ms=job.block_ms, max_text_chars=job.max_text_chars)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"updating index {job.index} from hlm:{job.index}:ad_events as {updater.consumer} "
          f"(teacher space {updater.space}); stop with SIGTERM", flush=True)
    counts = updater.run(stop, lease_s=job.lease_s)
    print(f"stopped: {counts.events} events ({counts.upserts} upserts, {counts.deletes} deletes, {counts.dead} "
          f"dead-lettered), {counts.written} delta entries written to hlm:{job.index}:v:*:delta")
    return 0


if __name__ == "__main__":
    sys.exit(main())
