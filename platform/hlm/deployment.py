"""How the serving app is deployed: its typed arguments, and the Serve options of each deployment as one pure
function of them (`deployment_options`), so one unit test pins both profiles.

Topologies (docs/serving.md has the diagram):

* ``one_hop`` (default): the ``Api`` replica that receives a request owns the student and the live index; a batch
  of waiting queries is one forward pass and one FAISS search, off the event loop.
* ``split``: ``Api`` keeps the live index and sends each batch's texts to a ``QueryEncoder`` tier in one call, for
  clusters where encoder GPUs and index memory must scale apart.

Operators override any of these options the standard Serve way: a ``deployments:`` entry (``name: Api`` …) in
serving/config.yaml or the RayService's serveConfigV2 wins over what `deployment_options` computes.
"""

from __future__ import annotations

import math
import os
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from hlm.api import API_KEY_ENV
from hlm.config import ModelRef, Profile

# CPUs a replica asks for when args.replica_cpus is not set. On the A100 profile a replica tokenises and runs FAISS
# on the host cores (a p4d has 12 vCPUs per GPU, the KubeRay pod 8): 6 leaves room for Ray's own processes.
DEFAULT_CPUS = {("Api", "one_hop", Profile.cpu): 1, ("Api", "one_hop", Profile.gpu): 6,
                ("Api", "split", Profile.cpu): 1, ("Api", "split", Profile.gpu): 2,
                ("QueryEncoder", "split", Profile.cpu): 1, ("QueryEncoder", "split", Profile.gpu): 6}
ENCODER_TARGET_CALLS = 2  # split: each call is a whole batch; one computing and one waiting keeps the GPU busy


class Topology(StrEnum):
    one_hop = "one_hop"
    split = "split"


class AppArgs(BaseModel):
    """Arguments of `serving.app.build_app` (the `args:` block of serving/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    profile: Profile = Profile.cpu
    topology: Topology = Field(Topology.one_hop, description="one_hop: Api owns student + index; split: a "
                               "QueryEncoder tier encodes each batch (encoders and index memory scale apart)")
    student: ModelRef = Field(ModelRef(model="student-default"), description=(
        "the student to serve: a folder or a mapping {model, precision, …}. It must be in the space of the teacher "
        "that built the index (a student the recipe aligned to it); any other space, student-default's own "
        "included, has every index version refused and /v1/search answers 503"))
    index: str = Field("ads", description="index name in Redis (keys hlm:{index}:*)")
    redis_url: str | None = Field(None, description="default: $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    poll_s: float = Field(2.0, gt=0, description="how often replicas check hlm:{index}:current")
    max_batch_size: int = Field(32, ge=1, description="most queries in one forward pass and one FAISS search")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description=(
        "hold a batch that is not full this long for more queries; 0 = never (under load batches fill anyway "
        "while the previous one computes)"))
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0, description=(
        "requests in flight per Api replica that autoscaling aims for; default and minimum: max_batch_size"))
    upscale_delay_s: float = Field(10.0, ge=0, description="load above target this long adds replicas")
    downscale_delay_s: float = Field(120.0, ge=0, description="load below target this long removes replicas")
    look_back_period_s: float = Field(30.0, gt=0, description="window the autoscaler averages the load over")
    replica_cpus: float | None = Field(None, gt=0, description="CPUs per replica (default: by profile, "
                                       "see hlm.deployment.DEFAULT_CPUS)")
    threads: int | None = Field(None, ge=1, description="torch, tokenizer and FAISS threads per replica "
                                "(default: the replica's whole CPUs, at least 1)")
    max_queued_requests: int = Field(64, ge=1, description="requests a caller may queue per deployment beyond "
                                     "max_ongoing_requests before Serve answers 503 (Serve's default is unbounded: "
                                     "an overload then turns into timeouts and memory growth instead)")
    access_log: bool = Field(False, description="one log line per request in the replica logs (costly under load)")
    downstream_timeout_s: float = Field(10, gt=0, description=(
        "split: a batch no encoder replica answers in time (all restarting) is a 503 for its requests"))
    api_key: SecretStr | None = Field(None, description=(
        f"require this key on /v1/* except GET /v1/healthz; ${API_KEY_ENV} wins when set. Prefer the "
        "environment: these args are readable by anyone who can run `serve config`"))

    @field_validator("student", mode="before")
    @classmethod
    def _student_path(cls, value: object) -> object:
        """`student=PATH` (what `serve run serving.app:build_app student=PATH` passes) means {model: PATH}. A
        relative folder that exists here is made absolute: replicas do not share the caller's working directory."""
        if isinstance(value, str | Path):
            folder = Path(value).expanduser()
            return {"model": str(folder.resolve()) if folder.is_dir() else str(value)}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests < self.max_batch_size:
            raise ValueError(f"target_ongoing_requests ({self.target_ongoing_requests:g}) must be at least "
                             f"max_batch_size ({self.max_batch_size}), or batches never fill before Serve scales out")
        return self

    @property
    def target(self) -> float:
        return self.target_ongoing_requests or self.max_batch_size


def _autoscaling(args: AppArgs, target: float) -> dict:
    return {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": target,
            "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
            "look_back_period_s": args.look_back_period_s}


def _actor(args: AppArgs, name: str, on_gpu: bool) -> dict:
    cpus = args.replica_cpus or DEFAULT_CPUS[(name, args.topology.value, args.profile)]
    return {"num_cpus": cpus, "num_gpus": 1 if on_gpu and args.profile is Profile.gpu else 0}


def deployment_options(args: AppArgs) -> dict[str, dict]:
    """Deployment name -> the options `Deployment.options(**…)` takes (also valid `deployments:` entries).

    Api: ``max_ongoing_requests`` = 2 × target, so a replica holds a full batch computing and the next one
    queueing without the router backing off. Split: the QueryEncoder gets one call per batch per Api replica,
    so its ``max_ongoing_requests`` covers every Api replica's batch and an /v1/embed call each."""
    logs = {"enable_access_log": args.access_log}
    api = {"autoscaling_config": _autoscaling(args, args.target), "max_ongoing_requests": int(2 * args.target),
           "max_queued_requests": args.max_queued_requests,
           "ray_actor_options": _actor(args, "Api", on_gpu=args.topology is Topology.one_hop),
           "logging_config": logs}
    if args.topology is Topology.one_hop:
        return {"Api": api}
    encoder = {"autoscaling_config": _autoscaling(args, ENCODER_TARGET_CALLS),
               "max_ongoing_requests": 2 * args.max_replicas + ENCODER_TARGET_CALLS,
               "max_queued_requests": args.max_queued_requests,
               "ray_actor_options": _actor(args, "QueryEncoder", on_gpu=True), "logging_config": logs}
    return {"Api": api, "QueryEncoder": encoder}


def replica_threads(args: AppArgs, options: dict) -> int:
    """Threads for one replica with these options: args.threads, else its whole CPUs (at least 1)."""
    return args.threads or max(1, math.floor(options["ray_actor_options"]["num_cpus"]))


def use_threads(n: int) -> None:
    """Set torch, tokenizer (Rust rayon) and FAISS (OpenMP) thread counts in this process, before the first encode.

    Explicit because the defaults differ per library: Ray sets OMP_NUM_THREADS = floor(num_cpus) (so 0 CPUs
    means 1), while the tokenizers' rayon pool would take every core of the node."""
    import faiss
    import torch

    os.environ["RAYON_NUM_THREADS"] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if n > 1 else "false"
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
