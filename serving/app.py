"""The Ray Serve application: one hop by default, the `Api` replica that takes a request encodes and searches it.

    serve run serving.app:build_app student=runs/refine/model   # the student aligned to the index's teacher
    serve run serving/config.yaml               # the same, production-shaped (serve deploy it on a cluster)
    serve run serving.app:app                   # defaults: student-default, which is in its own space, so it
                                                # refuses a teacher-built index (503); for tests and own-space indexes

Deployments only wire: batching is `hlm.batcher.MicroBatcher`, encoding `hlm.encoder.Encoder`, search and refresh
`hlm.live_index.LiveIndex`, the HTTP contract `hlm.api`, the topology and the Serve options `hlm.deployment`
(docs/serving.md).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at run time
# through Serve's class-based ingress, and string annotations make it take the body for a query parameter.
import asyncio
import logging
import os

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from hlm.api import (
    API_KEY_ENV,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    EmbedRequest,
    EmbedResponse,
    SearchRequest,
    SearchResponse,
    resolve_api_key,
    search_response_json,
)
from hlm.batcher import MicroBatcher
from hlm.config import ModelRef, Profile, Runtime
from hlm.deployment import AppArgs, Topology, deployment_options, replica_threads, use_threads
from hlm.encoder import Encoder, space_of
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, StoreError

__all__ = ["AppArgs", "build_app"]  # AppArgs is imported from here by the config tests and operators' scripts
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


def _load_encoder(student: dict, runtime: dict) -> tuple[Encoder, dict]:
    encoder = Encoder.load(ModelRef.model_validate(student), Runtime.model_validate(runtime))
    s = encoder.settings
    info = {"model_version": f"{s.source or 'student'}@{s.weights_sha256[:12]}", "space": encoder.space,
            "dim": encoder.dim}
    return encoder, info


def _unavailable(detail: str) -> HTTPException:
    return HTTPException(status_code=503, headers={"Retry-After": "1"}, detail=detail)


def _encoder_timed_out(timeout_s: float) -> HTTPException:
    return _unavailable(f"no encoder replica answered within {timeout_s:g}s, retry")


@serve.deployment
class QueryEncoder:
    """The split topology's encoder tier: one call carries a whole batch of texts from an `Api` replica."""

    def __init__(self, student: dict, runtime: dict, threads: int):
        _log_through_serve()
        use_threads(threads)
        self.encoder, self._info = _load_encoder(student, runtime)

    async def encode(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.encode, texts)  # (B, d); the event loop takes the next call

    def info(self) -> dict:
        return self._info


api = FastAPI(title="HLM retrieval", description="Student query encoder against a teacher-built ad index.")
api.add_middleware(ApiKeyMiddleware)
api.add_middleware(BodyLimitMiddleware)  # added last, so it runs first: a 413 before anything reads the body


