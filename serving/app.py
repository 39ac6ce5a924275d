"""The Ray Serve application: FastAPI ingress → QueryEncoder (student, batched) → AdIndex (FAISS, hot swap).

    serve run serving.app:app                  # local, defaults (student-default, index "ads")
    serve run serving.app:build_app index=ads  # builder with arguments
    serve deploy serving/config.yaml           # the production-shaped config

Deployments only wire: encoding is `hlm.encoder.Encoder`, search and refresh are `hlm.live_index.LiveIndex`,
the HTTP contract is `hlm.api`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at run time
# through Serve's class-based ingress, and string annotations make it take the body for a query parameter.
import asyncio
import logging
import os

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from hlm.api import (
    API_KEY_ENV,
    EmbedRequest,
    EmbedResponse,
    ScoredAd,
    SearchRequest,
    SearchResponse,
    api_key_problem,
    needs_api_key,
    resolve_api_key,
)
from hlm.config import ModelRef, Profile, Runtime
from hlm.encoder import Encoder, space_of
from hlm.live_index import LiveIndex
from hlm.store import IndexStore, StoreError, redis_client

logger = logging.getLogger("serving")


class _ToServeLog(logging.Handler):
    """Hands a record to the replica's `ray.serve` logger: its replica log file and stderr, with the replica id."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray.serve").handle(record)


