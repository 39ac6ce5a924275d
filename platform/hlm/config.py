"""Typed job configuration: defaults here, a YAML file over them, then dotted `--set` overrides.

Order of precedence (last wins): field defaults → the profile's defaults (`cpu` | `gpu`) → the YAML
file → `--set key.sub=value`. One switch, `profile`, selects device, dtype and batch sizes. An unknown
key is an error that names it. Every job prints and saves the config it ran with.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hlm.choices import (  # noqa: F401 (re-exported: the config is where jobs take its choices from)
    AlignmentObjective,
    ContrastiveObjective,
    Phase,
    Pooling,
    Precision,
    Profile,
    Schedule,
    Width,
)
from hlm.redis_client import redact

logger = logging.getLogger(__name__)


class Section(BaseModel):
    """A config section: unknown keys are an error (a typo never silently falls back to a default)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class Runtime(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when present")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = bfloat16 on CUDA, float32 on CPU")


class ModelRef(Section):
    """Which encoder to load: a folder saved by `Encoder.save`, an HF folder, or `teacher-default`/`student-default`."""

    model: str
    pooling: Pooling | None = Field(None, description="override the folder's pooling (None = keep)")
    max_length: int | None = Field(None, gt=0, description="override the folder's max tokens (None = keep)")
    query_prompt: str | None = Field(None, description="instruction prefixed to queries only (None = keep)")
    precision: Precision | None = Field(
        None, description="inference precision: fp32 | bf16 | fp16 (GPU) | int8 (CPU); None = runtime.dtype "
        "(fp32 on CPU, bf16 with profile gpu). encode() returns float32 whatever it is")


class EmbedJob(Section):
    """Ray Data batch inference of the teacher (or any encoder) over ads or queries."""

    batch_size: int = Field(64, gt=0, description="rows per encoder call")
    num_actors: int = Field(1, gt=0, description="encoder replicas in the actor pool")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per encoder actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor (1 on A100 workers)")
    rows_per_file: int = Field(50_000, gt=0, description="output rows per Parquet file (a hint)")


class LoraSettings(Section):
    """Low-rank adapters for the teacher phase (peft): W + (alpha/r)·B·A on the target matrices, the rest frozen."""

    r: int = Field(16, gt=0, description="adapter rank (the paper's best teacher run: 256)")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the update is (alpha / r)·B·A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names to adapt; None = peft's default for the architecture (query/value "
        "projections of BERT, Qwen3, Llama); MPNet needs them named, e.g. [q, v]")


