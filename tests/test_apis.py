"""Every routed API forwarded through sluiceway, with the official SDKs as clients and a
test upstream that answers each API in vLLM's shape: the reply arrives whole and in order,
and the proxy counts its prompt and output tokens and its TTFT (what `adaptive` learns
from and what the metrics report)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from tests.conftest import EVERY_API, Launcher, backend
from tests.probes import gauges, sdk, wait_for
from tests.processes import Server

PROMPT = [{"role": "user", "content": "count to ten, slowly and carefully, please"}]


@pytest.fixture(scope="module")
def served(module_launch: Launcher) -> Iterator[tuple[Server, Server]]:
    up = module_launch.upstream("apis", first_delay_ms=30, token_delay_ms=2)
    proxy = module_launch.proxy([backend("up", up, models=["m"], apis=EVERY_API)])
    yield up, proxy


def counted(proxy: Server) -> dict[str, float]:
    g = gauges(proxy)
    return {k: g.get(f"sluiceway_{k}", 0.0) for k in (
        "prompt_tokens_total", "output_tokens_total", "ttft_seconds_count",
        "requests_total")}


def delta(before: dict[str, float], proxy: Server, requests: int = 1) -> dict[str, float]:
    """What the proxy counted since `before`, once it has finished `requests` more (it
    counts as the reply ends on its side, a moment after the client has the last bytes;
    a request's counters all move together)."""
    wait_for(lambda: counted(proxy)["requests_total"] - before["requests_total"] >= requests)
    after = counted(proxy)
    return {k: after[k] - before[k] for k in after}


def claude(proxy: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="unused", timeout=30,
                               max_retries=0)


def test_embeddings(served: tuple[Server, Server]) -> None:
    up, proxy = served
    before = counted(proxy)
    raw = sdk(proxy).embeddings.with_raw_response.create(model="m", input="hello there")
    reply = raw.parse()
    assert raw.headers["x-sluiceway-backend"] == "up"
    assert reply.data[0].embedding == [0.1, 0.2, 0.3]
    assert up.get("/_stats")["last_body"]["input"] == "hello there"
    d = delta(before, proxy)
    assert d["requests_total"] == 1 and d["prompt_tokens_total"] == reply.usage.prompt_tokens > 0
    assert d["output_tokens_total"] == 0


@pytest.mark.parametrize("piece", ["tok{i} ", "data: {i} ", 'x"usage":{{"output_tokens":0}} '])
def test_responses_stream(served: tuple[Server, Server], piece: str) -> None:
    """Generated text that looks like SSE framing or a usage object must not confuse the
    counts (a byte search for `data:` once landed inside the final event's copy of the
    text and counted 0 tokens)."""
    up, proxy = served
    up.post("/_control", {"piece": piece})
    try:
        before = counted(proxy)
        events = list(sdk(proxy).responses.create(model="m", input="say something",
                                                  max_output_tokens=12, stream=True))
    finally:
        up.post("/_control", {"piece": "tok{i} "})
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "".join(piece.format(i=i) for i in range(12))
    usage = events[-1].response.usage
    assert usage is not None and usage.output_tokens == 12
    d = delta(before, proxy)
    assert d["output_tokens_total"] == 12
    assert d["prompt_tokens_total"] == usage.input_tokens > 0
    assert d["ttft_seconds_count"] == 1


def test_responses_whole(served: tuple[Server, Server]) -> None:
    _, proxy = served
    before = counted(proxy)
    reply = sdk(proxy).responses.create(model="m", input="say something", max_output_tokens=7)
    assert reply.output_text == "".join(f"tok{i} " for i in range(7))
    d = delta(before, proxy)
    assert reply.usage is not None
    assert d["output_tokens_total"] == 7 and d["prompt_tokens_total"] == reply.usage.input_tokens


def test_messages_stream(served: tuple[Server, Server]) -> None:
    """Anthropic's stream gives the prompt's size in `message_start` and only the output
    count in the final `message_delta`: both must be counted (the last usage alone once
    made every Claude Code request 0 prompt tokens)."""
    _, proxy = served
    before = counted(proxy)
    with claude(proxy).messages.stream(model="m", max_tokens=10, messages=PROMPT) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(f"tok{i} " for i in range(10))
    assert final.usage.output_tokens == 10 and final.usage.input_tokens > 0
    d = delta(before, proxy)
    assert d["output_tokens_total"] == 10
    assert d["prompt_tokens_total"] == final.usage.input_tokens
    assert d["ttft_seconds_count"] == 1


def test_messages_whole_and_count_tokens(served: tuple[Server, Server]) -> None:
    _, proxy = served
    before = counted(proxy)
    reply = claude(proxy).messages.create(model="m", max_tokens=5, messages=PROMPT)
    assert reply.content[0].type == "text"
    assert reply.content[0].text == " ".join(f"tok{i}" for i in range(5))
    d = delta(before, proxy)
    assert d["output_tokens_total"] == 5 and d["prompt_tokens_total"] == reply.usage.input_tokens
    count = claude(proxy).messages.count_tokens(model="m", messages=PROMPT)
    assert count.input_tokens == reply.usage.input_tokens
