"""Each bad input gets its status and the OpenAI error shape, and reaches no backend."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from tests.conftest import EVERY_API, Launcher, backend
from tests.processes import Server

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def servers(module_launch: Launcher) -> tuple[Server, Server]:
    a = module_launch.upstream("a")
    proxy = module_launch.proxy([backend("a", a, models=["m"], apis=EVERY_API)],
                                server={"api_keys": [KEY, "second"], "max_body_mb": 0.01})
    return a, proxy


AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(("content", "headers", "status", "code", "needle"), [
    (b"{not json", AUTH, 400, "invalid_request", "not valid JSON"),
    (b"[1, 2]", AUTH, 400, "invalid_request", "JSON object"),
    (b'{"messages": []}', AUTH, 400, "invalid_request", "'model'"),
    (b'{"model": 7}', AUTH, 400, "invalid_request", "'model'"),
    (b'{"model": "nope", "messages": []}', AUTH, 404, "model_not_found", "nope"),
    (b'{"model": "m", "pad": "' + b"x" * 20000 + b'"}', AUTH, 413, "request_too_large", "exceeds"),
    (b'{"model": "m"}', {}, 401, "invalid_api_key", "API key"),
    (b'{"model": "m"}', {"authorization": "Bearer wrong"}, 401, "invalid_api_key", "API key"),
    (b'{"model": "m"}', {"x-api-key": "wrong"}, 401, "invalid_api_key", "API key"),
])
def test_bad_input(servers: tuple[Server, Server], content: bytes, headers: dict[str, str],
                   status: int, code: str, needle: str) -> None:
    upstream, proxy = servers
    before = upstream.get("/_stats")["requests"]
    resp = httpx.post(proxy.url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json", **headers})
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["code"] == code and needle in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert resp.headers["x-request-id"]
    assert upstream.get("/_stats")["requests"] == before


def test_chunked_body_over_the_limit_is_refused(servers: tuple[Server, Server]) -> None:
    _, proxy = servers
    def body():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b"x" * 1000
    resp = httpx.post(proxy.url + "/v1/chat/completions", content=body(), headers=AUTH)
    assert resp.status_code == 413


def test_both_key_headers_are_accepted(servers: tuple[Server, Server]) -> None:
    _, proxy = servers
    body = {"model": "m", "messages": [], "max_tokens": 1}
    for headers in (AUTH, {"x-api-key": "second"}):
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body,
                          headers=headers).status_code == 200
    sdk = OpenAI(base_url=proxy.url + "/v1", api_key=KEY)
    assert [m.id for m in sdk.models.list()] == ["m"]


def test_probes_stay_public_and_admin_needs_the_key(servers: tuple[Server, Server]) -> None:
    _, proxy = servers
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(proxy.url + path).status_code == 200
    assert httpx.get(proxy.url + "/admin/backends").status_code == 401
    assert httpx.get(proxy.url + "/v1/models").status_code == 401
    assert httpx.get(proxy.url + "/admin/backends", headers=AUTH).status_code == 200


def test_unknown_route_and_wrong_method(servers: tuple[Server, Server]) -> None:
    _, proxy = servers
    missing = httpx.post(proxy.url + "/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(proxy.url + "/v1/chat/completions", headers=AUTH)
    assert wrong.status_code == 405


def test_messages_endpoint_errors_in_anthropic_shape(servers: tuple[Server, Server]) -> None:
    _, proxy = servers
    resp = httpx.post(proxy.url + "/v1/messages", content=b"{oops", headers=AUTH)
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
