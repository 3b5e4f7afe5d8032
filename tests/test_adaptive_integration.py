"""`adaptive` learns each backend's curve from the traffic it routes (no profile given),
then keeps load off an emulated llama.cpp whose throughput is flat."""

from __future__ import annotations

import asyncio

import httpx

from loadgen.report import result_json
from loadgen.runner import Target, closed_loop
from loadgen.workload import Workload
from tests.conftest import Launcher, backend

WORK = Workload("chat", "m", input_len=512, output_len=128)


def sweep_level(url: str, concurrency: int, requests: int) -> dict:  # type: ignore[type-arg]
    level = asyncio.run(closed_loop(Target("pool", url), WORK, concurrency, requests=requests,
                                    duration_s=None, warmup=0, timeout_s=120,
                                    show_progress=False))
    return result_json(level, [99])


def test_adaptive_learns_and_avoids_overloading_llamacpp(launch: Launcher) -> None:
    llama = launch.emulator("llamacpp", "llamacpp-q4km", speed=5, model="m")
    vllm = launch.emulator("vllm", "vllm-fp8-aiter", speed=5, model="m")
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp", models=["m"]),
                          backend("vllm", vllm, kind="vllm", models=["m"],
                                  max_concurrency=1024)])
    admin = httpx.get(proxy.url + "/admin/backends").json()
    assert admin["policy"] == "adaptive"  # the default
    assert all(b["throughput_curve"] == [] for b in admin["backends"])  # nothing known yet

    for concurrency, requests in ((1, 6), (4, 24), (8, 48)):
        assert sweep_level(proxy.url, concurrency, requests)["failed"] == 0
    learned = {b["name"]: b for b in httpx.get(proxy.url + "/admin/backends").json()["backends"]}
    assert learned["llama"]["throughput_curve"] and learned["vllm"]["throughput_curve"]

    # llama.cpp has 102 slots: a least-loaded router would hand it about a tenth of 64
    # streams at 3 tok/s each. adaptive keeps it to the few streams that add throughput.
    result = sweep_level(proxy.url, 64, 384)
    assert result["failed"] == 0
    share = result["backends"].get("llama", {"share": 0.0})["share"]
    assert share < 0.08, result["backends"]
    llama_points = dict(tuple(p) for p in httpx.get(proxy.url + "/admin/backends").json()
                        ["backends"][0]["throughput_curve"])
    assert max(llama_points) <= 12  # it was never loaded past its useful range


def test_non_streamed_replies_teach_the_curve(launch: Launcher) -> None:
    """A client that never streams must still teach adaptive each backend's speed: a whole
    reply has no first-token time, but its duration and token count give a rate."""
    up = launch.upstream("whole", token_delay_ms=5)  # 32 tokens: ~160 ms per reply
    proxy = launch.proxy([backend("up", up, models=["m"])])
    for _ in range(6):
        r = httpx.post(proxy.url + "/v1/chat/completions", timeout=10, json={
            "model": "m", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32
    (state,) = httpx.get(proxy.url + "/admin/backends").json()["backends"]
    assert state["throughput_curve"], state
    # one stream at ~5 ms per token: at most 200 tok/s, and not below half that
    ((n, tok_s),) = state["throughput_curve"]
    assert n == 1 and 80 < tok_s <= 200, state["throughput_curve"]
