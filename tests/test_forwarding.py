"""Requests through a real `sluiceway serve` in front of an emulated llama.cpp and an
emulated vLLM, with the openai SDK as the client."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Launcher, backend
from tests.processes import Server

MSG = [{"role": "user", "content": "hello"}]
SERVED = "qwen3.6-35b-a3b"  # what both emulators serve; clients ask for "m"
Pool = tuple[Server, Server, Server]


@pytest.fixture(scope="module")
def pool(module_launch: Launcher) -> Pool:
    llama = module_launch.emulator("llamacpp", "llamacpp-q4km", speed=20, slots=4)
    vllm = module_launch.emulator("vllm", "vllm-fp8-aiter", speed=20)
    proxy = module_launch.proxy(
        [backend("llama", llama, kind="llamacpp", models=["m", "alias-llama"]),
         backend("vllm", vllm, kind="vllm", models=["m"], max_concurrency=64)],
        routing={"policy": "round_robin"},
    )
    return llama, vllm, proxy


@pytest.fixture
def client(pool: Pool) -> OpenAI:
    return OpenAI(base_url=pool[2].url + "/v1", api_key="unused", max_retries=0)


def test_chat_non_stream_both_backends(client: OpenAI) -> None:
    served = set()
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, max_tokens=4, extra_body={"ignore_eos": True})
        reply = raw.parse()
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        assert len((reply.choices[0].message.content or "").split()) == 4
        served.add(raw.headers["x-sluiceway-backend"])
    # vLLM answers 404 to any name but its own: "m" was rewritten to its served name
    assert served == {"llama", "vllm"}


def test_chat_stream_hides_the_usage_chunk_it_asked_for(client: OpenAI) -> None:
    for _ in range(2):  # once on each backend
        chunks = list(client.chat.completions.create(
            model="m", messages=MSG, max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 5
        assert all(c.usage is None and c.choices for c in chunks)


def test_chat_stream_keeps_usage_when_the_client_asks(client: OpenAI) -> None:
    for _ in range(2):
        chunks = list(client.chat.completions.create(
            model="m", messages=MSG, max_tokens=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3


def test_llamacpp_timings_pass_through(pool: Pool) -> None:
    proxy = pool[2]
    body = {"model": "alias-llama", "messages": MSG, "max_tokens": 3, "stream": True}
    text = httpx.post(proxy.url + "/v1/chat/completions", json=body).text
    assert '"timings":{"cache_n"' in text and text.endswith("data: [DONE]\n\n")
    whole = httpx.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False})
    assert whole.json()["timings"]["predicted_n"] == whole.json()["usage"]["completion_tokens"]


def test_completions_stream_and_non_stream(client: OpenAI) -> None:
    whole = client.completions.create(model="alias-llama", prompt="hi there", max_tokens=3,
                                      extra_body={"ignore_eos": True})
    assert len(whole.choices[0].text.split()) == 3
    for _ in range(2):
        parts = list(client.completions.create(model="m", prompt="hi", max_tokens=3,
                                               stream=True, extra_body={"ignore_eos": True}))
        assert len("".join(p.choices[0].text for p in parts if p.choices).split()) == 3


def test_round_robin_spreads_requests(client: OpenAI) -> None:
    served = [
        client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, max_tokens=1).headers["x-sluiceway-backend"]
        for _ in range(4)
    ]
    assert sorted(served) == ["llama", "llama", "vllm", "vllm"]
    assert served[0] != served[1] and served[:2] == served[2:]


def test_alias_routes_only_to_its_backend(client: OpenAI) -> None:
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="alias-llama", messages=MSG, max_tokens=1)
        assert raw.headers["x-sluiceway-backend"] == "llama"


def test_models_union_and_discovery(launch: Launcher) -> None:
    llama = launch.emulator("llamacpp", "llamacpp-q4km", speed=20, model="llama-model")
    vllm = launch.emulator("vllm", "vllm-fp8", speed=20, model="vllm-model")
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp"),
                          backend("vllm", vllm, kind="vllm", models=["x", "y"])])
    client = OpenAI(base_url=proxy.url + "/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"llama-model", "x", "y"}
    raw = httpx.get(proxy.url + "/v1/models").json()["data"]
    assert {e["id"]: e.get("max_model_len") for e in raw}["x"] == 32768
    # "x" is rewritten to vLLM's discovered served name, or vLLM would answer 404
    assert client.chat.completions.create(model="x", messages=MSG, max_tokens=1).choices
    admin = {b["name"]: b for b in httpx.get(proxy.url + "/admin/backends").json()["backends"]}
    assert admin["llama"]["capacity"] == 102 and admin["vllm"]["capacity"] is None
    assert admin["vllm"]["served_model"] == "vllm-model"


def test_request_id_is_kept_or_made(pool: Pool) -> None:
    proxy = pool[2]
    body = {"model": "m", "messages": MSG, "max_tokens": 1}
    given = httpx.post(proxy.url + "/v1/chat/completions", json=body,
                       headers={"x-request-id": "req-42"})
    assert given.headers["x-request-id"] == "req-42"
    made = httpx.post(proxy.url + "/v1/chat/completions", json=body)
    assert len(made.headers["x-request-id"]) >= 16
    assert made.headers["x-sluiceway-backend"] in ("llama", "vllm")


def test_request_id_reaches_the_upstream(launch: Launcher) -> None:
    upstream = launch.upstream("a")
    proxy = launch.proxy([backend("a", upstream, models=["m"])])
    httpx.post(proxy.url + "/v1/chat/completions", headers={"x-request-id": "req-43"},
               json={"model": "m", "messages": MSG, "max_tokens": 1})
    assert upstream.get("/_stats")["last_headers"]["x-request-id"] == "req-43"
