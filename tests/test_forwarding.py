"""Requests through a real `sluiceway serve` to real upstream servers, with the openai SDK."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Launcher, backend
from tests.processes import Server

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def pool(module_launch: Launcher) -> tuple[Server, Server, Server]:
    a = module_launch.upstream("a", model="served-a")
    b = module_launch.upstream("b", model="served-b")
    proxy = module_launch.proxy(
        [backend("a", a, models=["m", "alias-a"], served_model="served-a"),
         backend("b", b, models=["m"])],
        routing={"policy": "round_robin"},
    )
    return a, b, proxy


@pytest.fixture
def two(pool: tuple[Server, Server, Server]) -> tuple[OpenAI, tuple[Server, Server, Server]]:
    client = OpenAI(base_url=pool[2].url + "/v1", api_key="unused", max_retries=0)
    return client, pool


Two = tuple[OpenAI, tuple[Server, Server, Server]]


def test_chat_non_stream_rewrites_model_and_reports_usage(two: Two) -> None:
    client, (a, b, _) = two
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MSG, max_tokens=4)
    reply = raw.parse()
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    served = raw.headers["x-sluiceway-backend"]
    assert served in ("a", "b")
    upstream = a if served == "a" else b
    # a has an explicit served_model; b's is discovered from its /v1/models
    assert upstream.get("/_stats")["last_body"]["model"] == f"served-{served}"


def test_chat_stream_passes_chunks_and_hides_usage_it_asked_for(
    two: Two
) -> None:
    client, (a, b, _) = two
    chunks = list(client.chat.completions.create(model="m", messages=MSG, max_tokens=5,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert all(c.usage is None and c.choices for c in chunks)  # no extra usage chunk
    bodies = [a.get("/_stats")["last_body"], b.get("/_stats")["last_body"]]
    assert any(body.get("stream_options") == {"include_usage": True} for body in bodies)


def test_chat_stream_keeps_usage_when_the_client_asks(two: Two) -> None:
    client, _ = two
    chunks = list(client.chat.completions.create(
        model="m", messages=MSG, max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_completions_stream_and_non_stream(two: Two) -> None:
    client, _ = two
    whole = client.completions.create(model="alias-a", prompt="hi", max_tokens=3)
    assert whole.choices[0].text == "tok0 tok1 tok2"
    parts = list(client.completions.create(model="m", prompt="hi", max_tokens=3, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == "tok0 tok1 tok2 "


def test_embeddings_route(two: Two) -> None:
    client, _ = two
    result = client.embeddings.create(model="m", input="hello")
    assert result.data[0].embedding == [0.1, 0.2, 0.3]


def test_round_robin_spreads_requests(two: Two) -> None:
    client, _ = two
    first = client.chat.completions.with_raw_response.create(model="m", messages=MSG,
                                                             max_tokens=1)
    other = "b" if first.headers["x-sluiceway-backend"] == "a" else "a"
    served = [
        client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, max_tokens=1).headers["x-sluiceway-backend"]
        for _ in range(4)
    ]
    assert served == [other, first.headers["x-sluiceway-backend"]] * 2


def test_alias_routes_only_to_its_backend(two: Two) -> None:
    client, _ = two
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="alias-a", messages=MSG, max_tokens=1)
        assert raw.headers["x-sluiceway-backend"] == "a"


def test_models_is_the_union_of_the_pool(launch: Launcher) -> None:
    a = launch.upstream("a", model="model-a")
    b = launch.upstream("b", model="model-b")
    proxy = launch.proxy([backend("a", a), backend("b", b, models=["x", "y"])])
    client = OpenAI(base_url=proxy.url + "/v1", api_key="unused")
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"model-a", "x", "y"}  # a's discovered, b's configured names
    raw = httpx.get(proxy.url + "/v1/models").json()
    assert all(entry["max_model_len"] == 4096 for entry in raw["data"])


def test_request_id_is_kept_or_made(two: Two) -> None:
    _, (a, b, proxy) = two
    body = {"model": "m", "messages": MSG, "max_tokens": 1}
    given = httpx.post(proxy.url + "/v1/chat/completions", json=body,
                       headers={"x-request-id": "req-42"})
    assert given.headers["x-request-id"] == "req-42"
    upstream = a if given.headers["x-sluiceway-backend"] == "a" else b
    assert upstream.get("/_stats")["last_headers"]["x-request-id"] == "req-42"
    made = httpx.post(proxy.url + "/v1/chat/completions", json=body)
    assert len(made.headers["x-request-id"]) >= 16
    assert made.headers["x-sluiceway-backend"] in ("a", "b")