def _log_through_serve() -> None:
    """In a replica, `hlm` and `serving` log at INFO through Serve's logger. Otherwise their records reach only
    Python's last-resort handler: bare WARNING+ lines on the worker's stderr, and no "serving version …" at all."""
    for name in ("hlm", "serving"):
        named = logging.getLogger(name)
        if not any(isinstance(h, _ToServeLog) for h in named.handlers):
            named.addHandler(_ToServeLog())
            named.setLevel(logging.INFO)
            named.propagate = False


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` block of serving/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    profile: Profile = Profile.cpu
    student: ModelRef = ModelRef(model="student-default")
    index: str = Field("ads", description="index name in Redis (keys hlm:{index}:*)")
    redis_url: str | None = Field(None, description="default: $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    poll_s: float = Field(2.0, gt=0, description="how often replicas check hlm:{index}:current")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    downstream_timeout_s: float = Field(10, gt=0, description=(
        "a request waiting longer on the encoder or index (no live replica, a restart) is a 503 instead"))
    api_key: SecretStr | None = Field(None, description=(
        f"require this key on /v1/* except GET /v1/healthz; ${API_KEY_ENV} wins when set. Prefer the "
        "environment: these args are readable by anyone who can run `serve config`"))


@serve.deployment(max_ongoing_requests=64)
class QueryEncoder:
    def __init__(self, student: dict, runtime: dict, max_batch_size: int, batch_wait_timeout_s: float):
        _log_through_serve()
        self.encoder = Encoder.load(ModelRef.model_validate(student), Runtime.model_validate(runtime))
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        s = self.encoder.settings
        self.version = f"{s.source or 'student'}@{s.weights_sha256[:12]}"

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode(texts))  # one forward pass for the whole batch

    async def encode(self, text: str) -> np.ndarray:
        return await self.encode_batch(text)

    def info(self) -> dict:
        return {"model_version": self.version, "space": self.encoder.space, "dim": self.encoder.dim}


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class AdIndex:
    def __init__(self, index: str, redis_url: str | None, expected_space: str, poll_s: float):
        _log_through_serve()
        self.live = LiveIndex(IndexStore(redis_client(redis_url), index), expected_space, poll_s=poll_s)
        self.live.refresh()  # serve at once if a version is already published
        self.live.start()

    def search(self, q_emb: np.ndarray, k: int) -> tuple[list[tuple[str, float]], str]:
        hits, version = self.live.search(q_emb[None, :], k)
        return hits[0], version

    def status(self) -> dict:
        return self.live.status()

    def __del__(self):
        self.live.stop()


api = FastAPI(title="HLM retrieval", description="Student query encoder against a teacher-built ad index.")


@api.middleware("http")
async def require_api_key(request: Request, call_next):
    """401 before the body is read when the app has a key and the route needs it (see `hlm.api`)."""
    expected = getattr(request.app.state, "api_key", None)
    if expected and needs_api_key(request.method, request.scope["path"], request.scope.get("root_path", "")):
        problem = api_key_problem(expected, request.headers.get("authorization"), request.headers.get("x-api-key"))
        if problem:
            return JSONResponse({"detail": problem}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


async def downstream(response: DeploymentResponse, timeout_s: float):
    """The result of a call to another deployment, or a 503 with Retry-After when the replica holding the request
    died or no replica answered within `timeout_s` (the only one is restarting, say).

    Serve routes new requests to live replicas and the controller replaces a dead one, so a client's retry
    succeeds; what must not happen is a 500, or a request queued for as long as a restart takes."""
    try:
        return await asyncio.wait_for(response, timeout_s)  # a timeout cancels the request in Serve too
    except RayActorError as e:
        raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                            detail=f"a replica died while serving this request, retry ({type(e).__name__})") from e
    except TimeoutError as e:
        raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                            detail=f"no replica answered within {timeout_s:g}s, retry") from e


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Api:
    def __init__(self, encoder: DeploymentHandle, index: DeploymentHandle, api_key: SecretStr | None = None,
                 downstream_timeout_s: float = 10):
        _log_through_serve()
        self.encoder, self.index, self.downstream_timeout_s = encoder, index, downstream_timeout_s
        self._info: dict | None = None
        api.state.api_key = api_key.get_secret_value() if api_key else None  # read by require_api_key

    async def _call(self, response: DeploymentResponse):
        return await downstream(response, self.downstream_timeout_s)

    async def encoder_info(self) -> dict:
        if self._info is None:  # the student is fixed for the life of this app version
            self._info = await self._call(self.encoder.info.remote())
        return self._info

    @api.post("/v1/search", response_model=SearchResponse)
    async def search(self, req: SearchRequest) -> SearchResponse:
        q_emb = await self._call(self.encoder.encode.remote(req.query))
        info = await self.encoder_info()
        try:
            hits, version = await self._call(self.index.search.remote(q_emb, req.k))
        except StoreError as e:  # nothing loaded yet: the service is not ready, the request was fine
            raise HTTPException(status_code=503, detail=str(e)) from e
        return SearchResponse(ads=[ScoredAd(ad_id=a, score=s) for a, s in hits], index_version=version,
                              model_version=info["model_version"])

    @api.post("/v1/embed", response_model=EmbedResponse)
    async def embed(self, req: EmbedRequest) -> EmbedResponse:
        rows = [self.encoder.encode.remote(q) for q in req.queries]  # fan out: they batch on the replica
        emb = [await self._call(r) for r in rows]
        info = await self.encoder_info()
        return EmbedResponse(embeddings=[e.tolist() for e in emb], dim=info["dim"], space=info["space"],
                             model_version=info["model_version"])

    @api.get("/v1/healthz")
    async def healthz(self) -> dict:
        status = await self._call(self.index.status.remote())
        return {"ok": status["version"] is not None, "index_version": status["version"]}

    @api.get("/v1/index")
    async def index_status(self) -> dict:
        return await self._call(self.index.status.remote())


def build_app(args: dict) -> serve.Application:
    """Typed builder: `serve run serving.app:build_app key=value …` or the `args:` of serving/config.yaml."""
    cfg = AppArgs.model_validate(args)
    runtime = Runtime(device="cuda", dtype="bfloat16") if cfg.profile is Profile.gpu else Runtime(device="cpu")
    encoder = QueryEncoder.options(
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
        max_ongoing_requests=max(64, 2 * cfg.max_batch_size),
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if cfg.profile is Profile.gpu else 0},
    ).bind(cfg.student.model_dump(), runtime.model_dump(), cfg.max_batch_size, cfg.batch_wait_timeout_s)
    index = AdIndex.bind(cfg.index, cfg.redis_url or os.environ.get("HLM_REDIS_URL"), space_of(cfg.student),
                         cfg.poll_s)
    return Api.bind(encoder, index, _api_key(cfg), cfg.downstream_timeout_s)


def _api_key(cfg: AppArgs) -> SecretStr | None:
    configured = cfg.api_key.get_secret_value() if cfg.api_key else None
    key = resolve_api_key(configured)
    if key and configured and key != configured:
        logger.warning("$%s is set and overrides args.api_key", API_KEY_ENV)
    logger.info("ingress API key: %s", "required on /v1/* except GET /v1/healthz" if key else "none (open)")
    return SecretStr(key) if key else None  # SecretStr: a repr or a log line of the args shows '**********'


def __getattr__(name: str):
    # `serve run serving.app:app` builds the default app on demand; replicas importing this module don't.
    if name == "app":
        return build_app({})
    raise AttributeError(name)
