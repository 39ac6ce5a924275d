"""The ingress API key check as pure functions: where the key comes from, which routes need it, what passes."""

from __future__ import annotations

import hmac
import logging

import pytest

from hlm import api
from hlm.api import INVALID_KEY, MISSING_KEY, api_key_problem, needs_api_key, resolve_api_key

KEY = "k3y-0123456789abcdef"


@pytest.mark.parametrize("configured, environ, expected", [
    (None, {}, None),
    ("", {}, None),
    ("from-config", {}, "from-config"),
    (None, {"HLM_API_KEY": "from-env"}, "from-env"),
    ("from-config", {"HLM_API_KEY": "from-env"}, "from-env"),  # the environment wins
    ("from-config", {"HLM_API_KEY": ""}, "from-config"),  # an empty variable counts as unset
])
def test_the_environment_wins_over_the_configured_key(configured, environ, expected):
    assert resolve_api_key(configured, environ) == expected


@pytest.mark.parametrize("method, path, root_path, needed", [
    ("POST", "/v1/search", "", True),
    ("POST", "/v1/embed", "", True),
    ("GET", "/v1/index", "", True),
    ("GET", "/v1/unknown", "", True),  # a 401 before the 404: the route map is not disclosed either
    ("GET", "/v1/healthz", "", False),
    ("GET", "/v1/healthz/", "", False),
    ("get", "/v1/healthz", "", False),
    ("POST", "/v1/healthz", "", True),
    ("GET", "/docs", "", False),
    ("GET", "/openapi.json", "", False),
    ("POST", "/secured/v1/search", "/secured", True),  # an app under a route prefix
    ("GET", "/secured/v1/healthz", "/secured", False),
])
def test_every_v1_route_but_get_healthz_needs_the_key(method, path, root_path, needed):
    assert needs_api_key(method, path, root_path) is needed


@pytest.mark.parametrize("authorization, x_api_key, problem", [
    (f"Bearer {KEY}", None, None),
    (f"bearer  {KEY} ", None, None),
    (None, KEY, None),
    ("Basic dXNlcjpwYXNz", KEY, None),  # another scheme is ignored when X-API-Key carries the key
    (f"Bearer {KEY}x", KEY, None),  # either header may carry it
    (None, None, MISSING_KEY),
    ("", "  ", MISSING_KEY),
    ("Bearer", None, MISSING_KEY),
    (KEY, None, MISSING_KEY),  # no scheme
    ("Basic dXNlcjpwYXNz", None, MISSING_KEY),
    (f"Bearer {KEY[:-1]}", None, INVALID_KEY),
    (None, KEY.upper(), INVALID_KEY),
    (f"Bearer {KEY}", "wrong", None),
])
def test_a_request_passes_only_with_the_key_in_either_header(authorization, x_api_key, problem):
    assert api_key_problem(KEY, authorization, x_api_key) == problem


def test_the_401_message_names_the_headers_and_never_echoes_what_was_sent():
    assert "Authorization: Bearer <key>" in MISSING_KEY and "X-API-Key: <key>" in MISSING_KEY
    assert "guess" not in api_key_problem(KEY, "Bearer guess", None)


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(api.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    api_key_problem(KEY, "Bearer short", "a-much-longer-wrong-key-than-the-real-one")
    assert calls == [(32, 32), (32, 32)]  # every presented key checked, as equal-length digests


def test_building_the_app_never_logs_or_shows_the_key(tiny_bert_dir, caplog, monkeypatch):
    from serving.app import AppArgs, build_app

    monkeypatch.setenv("HLM_API_KEY", KEY)
    with caplog.at_level(logging.DEBUG):
        build_app({"student": {"model": str(tiny_bert_dir)}, "api_key": "key-from-args"})
    assert "API key: required" in caplog.text and "overrides args.api_key" in caplog.text
    assert KEY not in caplog.text and "key-from-args" not in caplog.text
    assert "key-from-args" not in repr(AppArgs.model_validate({"api_key": "key-from-args"}))


# ---------------------------------------------------------------------------------------------- the ASGI check

def call_through_middleware(key: str | None, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    """(status, JSON body) of one request through ApiKeyMiddleware in front of an app that answers 200."""
    import asyncio
    import json
    from types import SimpleNamespace

    async def downstream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        raise AssertionError("the body must not be read before the key is checked")

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "app": SimpleNamespace(state=SimpleNamespace(api_key=key))}
    asyncio.run(api.ApiKeyMiddleware(downstream)(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.mark.parametrize("key, method, path, headers, status", [
    (KEY, "POST", "/v1/search", {}, 401),
    (KEY, "POST", "/v1/search", {"X-API-Key": "nope"}, 401),
    (KEY, "POST", "/v1/search", {"Authorization": f"Bearer {KEY}"}, 200),
    (KEY, "POST", "/v1/embed", {"X-API-Key": KEY}, 200),
    (KEY, "GET", "/v1/healthz", {}, 200),  # open for load balancers
    (None, "POST", "/v1/search", {}, 200),  # an app without a key is open
])
def test_the_asgi_check_answers_401_before_the_app_or_passes_the_request_on(key, method, path, headers, status):
    got, body = call_through_middleware(key, method, path, headers)
    assert got == status
    if status == 401:
        assert body["detail"] in (MISSING_KEY, INVALID_KEY) and "nope" not in body["detail"]