class TrainJob(Section):
    """One phase of the HARNESS-LM recipe (`hlm.train`)."""

    phase: Phase = Field(
        Phase.align, description="teacher: fine-tune the dual encoder; align: L2 to teacher query embeddings; "
        "prune: drop layers step by step, re-aligning after each; refine: InfoNCE against frozen teacher ads")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW), reached after warmup")
    min_lr: float = Field(0.0, ge=0, description="where the cosine/linear decay ends")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay on matrices only (not biases, norms)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from ~0 to lr over this many steps")
    schedule: Schedule = Field("cosine", description="decay after warmup")
    epochs: int = Field(1, gt=0, description="passes over the training rows (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps in all; None = epochs × rows/batch")
    batch_size: int = Field(32, gt=0, description="rows per step and worker; contrastive phases gather the "
                            "batches of all workers as in-batch negatives")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = off)")
    temperature: float = Field(0.05, gt=0, description="τ of the contrastive losses and of score_kl")
    margin: float = Field(0.1, description="qwen3 loss: drop negatives scoring above s(q, d+) + margin")
    objective: AlignmentObjective = Field(AlignmentObjective.L2, description="alignment loss (align, prune)")
    contrastive: ContrastiveObjective = Field(ContrastiveObjective.INFO_NCE,
                                              description="contrastive loss (teacher, refine)")
    l2_weight: float = Field(0.0, ge=0, description="refine: + λ·L2 to the teacher's query embeddings")
    hard_negatives: int = Field(3, ge=0, description="refine (and teacher, given teacher embeddings): ads mined per "
                                "pair from the teacher's ranking as negatives; 0 = in-batch negatives only")
    hard_negative_ranks: tuple[int, int] = Field((0, 30), description="the teacher ranks [from, to) mined from; with "
                                                 "sparse judgements start below the top, where unjudged ads are "
                                                 "mostly relevant")
    width: Width = Field(
        "projection", description="when the student is narrower than the teacher: a linear head into the "
        "teacher's width, or the first d_student teacher dims renormalised (a truncated teacher space)")
    projection_init: Literal["least_squares", "orthogonal"] = Field(
        "least_squares", description="align/prune: a fresh projection head starts as the ridge least-squares map "
        "from the student's pooled features to the teacher's query embeddings (fit on up to 4,096 training "
        "queries), or as a random isometry; refine always starts a fresh head orthogonal (contrastive only)")
    prune_schedule: list[int] = Field(default_factory=list, description="layer counts, decreasing, e.g. [4, 3, 2]")
    steps_per_prune: int = Field(100, gt=0, description="re-alignment steps after each pruning step")
    checkpoint_every: int = Field(0, ge=0, description="write a checkpoint every N steps (0 = only at the end)")
    log_every: int = Field(10, gt=0, description="log loss and samples/s every N steps")
    eval_k: int = Field(100, gt=0, description="k of the retrieval metrics (the paper's P@100)")
    seed: int = Field(0, description="seeds batch order and dropout; a resumed run replays the same steps")
    lora: LoraSettings | None = Field(None, description="phase teacher: train LoRA adapters instead of all weights; "
                                      "checkpoints hold the merged plain model")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, "
                                         "~30% more compute")
    mixed_precision: Literal["auto", "off", "bf16"] = Field(
        "auto", description="bf16 autocast of the forward passes over fp32 weights and optimizer state; "
        "'auto' = bf16 on CUDA, off on CPU")
    prune_ffn_ratio: float = Field(1.0, gt=0, le=1, description="fraction of the FFN width each prune step keeps "
                                   "(the neurons with the largest weights); 1 = drop layers only")

    @field_validator("prune_schedule")
    @classmethod
    def _decreasing(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v) or any(a <= b for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"must be positive layer counts in decreasing order, got {v}")
        return v

    @field_validator("hard_negative_ranks")
    @classmethod
    def _rank_window(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"must be ranks [from, to) with 0 <= from < to, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _lora_is_for_the_teacher(self) -> TrainJob:
        if self.lora is not None and self.phase is not Phase.teacher:
            raise ValueError(f"lora: only phase teacher trains adapters, this is phase {self.phase}")
        return self


class RefreshJob(Section):
    """The nightly index refresh (`hlm.refresh`): embed new and changed ads, drop deleted ones, gate, publish."""

    ads: str = Field("", description="Parquet file or folder of the current ad catalogue (required by the job)")
    index: str = Field("ads", description="index name in Redis: keys hlm:{index}:*")
    factory: str = Field("Flat", description="FAISS index_factory string, e.g. Flat, HNSW32, IVF4096,PQ64")
    nprobe: int | None = Field(None, gt=0, description="IVF: lists searched per query (stored serving default)")
    ef_search: int | None = Field(None, gt=0, description="HNSW or an IVF's HNSW quantizer: search breadth")
    k_factor: float | None = Field(None, ge=1, description="…,Refine(SQ8) / …,RFlat: candidates re-scored per k")
    redis_url: str | None = Field(None, description="None = $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    work_dir: str = Field("runs/refresh", description="one folder per run: embeddings, text hashes, run record; "
                          "the published version's folder is the next run's previous state, so keep it")
    min_recall: float = Field(0.95, ge=0, description="gate: ANN recall@10 vs exact search, ad vectors as queries")
    recall_sample: int = Field(1000, gt=0, description="how many ad vectors the recall gate uses as queries")
    canary_queries: str | None = Field(None, description="gate: canary queries (Parquet, queries contract)")
    canary_labels: str | None = Field(None, description="gate: labels of the canary queries (labels contract)")
    max_quality_drop: float = Field(0.02, ge=0, description="gate: largest absolute drop of the primary metric "
                                    "(P@100) on the canary set vs the serving version")
    keep_versions: int = Field(3, gt=0, description="published versions kept in Redis after a publish (gc)")
    # A truncated but valid export looks like mass deletion, and the recall gate passes on the survivors.
    max_deleted_fraction: float = Field(0.2, ge=0, le=1, description="refuse when more than this fraction of the "
                                        "published ads would be deleted")
    max_shrink_fraction: float = Field(0.1, ge=0, le=1, description="refuse when the index would shrink by more "
                                       "than this fraction of the published ads (deletions net of new ads)")
    expected_rows_file: str | None = Field(None, description="a file the upstream export writes holding its total "
                                           "row count (one integer); refuse when it is missing or the Parquet "
                                           "files hold another number of rows")
    override_shrink_guard: str = Field("", description="a reason to publish past the three limits above "
                                       "(one run, e.g. --set refresh.override_shrink_guard='catalogue cut'); "
                                       "logged and kept in run.json")
    lease_s: float = Field(600, gt=0, description="TTL of the run's lease in Redis (renewed every third of it "
                           "while the run lives): how long a killed run blocks the next one")

    @model_validator(mode="after")
    def _canary_pair(self) -> RefreshJob:
        if (self.canary_queries is None) != (self.canary_labels is None):
            raise ValueError("canary_queries and canary_labels go together: set both or neither")
        return self


class TrainCluster(Section):
    """How `pipelines.train` runs on Ray Train: workers, devices, where runs and checkpoints live, retries."""

    num_workers: int = Field(1, gt=0, description="training workers (DDP ranks); each trains on its 1/n of the rows")
    use_gpu: bool = Field(False, description="one GPU per worker (`profile: gpu` sets it)")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs reserved per worker; Ray sets OMP_NUM_THREADS, hence "
                                 "torch's intra-op threads, to it (one worker on a 2-core box: 2)")
    storage_path: str = Field("runs/ray_results", description="Ray Train run folders: checkpoints and resume "
                              "state; a relative path is taken from the working directory; use shared storage "
                              "(s3://, gs://, NFS) on a multi-node cluster")
    # 1, not Ray's 0: one lost node or OOM-killed worker should cost a restart from the last checkpoint, not the run
    max_failures: int = Field(1, ge=-1, description="restart the workers from the latest checkpoint this many "
                              "times (-1 = forever, e.g. on spot instances; 0 = fail on the first worker death)")
    num_to_keep: int = Field(2, gt=0, description="checkpoints kept in storage (the newest is always kept)")


