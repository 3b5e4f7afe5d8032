"""The emulators speak their engines' APIs: the openai SDK, slots and deferral, prompt
caches, errors, metrics, start-up behaviour, disconnects and fault flags."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Launcher
from tests.probes import gauges, sdk, wait_for
from tests.processes import Server

MODEL = "qwen3.6-35b-a3b"


@pytest.fixture(scope="module", params=["llamacpp", "vllm"])
def engine(request: pytest.FixtureRequest, module_launch: Launcher) -> tuple[str, Server]:
    profile = "llamacpp-q4km" if request.param == "llamacpp" else "vllm-fp8-aiter"
    return request.param, module_launch.emulator(request.param, profile, speed=20)


def raw_post(server: Server, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request and leave the reply unread; closing the socket is a disconnect."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
    return sock


def test_openai_sdk_chat_and_completions(engine: tuple[str, Server]) -> None:
    _, server = engine
    client = sdk(server)
    msg = [{"role": "user", "content": "say something"}]
    whole = client.chat.completions.create(model=MODEL, messages=msg, max_tokens=7,
                                           extra_body={"ignore_eos": True})
    assert whole.usage is not None and whole.usage.completion_tokens == 7
    assert len(whole.choices[0].message.content.split()) == 7  # type: ignore[union-attr]
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=msg, max_tokens=7, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # deterministic
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == 7  # 2 words + 5
    plain = list(client.completions.create(model=MODEL, prompt="one two three",
                                           max_tokens=4, stream=True,
                                           extra_body={"ignore_eos": True}))
    assert sum(1 for p in plain if p.choices and p.choices[0].text) == 4
    done = client.completions.create(model=MODEL, prompt="one two three", max_tokens=400)
    assert done.choices[0].finish_reason == "stop"  # no ignore_eos: a natural end first
    assert done.usage is not None and 16 <= done.usage.completion_tokens < 400


def test_models_and_metrics_parse(engine: tuple[str, Server]) -> None:
    kind, server = engine
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[0]["id"] == MODEL
    names = gauges(server)
    wanted = (["llamacpp:requests_processing", "llamacpp:requests_deferred",
               "llamacpp:tokens_predicted_total", "llamacpp:prompt_tokens_total"]
              if kind == "llamacpp" else
              ["vllm:num_requests_running", "vllm:num_requests_waiting",
               "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_count",
               "vllm:generation_tokens_total", "vllm:prefix_cache_hits_total"])
    assert all(name in names for name in wanted), sorted(names)
    if kind == "vllm":
        assert models[0]["max_model_len"] == 32768


def test_disconnect_frees_capacity(engine: tuple[str, Server]) -> None:
    kind, server = engine
    running = ("llamacpp:requests_processing" if kind == "llamacpp"
               else "vllm:num_requests_running")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": 5000, "ignore_eos": True}) as resp:
        lines = resp.iter_lines()
        while '"content":" ' not in next(lines):
            pass
        assert gauges(server)[running] == 1
    assert wait_for(lambda: gauges(server)[running] == 0, 2.0) < 2.0


def test_the_emulator_counts_its_own_peak_concurrency(engine: tuple[str, Server]) -> None:
    """`/_emulator/load`: what the backend held at once, as benchmarks/replicas.py reads
    it to check capacity across replicas; POST resets the peak to what it holds now."""
    _, server = engine
    httpx.post(server.url + "/_emulator/load", timeout=5)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": 5000, "ignore_eos": True}
    socks = [raw_post(server, "/v1/chat/completions", body) for _ in range(3)]
    try:
        assert wait_for(lambda: httpx.get(server.url + "/_emulator/load").json()[
            "in_flight"] == 3, 5.0) < 5.0
    finally:
        for sock in socks:
            sock.close()
    assert wait_for(lambda: httpx.get(server.url + "/_emulator/load").json()[
        "in_flight"] == 0, 5.0) < 5.0
    assert httpx.get(server.url + "/_emulator/load").json()["peak"] == 3
    assert httpx.post(server.url + "/_emulator/load").json()["peak"] == 3
    assert httpx.get(server.url + "/_emulator/load").json()["peak"] == 0


def test_llamacpp_slots_and_deferral(launch: Launcher) -> None:
    server = launch.emulator("llamacpp", "llamacpp-q4km", slots=2, speed=2)
    assert httpx.get(server.url + "/props").json()["total_slots"] == 2
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": 500, "ignore_eos": True}
    clients = [raw_post(server, "/v1/chat/completions", body) for _ in range(5)]
    try:
        wait_for(lambda: gauges(server)["llamacpp:requests_deferred"] == 3)
        assert gauges(server)["llamacpp:requests_processing"] == 2
        slots = httpx.get(server.url + "/slots").json()
        assert [s["is_processing"] for s in slots] == [True, True]
        busy = httpx.get(server.url + "/slots?fail_on_no_slot=1")
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "unavailable_error"
    finally:
        for sock in clients:
            sock.close()
    wait_for(lambda: gauges(server)["llamacpp:requests_processing"] == 0, 2.0)
    assert gauges(server)["llamacpp:requests_deferred"] == 0


def test_llamacpp_stream_shape_and_prompt_cache(launch: Launcher) -> None:
    server = launch.emulator("llamacpp", "llamacpp-q4km", slots=1, speed=20)
    turn1 = [{"role": "system", "content": "you are a coding agent " * 20},
             {"role": "user", "content": "fix the bug"}]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "messages": turn1, "max_tokens": 6, "stream": True}) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert "timings" in parsed[-1] and all("usage" not in p for p in parsed)
    assert parsed[-1]["timings"]["cache_n"] == 0
    reply = "".join(p["choices"][0]["delta"].get("content") or "" for p in parsed)
    turn2 = [*turn1, {"role": "assistant", "content": reply},
             {"role": "user", "content": "now add a test"}]
    second = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": turn2, "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}})
    last = [json.loads(line[6:]) for line in second.text.splitlines()
            if line.startswith("data: {")][-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    turn1_tokens = parsed[-1]["timings"]["prompt_n"] + 6
    assert last["timings"]["cache_n"] == turn1_tokens  # turn 1 prompt + its reply
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == turn1_tokens


def test_llamacpp_loading_then_ready(launch: Launcher) -> None:
    server = launch.emulator("llamacpp", "llamacpp-q4km", startup_delay=1.5)
    loading = httpx.get(server.url + "/health")
    assert loading.status_code == 503
    assert loading.json()["error"] == {"message": "Loading model", "type": "unavailable_error",
                                       "code": 503}
    assert httpx.get(server.url + "/v1/models").status_code == 503
    wait_for(lambda: httpx.get(server.url + "/health").status_code == 200, 5)


def test_vllm_refuses_connections_while_starting(launch: Launcher) -> None:
    server = launch.emulator("vllm", "vllm-fp8", wait=False, startup_delay=1.5)
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(
            ("127.0.0.1", server.port), timeout=1):
        pass
    server.wait_listening()
    assert httpx.get(server.url + "/health").text == ""


def test_vllm_unknown_model_and_prefix_cache(launch: Launcher) -> None:
    server = launch.emulator("vllm", "vllm-fp8-aiter", speed=20)
    with pytest.raises(openai.NotFoundError) as err:
        sdk(server).chat.completions.create(model="other", messages=[
            {"role": "user", "content": "x"}])
    error = err.value.response.json()["error"]
    assert error == {"message": "The model `other` does not exist.", "type": "NotFoundError",
                     "param": "model", "code": 404}
    long_prompt = [{"role": "user", "content": "shared context " * 200}]
    for _ in range(2):
        sdk(server).chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=2)
    metrics = gauges(server)
    assert metrics["vllm:prefix_cache_hits_total"] >= 384  # 2nd prompt: 24+ cached blocks
    assert metrics["vllm:prefix_cache_queries_total"] == 2 * 405


def test_fault_flags(launch: Launcher) -> None:
    failing = launch.emulator("vllm", "vllm-fp8-aiter", speed=20, fail_rate=1.0)
    resp = httpx.post(failing.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "InternalServerError"

    dying = launch.emulator("llamacpp", "llamacpp-q4km", speed=20, die_after_tokens=3)
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
            "POST", dying.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "x"}], "stream": True,
                "max_tokens": 50, "ignore_eos": True}) as stream:
        tokens = [line for line in stream.iter_lines() if '"content":" ' in line]
    assert "tokens" not in locals()  # the stream never ended cleanly

    hanging = launch.emulator("vllm", "vllm-fp8-aiter", speed=20, hang_after_tokens=2)
    seen: list[str] = []
    with pytest.raises(httpx.ReadTimeout), httpx.stream(
            "POST", hanging.url + "/v1/chat/completions", timeout=httpx.Timeout(5, read=1),
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                  "stream": True, "max_tokens": 50, "ignore_eos": True}) as stream:
        for line in stream.iter_lines():
            if '"content":" ' in line:
                seen.append(line)
    assert len(seen) == 2


def test_faults_change_at_run_time_with_fault_control(launch: Launcher) -> None:
    plain = launch.emulator("vllm", "vllm-fp8-aiter", speed=20)
    assert httpx.post(plain.url + "/_faults", json={"fail_rate": 1}).status_code == 404
    emu = launch.emulator("vllm", "vllm-fp8-aiter", speed=20, fault_control=True)
    api = sdk(emu.url)
    assert httpx.post(emu.url + "/_faults", json={"fail_rate": 1}).json()["fail_rate"] == 1
    with pytest.raises(openai.InternalServerError):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                    max_tokens=4)
    faults = httpx.post(emu.url + "/_faults", json={"fail_rate": 0, "die_after_tokens": 2})
    assert faults.json() == {"fail_rate": 0, "die_after_tokens": 2, "hang_after_tokens": None}
    with pytest.raises(openai.APIConnectionError):  # the stream is cut after two tokens
        for _ in api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                stream=True):
            pass
    httpx.post(emu.url + "/_faults", json={"die_after_tokens": None})
    reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                "content": "x"}], max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert httpx.post(emu.url + "/_faults", json={"speed": 9}).status_code == 400
