"""The HTTP contract of the serving API: request and response models, validated before any work is done.

Bad input (empty or over-long query, k out of range, wrong JSON) fails validation and becomes a 4xx
with a message that names the field; it never reaches the encoder or the index.

An optional API key guards every ``/v1/*`` route except ``GET /v1/healthz`` (load balancers probe it
without credentials). Clients send ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; anything else
is a 401 checked before the body is read. The key comes from ``$HLM_API_KEY`` when set, else from the
app's ``api_key`` argument: the environment is where a platform injects secrets (a Kubernetes Secret, a
vault agent), so rotating it must not need a config edit, and Serve config ``args`` are readable by
anyone who can run ``serve config``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

MAX_QUERY_CHARS = 512
MAX_K = 1000
MAX_EMBED_BATCH = 256
# The largest valid body is an /v1/embed batch of MAX_EMBED_BATCH full-length queries, JSON-escaped (≤ 6 bytes a
# character for \uXXXX); anything larger is refused before it is read into memory.
MAX_BODY_BYTES = 6 * MAX_QUERY_CHARS * MAX_EMBED_BATCH + 4096


def _raw_length(text: object) -> object:
    # Before stripping: pydantic strips first, so padding would pass a max_length checked afterwards.
    if isinstance(text, str) and len(text) > MAX_QUERY_CHARS:
        raise ValueError(f"String should have at most {MAX_QUERY_CHARS} characters (whitespace included)")
    return text


QueryText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARS),
                      BeforeValidator(_raw_length)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: QueryText
    k: int = Field(10, ge=1, le=MAX_K, description="number of ads to return")


class ScoredAd(BaseModel):
    ad_id: str
    score: float


class SearchResponse(BaseModel):
    ads: list[ScoredAd]
    index_version: str
    model_version: str


def search_response_json(hits: list[tuple[str, float]], index_version: str, model_version: str) -> bytes:
    """The body of a 200 from ``/v1/search``, serialised once: the route returns these bytes as they are, with no
    second pass through ``SearchResponse`` (tests pin that the two agree)."""
    return json.dumps({"ads": [{"ad_id": ad_id, "score": float(score)} for ad_id, score in hits],
                       "index_version": index_version, "model_version": model_version},
                      separators=(",", ":")).encode()


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[QueryText] = Field(..., min_length=1, max_length=MAX_EMBED_BATCH)


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    space: str
    model_version: str


# ---------------------------------------------------------------------------------------------- API key

API_KEY_ENV = "HLM_API_KEY"
OPEN_ROUTES = frozenset({("GET", "/v1/healthz")})
MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
INVALID_KEY = "invalid API key"


def resolve_api_key(configured: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key the ingress requires: ``$HLM_API_KEY`` when set and non-empty, else ``configured``; None = open."""
    return environ.get(API_KEY_ENV) or configured or None


def needs_api_key(method: str, path: str, root_path: str = "") -> bool:
    """Every ``/v1/*`` route except the open ones; ``path`` may still carry the app's route prefix."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    return path.startswith("/v1/") and (method.upper(), path.rstrip("/")) not in OPEN_ROUTES


def _same_secret(presented: str, expected: str) -> bool:
    # Digests first: compare_digest is constant-time for equal lengths only, and this hides the key's length too.
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def api_key_problem(expected: str, authorization: str | None, x_api_key: str | None) -> str | None:
    """None when a header carries ``expected``; else the reason for the 401 (never echoing what was sent)."""
    presented = []
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            presented.append(credentials.strip())
    if x_api_key and x_api_key.strip():
        presented.append(x_api_key.strip())
    if not presented:
        return MISSING_KEY
    matches = [_same_secret(p, expected) for p in presented]  # check every one: no early exit to time
    return None if any(matches) else INVALID_KEY


Scope = MutableMapping[str, object]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class ApiKeyMiddleware:
    """Pure ASGI: a 401 before the body is read when the app has a key (``app.state.api_key``) and the route needs it.

    Not Starlette's ``BaseHTTPMiddleware``, which wraps every request and response in extra tasks and streams.
    The key is read per request from the app's state because a Serve replica sets it in its constructor, after
    the middleware stack was declared at import time."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive, send) -> None:
        app_state = getattr(scope.get("app"), "state", None)
        expected = getattr(app_state, "api_key", None)
        if scope["type"] == "http" and expected and needs_api_key(scope["method"], scope["path"],
                                                                   scope.get("root_path", "")):
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            problem = api_key_problem(expected, headers.get("authorization"), headers.get("x-api-key"))
            if problem:
                await _send_json(send, 401, problem, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Pure ASGI: a 413 for a body over ``MAX_BODY_BYTES``, from its Content-Length before reading it, or as soon as
    a chunked body's bytes pass the limit (the app then sees the client go away), so an oversized request never
    sits whole in a replica's memory."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"request body over {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, too_big)
            return
        seen, refused = 0, False

        async def counted_receive() -> dict:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not refused:
                refused = True
                await _send_json(send, 413, too_big)
            return {"type": "http.disconnect"} if refused else message

        async def guarded_send(message: dict) -> None:
            if not refused:  # after the 413 the app's own answer (to a "disconnected" client) goes nowhere
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
