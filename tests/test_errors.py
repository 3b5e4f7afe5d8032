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


def test_while_a_backend_loads_an_unlisted_model_is_retry_not_404(launch: Launcher) -> None:
    """A llama-server still loading its model (503 "Loading model" on every path) has not
    said which models it serves: until it has, a model that no backend lists may be its
    own, so the answer is 503 + Retry-After (the SDKs retry it), not "does not exist".
    (A soak run of `make test` met this: a request sent 50 ms after the proxy started, in
    front of a llama-server still loading, got 404 for the model it serves.)"""
    llama = launch.emulator("llamacpp", "llamacpp-q4km", startup_delay=8, speed=10)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp")])
    assert httpx.get(llama.url + "/health").status_code == 503, "loaded too soon to test"
    chat = {"model": "qwen3.6-35b-a3b", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}
    early = httpx.post(proxy.url + "/v1/chat/completions", json=chat)
    assert early.status_code == 503 and early.headers["retry-after"] == "1"
    error = early.json()["error"]
    assert error["code"] == "model_not_listed_yet" and error["param"] == "model"
    assert "'qwen3.6-35b-a3b'" in error["message"] and error["message"].endswith(
        "not reachable since sluiceway started): llama. Retry shortly.")
    anthropic = httpx.post(proxy.url + "/v1/messages", json={**chat, "model": "other"},
                           headers={"anthropic-version": "2023-06-01"})
    assert anthropic.status_code == 503
    assert anthropic.json()["error"]["type"] == "overloaded_error"
    assert httpx.get(llama.url + "/health").status_code == 503, "loaded while testing"
    # the official client retries on the 503 until the model is listed, then gets its reply
    patient = OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=30, timeout=10)
    reply = patient.chat.completions.with_raw_response.create(
        model="qwen3.6-35b-a3b", messages=chat["messages"], max_tokens=2)
    assert reply.http_response.status_code == 200 and reply.parse().choices[0].message.content
    assert reply.retries_taken >= 1
    # once every backend has listed its models, an unknown one is 404 again
    unknown = httpx.post(proxy.url + "/v1/chat/completions", json={**chat, "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