class Config(Section):
    profile: Profile = Profile.cpu
    seed: int = 0
    runtime: Runtime = Runtime()
    teacher: ModelRef = ModelRef(model="teacher-default")
    student: ModelRef = ModelRef(model="student-default")
    embed: EmbedJob = EmbedJob()
    train: TrainJob = TrainJob()
    cluster: TrainCluster = TrainCluster()
    refresh: RefreshJob = RefreshJob()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML, any URL's password replaced by *** (a run folder is no place for one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(redact(self.to_yaml()))
        return path


# What `profile: gpu` changes; anything the user sets explicitly still wins.
PROFILES: dict[Profile, dict[str, Any]] = {
    Profile.cpu: {"runtime": {"device": "cpu", "dtype": "float32"}},
    Profile.gpu: {
        "runtime": {"device": "cuda", "dtype": "bfloat16"},
        "embed": {"batch_size": 512, "num_gpus": 1.0, "num_cpus": 4.0},
        "cluster": {"use_gpu": True},
    },
}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """'embed.batch_size=128' -> (['embed', 'batch_size'], 128): the value is read as YAML, then the schema casts it.

    Quote values that YAML would read as a mapping: `--set "teacher.query_prompt='Query: '"`.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from e
    return key.strip().split("."), value


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _unshared(node: Any) -> Any:
    """A copy in which no two keys share a mapping: YAML aliases (`refine: *fast`) load as one object, and an
    override of one of them would otherwise change all of them."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    return [_unshared(v) for v in node] if isinstance(node, list) else node


def _section_defaults(schema: type[BaseModel]) -> dict[str, Any]:
    """Sections whose default is an instance (`student: ModelRef = ModelRef(model=...)`) as dicts.

    Merged under the user's values so `student.pooling=cls` keeps the default `model`: a partial dict
    would otherwise replace the default instance and lose its required fields.
    """
    return {name: f.default.model_dump() for name, f in schema.model_fields.items() if isinstance(f.default, BaseModel)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[Config] = Config) -> Config:
    """Build a validated config from an optional YAML file and `key.sub=value` overrides."""
    user: dict[str, Any] = {}
    if path is not None:
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: a config file must be a mapping, got {type(user).__name__}")
        user = _unshared(user)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = user
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    try:
        profile = Profile(user.get("profile", Profile.cpu.value))
    except ValueError as e:
        raise ConfigError(f"profile: must be one of {[p.value for p in Profile]}, got {user.get('profile')!r}") from e
    merged = _deep_merge(_deep_merge(_section_defaults(schema), PROFILES[profile]), user)
    try:
        return schema.model_validate(merged)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path or 'config'}: {problems}") from e