@serve.deployment
@serve.ingress(api)
class Api:
    """Owns the live index, and the student too unless `encoder` (the split topology's QueryEncoder) is given."""

    def __init__(self, student: dict, runtime: dict, threads: int, index: str, redis_url: str | None,
                 expected_space: str, poll_s: float, max_batch_size: int, batch_wait_timeout_s: float,
                 encoder: DeploymentHandle | None = None, api_key: SecretStr | None = None,
                 downstream_timeout_s: float = 10):
        _log_through_serve()
        use_threads(threads)
        self.remote_encoder, self.downstream_timeout_s = encoder, downstream_timeout_s
        self.encoder, self._info = _load_encoder(student, runtime) if encoder is None else (None, None)
        self.live = LiveIndex(IndexStore(redis_client(redis_url), index), expected_space, poll_s=poll_s)
        self.live.refresh()  # serve at once if a version is already published
        self.live.start()
        self.batcher = MicroBatcher(self._search_batch, max_batch_size=max_batch_size, max_wait_s=batch_wait_timeout_s)
        api.state.api_key = api_key.get_secret_value() if api_key else None  # read by ApiKeyMiddleware

    async def _encode(self, texts: list[str]) -> np.ndarray:
        """(B, d) for `texts`: here in a worker thread, or in one call to the encoder tier."""
        if self.remote_encoder is None:
            return await asyncio.to_thread(self.encoder.encode, texts)
        try:  # a timeout cancels the call in Serve too
            return await asyncio.wait_for(self.remote_encoder.encode.remote(texts), self.downstream_timeout_s)
        except RayActorError as e:
            raise _unavailable(f"an encoder replica died while serving this request, retry "
                               f"({type(e).__name__})") from e
        except TimeoutError as e:
            raise _encoder_timed_out(self.downstream_timeout_s) from e

    async def _search_batch(self, queries: list[SearchRequest]) -> list[tuple[list, str]]:
        """One forward pass (B, d) and one search of one index snapshot for the batch, in one worker thread when
        the student is here."""
        texts, ks = [q.query for q in queries], [q.k for q in queries]
        if self.remote_encoder is None:
            hits, version = await asyncio.to_thread(lambda: self.live.search(self.encoder.encode(texts), ks))
        else:
            hits, version = await asyncio.to_thread(self.live.search, await self._encode(texts), ks)
        return [(row, version) for row in hits]

    async def _model_info(self) -> dict:
        if self._info is None:  # the student is fixed for the life of this app version
            self._info = await asyncio.wait_for(self.remote_encoder.info.remote(), self.downstream_timeout_s)
        return self._info

    @api.post("/v1/search", response_model=SearchResponse)
    async def search(self, req: SearchRequest) -> Response:
        answer = self.batcher.submit(req)
        try:  # split: bounded from arrival, so a wait behind a batch stuck on the encoder tier counts too
            hits, version = await (answer if self.remote_encoder is None
                                   else asyncio.wait_for(answer, self.downstream_timeout_s))
        except TimeoutError as e:
            raise _encoder_timed_out(self.downstream_timeout_s) from e
        except StoreError as e:  # nothing loaded yet: the service is not ready, the request was fine
            logger.warning("search answered 503: %s (index status %s)", e, self.live.status())
            refusal = self.live.refusal()  # the user's to fix; Redis trouble stays in the log
            raise _unavailable("no index version is loaded on this replica yet, retry"
                               + (f"; {refusal}" if refusal else "")) from e
        model_version = (await self._model_info())["model_version"]
        return Response(search_response_json(hits, version, model_version), media_type="application/json")

    @api.post("/v1/embed", response_model=EmbedResponse)
    async def embed(self, req: EmbedRequest) -> EmbedResponse:
        emb = await self._encode(req.queries)  # (n, d): the request is a batch already
        info = await self._model_info()
        return EmbedResponse(embeddings=emb.tolist(), dim=info["dim"], space=info["space"],
                             model_version=info["model_version"])

    @api.get("/v1/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when a version is loaded, else 503: probes and load balancers read the status code, not the body."""
        version = self.live.status()["version"]
        return JSONResponse({"ok": version is not None, "index_version": version},
                            status_code=200 if version is not None else 503)

    @api.get("/v1/index")
    async def index_status(self) -> dict:
        return {**self.live.status(), "batches": self.batcher.stats()}

    def __del__(self):
        self.live.stop()


def build_app(args: dict) -> serve.Application:
    """Typed builder: `serve run serving.app:build_app key=value …` or the `args:` of serving/config.yaml."""
    cfg = AppArgs.model_validate(args)
    runtime = Runtime(device="cuda", dtype="bfloat16") if cfg.profile is Profile.gpu else Runtime(device="cpu")
    options = deployment_options(cfg)
    student = cfg.student.model_dump()
    encoder = None
    if cfg.topology is Topology.split:
        encoder = QueryEncoder.options(**options["QueryEncoder"]).bind(
            student, runtime.model_dump(), replica_threads(cfg, options["QueryEncoder"]))
    return Api.options(**options["Api"]).bind(
        student, runtime.model_dump(), replica_threads(cfg, options["Api"]), cfg.index,
        cfg.redis_url or os.environ.get("HLM_REDIS_URL"), space_of(cfg.student), cfg.poll_s, cfg.max_batch_size,
        cfg.batch_wait_timeout_s, encoder, _api_key(cfg), cfg.downstream_timeout_s)


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
