"""sluiceway in front of a real llama.cpp `llama-server`, built from the pinned source by
tests/realllama/build.py and serving a random-weight model made by tests/realllama/model.py.

Nothing here is emulated: the server tokenizes, prefills, decodes, schedules its slots and
keeps its prompt cache for real. The `real_llama` fixture builds the binary if this machine
has none yet; a failed build fails these tests (they are never skipped).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import aiohttp
import httpx
import pytest

from backends.config import BackendConfig
from backends.monitor import Monitor
from backends.pool import Pool
from backends.snapshot import Health
from tests.conftest import Launcher, backend
from tests.probes import gauges, sdk, wait_for
from tests.processes import Server
from tests.realllama.server import MODEL_ALIAS, RealLlama

SYSTEM = ("You are a careful assistant for a software team. " * 12).strip()


def backend_view(proxy: Server, name: str = "llama") -> dict[str, Any]:
    view: dict[str, Any] = next(b for b in proxy.get("/admin/backends")["backends"]
                                if b["name"] == name)
    return view


def processing(llama: Server) -> float:
    return gauges(llama).get("llamacpp:requests_processing", -1.0)


@pytest.fixture(scope="module")
def served(module_launch: Launcher, real_llama: RealLlama) -> tuple[Server, Server]:
    """One llama-server with 2 slots behind sluiceway, shared by the API tests."""
    llama = module_launch.llama_server(real_llama, slots=2)
    proxy = module_launch.proxy([backend("llama", llama, kind="llamacpp")])
    return llama, proxy


def test_health_is_loading_then_ok_and_capacity_comes_from_props(
        launch: Launcher, real_llama: RealLlama) -> None:
    # --load-mode none reads the whole file instead of mapping it: a loading phase long
    # enough (hundreds of ms) to be seen by a probe every few ms
    llama = launch.llama_server(real_llama, slots=3, wait=False,
                                extra=("--load-mode", "none"))

    async def watch() -> tuple[list[Health], Pool]:
        pool = Pool([BackendConfig(name="llama", kind="llamacpp", url=llama.url)])
        seen: list[Health] = []
        async with aiohttp.ClientSession() as session:
            monitor = Monitor(pool, session, interval_s=0.002, timeout_s=1.0)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and pool["llama"].health is not Health.HEALTHY:
                await monitor.probe(pool["llama"])
                if not seen or seen[-1] is not pool["llama"].health:
                    seen.append(pool["llama"].health)
                await asyncio.sleep(0.002)
        return seen, pool

    seen, pool = asyncio.run(watch())
    assert Health.LOADING in seen, seen
    assert seen[-1] is Health.HEALTHY
    assert seen.index(Health.LOADING) < seen.index(Health.HEALTHY)
    state = pool["llama"]
    assert state.discovered.capacity == 3  # /props total_slots = --parallel
    assert state.discovered.running == 0  # llamacpp:requests_processing from /metrics
    assert MODEL_ALIAS in state.discovered.models
    after = httpx.get(llama.url + "/health")
    assert after.status_code == 200 and after.json() == {"status": "ok"}


@pytest.mark.parametrize("metrics", [True, False], ids=["from-metrics", "from-slots"])
def test_load_is_read_from_metrics_or_slots(
        launch: Launcher, real_llama: RealLlama, metrics: bool) -> None:
    llama = launch.llama_server(real_llama, slots=2, metrics=metrics)
    if not metrics:
        assert httpx.get(llama.url + "/metrics").status_code in (404, 501)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp")],
                         health={"interval_s": 0.1, "timeout_s": 1})
    view = backend_view(proxy)
    assert view["capacity"] == 2 and view["capacity_source"] == "discovered"
    client = httpx.Client(timeout=60)
    streams = []
    try:
        for i in range(2):
            req = client.build_request("POST", proxy.url + "/v1/chat/completions", json={
                "model": MODEL_ALIAS, "max_tokens": 2000, "stream": True,
                "messages": [{"role": "user", "content": f"stream {i}"}]})
            streams.append(client.send(req, stream=True))
        # keep each line iterator referenced: a collected one closes its connection
        lines = [resp.iter_lines() for resp in streams]
        for resp, it in zip(streams, lines, strict=True):
            assert resp.status_code == 200
            assert next(it).startswith("data: ")  # both are decoding
        wait_for(lambda: backend_view(proxy)["upstream_running"] == 2, timeout_s=10)
        busy = [s for s in httpx.get(llama.url + "/slots").json() if s["is_processing"]]
        assert len(busy) == 2
        if metrics:
            assert processing(llama) == 2
    finally:
        for resp in streams:
            resp.close()
        client.close()
    wait_for(lambda: backend_view(proxy)["upstream_running"] == 0, timeout_s=10)


def test_chat_stream_keeps_usage_and_timings(served: tuple[Server, Server]) -> None:
    _, proxy = served
    chunks = list(sdk(proxy, timeout=120).chat.completions.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": "stream with usage"}],
        max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 16
    assert usage[0].prompt_tokens > 0
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    timings = [c.model_extra["timings"] for c in chunks
               if c.model_extra and "timings" in c.model_extra]
    assert timings and timings[-1]["predicted_n"] == 16
    assert timings[-1]["prompt_n"] + timings[-1]["cache_n"] == usage[0].prompt_tokens


def test_chat_stream_without_usage_gets_no_injected_usage_chunk(
        served: tuple[Server, Server]) -> None:
    _, proxy = served
    before = gauges(proxy).get("sluiceway_output_tokens_total", 0)  # earlier tests count too
    chunks = list(sdk(proxy, timeout=120).chat.completions.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": "plain stream"}],
        max_tokens=8, stream=True))
    assert all(c.choices for c in chunks)  # sluiceway asked for usage; the client did not
    assert all(c.usage is None for c in chunks)
    finish = chunks[-1]
    assert finish.choices[0].finish_reason == "length"
    assert finish.model_extra and finish.model_extra["timings"]["predicted_n"] == 8
    # and the proxy still counted the tokens the client did not ask to see
    # (counted as the stream ends on the proxy's side, a moment after the client has its
    # last bytes: wait for it rather than race it)
    wait_for(lambda: gauges(proxy).get("sluiceway_output_tokens_total", 0) - before == 8,
             timeout_s=5)


def test_chat_non_stream(served: tuple[Server, Server]) -> None:
    _, proxy = served
    raw = sdk(proxy, timeout=120).chat.completions.with_raw_response.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": "hello"}], max_tokens=12)
    reply = raw.parse()
    assert raw.headers["x-sluiceway-backend"] == "llama"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.model_extra and reply.model_extra["timings"]["predicted_n"] == 12


def test_completions_stream_and_non_stream(served: tuple[Server, Server]) -> None:
    _, proxy = served
    client = sdk(proxy, timeout=120)
    reply = client.completions.create(model=MODEL_ALIAS, prompt="Once upon a time",
                                      max_tokens=10)
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 10
    chunks = list(client.completions.create(
        model=MODEL_ALIAS, prompt="Once upon a time", max_tokens=10, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 10


def test_disconnect_mid_stream_frees_the_slot(launch: Launcher, real_llama: RealLlama) -> None:
    llama = launch.llama_server(real_llama, slots=1)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp")])
    body = {"model": MODEL_ALIAS, "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": "a very long answer"}]}
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", proxy.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # referenced: a collected one closes the connection
        events = 0
        while events < 3:
            events += next(lines).startswith("data: {")
        assert processing(llama) == 1
        assert backend_view(proxy)["in_flight"] == 1
    # leaving the block closed the client's connection mid-stream
    freed_in = wait_for(lambda: processing(llama) == 0, timeout_s=2.0)
    slots = httpx.get(llama.url + "/slots").json()
    assert not any(s["is_processing"] for s in slots)
    assert backend_view(proxy)["in_flight"] == 0
    # the one slot serves the next request at once
    reply = sdk(proxy, timeout=120).chat.completions.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": "next"}], max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert freed_in < 2.0


def test_more_clients_than_slots_wait_in_sluiceway_not_in_llama(
        launch: Launcher, real_llama: RealLlama) -> None:
    llama = launch.llama_server(real_llama, slots=2)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp")])
    assert backend_view(proxy)["capacity"] == 2
    client = sdk(proxy, timeout=120)
    results: list[int] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            chunks = list(client.chat.completions.create(
                model=MODEL_ALIAS, messages=[{"role": "user", "content": f"client {i}"}],
                max_tokens=24, stream=True, stream_options={"include_usage": True}))
            results.append(next(c.usage.completion_tokens for c in chunks if c.usage))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    max_deferred = max_processing = max_queue = 0.0
    while any(t.is_alive() for t in threads):
        g = gauges(llama)
        max_deferred = max(max_deferred, g["llamacpp:requests_deferred"])
        max_processing = max(max_processing, g["llamacpp:requests_processing"])
        max_queue = max(max_queue, proxy.get("/admin/backends")["queue_depth"])
        time.sleep(0.05)
    for t in threads:
        t.join(5)
    assert not errors, errors
    assert sorted(results) == [24] * 6
    assert max_queue >= 1  # the extra clients waited in sluiceway's admission queue
    assert max_processing <= 2
    assert max_deferred == 0  # and never in llama-server's own deferred queue
    assert gauges(llama)["llamacpp:requests_deferred"] == 0


def test_growing_conversation_reuses_the_prompt_cache(
        launch: Launcher, real_llama: RealLlama) -> None:
    first = launch.llama_server(real_llama, slots=2)
    second = launch.llama_server(real_llama, slots=2)
    proxy = launch.proxy([backend("llama-a", first, kind="llamacpp"),
                          backend("llama-b", second, kind="llamacpp")])
    client = sdk(proxy, timeout=120)
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    served_by: list[str] = []
    timings: list[dict[str, Any]] = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Turn {turn}: next step, please."})
        if turn % 2:  # non-streamed turns
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL_ALIAS, messages=messages, max_tokens=12,
                extra_headers={"x-session-id": "agent-1"})
            reply = raw.parse()
            assert reply.model_extra is not None
            timing, usage = reply.model_extra["timings"], reply.usage
            text = reply.choices[0].message.content or ""
        else:  # streamed turns, as agents mostly send them
            raw_stream = client.chat.completions.with_raw_response.create(
                model=MODEL_ALIAS, messages=messages, max_tokens=12, stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-session-id": "agent-1"})
            raw = raw_stream
            chunks = list(raw_stream.parse())
            timing = next(c.model_extra["timings"] for c in chunks
                          if c.model_extra and "timings" in c.model_extra)
            usage = next(c.usage for c in chunks if c.usage)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        served_by.append(raw.headers["x-sluiceway-backend"])
        timings.append(timing)
        assert usage is not None and usage.prompt_tokens == timing["prompt_n"] + timing[
            "cache_n"]
        if turn:
            assert usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens == timing["cache_n"]
        messages.append({"role": "assistant", "content": text})
    assert len(set(served_by)) == 1, served_by
    # the first (streamed, uncached) turn taught sluiceway this backend's prefill speed
    assert (backend_view(proxy, served_by[0])["prefill_chars_per_s"] or 0) > 0
    assert timings[0]["cache_n"] == 0
    for before, after in itertools.pairwise(timings):
        # at least the whole previous prompt came from the slot's cache
        assert after["cache_n"] >= before["prompt_n"] + before["cache_n"] - 1, timings


def test_the_bench_measures_llama_server_directly(served: tuple[Server, Server]) -> None:
    """llama-server answers `Keep-Alive: timeout=5` and then closes the connection after
    each stream; a client that reuses the socket before it sees the close fails to write
    its next request (half the requests of a c=1 run failed so). The bench sends such a
    request again on the next connection: none fails, each resend is counted."""
    from loadgen.workload import Workload
    from tests.test_bench import level

    llama, _ = served
    r = level(llama.url, 1, 6, timeout_s=120,
              workload=Workload("chat", MODEL_ALIAS, input_len=32, output_len=8))
    assert r["completed"] == 6 and r["failed"] == 0, r["errors"]
    assert r["total_output_tokens"] == 6 * 8
    assert r["resent_requests"] >= 1  # the pinned build closes: the path is exercised
