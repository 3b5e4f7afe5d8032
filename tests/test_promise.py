"""The promise: a pool under `adaptive` is at least as good as its best member, measured as
users measure it (a freshly started proxy, every request counted, whole-run output tok/s as
`vllm bench serve` reports it), on emulated llama.cpp and vLLM.

Two pools, both MI300X profiles. llama.cpp Q4_K_M with stock FP8 vLLM, where the best
member changes with the load: vLLM loses a lone stream to llama.cpp (104 against 114
tok/s) and wins from 8 up, so a policy that always picks vLLM fails here, as does one
that balances load. And llama.cpp with FP8 vLLM on AITER kernels, best from the first
stream (121 tok/s) and by far under load: here llama.cpp may take only the streams it
finishes sooner. (`sluiceway demo --quick`, which shows this second pool, measures each
target once: tests/test_bench.py::test_demo_quick_end_to_end holds it to a coarser bound.)

Tolerance (MARGIN): a whole run through the proxy carries its overhead, and the proxy's
model is learned from noisy samples. (Before calibration a fresh proxy also paid for one
request on the backend it had not measured: 1 of 16 at c=1 on vLLM, 9% slower alone; the
proxy now measures both before it serves, as shipped, and these tests run it so.) Runs on
an idle 2-core machine put the pool at 0.99x its best member at c=1, 1.01x at 8 and
0.99-1.02x at 32 (the AITER pool: 0.996-1.003x). The code before the kind shapes of
policies/priors.py gave 0.945x here at c=8 (llama.cpp took 3 of the first 8 streams;
0.85x on the AITER pool). 0.97 sits between the two.

The machine's own noise is measured, not assumed. The pool (each time behind a freshly
started proxy) and its best member take turns, three whole runs each, and the medians are
compared; the bound is MARGIN less how far apart the best member's runs read (at most
NOISE_CAP). Why three and medians: whole runs here last 3-6 s and the machine is shared.
A full suite beside two busy loops read one pool run at 0.951x at c=8 while the best
member's runs agreed within 0.2%, and CI read two pool runs at c=32 as 1.019x and 0.903x
(the same shares, llama.cpp 12 of 160 in both) while the best member's agreed within
0.4%: one slow run can sink a mean of two, it cannot move a median of three. Alone, idle
or beside two busy loops, the same runs read 0.99-1.02x at every level, the best member's
runs 0.1-1.7% apart. A policy that loses every run still fails: with `round_robin` in
place of `adaptive` every level fails (0.95x, 0.70x, 0.36x; on the AITER pool 0.967x,
0.58x, 0.28x). (Earlier, 64 requests at c=32 let a run's end hang on its slowest few
streams; 160 make that end a small part.)
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator

import pytest

from loadgen.report import result_json
from loadgen.runner import Target, closed_loop
from loadgen.workload import Workload
from proxy.settings import RoutingSettings
from tests.conftest import Launcher, backend
from tests.processes import Server

SPEED = 4  # the emulators, proxy and client together stay well inside two cores here
MARGIN = 0.97
NOISE_CAP = 0.04  # the most of the bound that the measured noise may take
RUNS = 3  # of the pool and of its best member, each; medians compared
CALIBRATE_TOKENS = RoutingSettings().calibrate_tokens
WORK = Workload("chat", "m", input_len=512, output_len=128)
REQUESTS = {1: 16, 8: 24, 32: 160}


def whole_run(url: str, concurrency: int) -> dict:  # type: ignore[type-arg]
    level = asyncio.run(closed_loop(Target("t", url), WORK, concurrency,
                                    requests=REQUESTS[concurrency], duration_s=None,
                                    warmup=1, timeout_s=120, show_progress=False))
    return result_json(level, [99])


class Pool:
    def __init__(self, launch: Launcher, vllm_profile: str) -> None:
        self.launch = launch
        self.name = f"llamacpp-q4km + {vllm_profile}"
        self.llama = launch.emulator("llamacpp", "llamacpp-q4km", speed=SPEED, model="m")
        self.vllm = launch.emulator("vllm", vllm_profile, speed=SPEED, model="m")

    def fresh_proxy(self) -> Server:
        return self.launch.proxy([
            backend("llama", self.llama, kind="llamacpp", models=["m"]),
            backend("vllm", self.vllm, kind="vllm", models=["m"], max_concurrency=1024)],
            routing={"calibrate_tokens": CALIBRATE_TOKENS})  # as shipped


@pytest.fixture(scope="module", params=["vllm-fp8", "vllm-fp8-aiter"])
def emulated_pool(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    launch = Launcher(tmp_path_factory.mktemp("promise"))
    try:
        yield Pool(launch, request.param)
    finally:
        launch.stop_all()


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_pool_is_at_least_as_good_as_its_best_member(emulated_pool: Pool,
                                                     concurrency: int) -> None:
    llama = whole_run(emulated_pool.llama.url, concurrency)
    vllm = whole_run(emulated_pool.vllm.url, concurrency)
    member, url = max((llama, emulated_pool.llama.url), (vllm, emulated_pool.vllm.url),
                      key=lambda run: run[0]["output_throughput"])
    members, pools = [member], []
    for _ in range(RUNS - 1):  # pool and best member take turns: both see the same machine
        pools.append(pool_run(emulated_pool, concurrency))
        members.append(whole_run(url, concurrency))
    pools.append(pool_run(emulated_pool, concurrency))
    for run in (llama, vllm, *members, *pools):
        assert run["failed"] == 0 and run["completed"] == REQUESTS[concurrency]
    best = statistics.median(run["output_throughput"] for run in members)
    spread = [run["output_throughput"] / best for run in members]
    noise = min(max(spread) - min(spread), NOISE_CAP)
    each = [run["output_throughput"] / best for run in pools]
    ratio = statistics.median(each)
    shares = [{name: b["share"] for name, b in run["backends"].items()} for run in pools]
    print(f"{emulated_pool.name}, c={concurrency}: pool {ratio:.3f}x its best member (median "
          f"of runs {', '.join(f'{x:.3f}' for x in each)}x; best member's runs {noise:.1%} "
          f"apart), shares {shares}")
    assert ratio >= MARGIN - noise, (each, spread, shares)


def pool_run(pool: Pool, concurrency: int) -> dict:  # type: ignore[type-arg]
    """One whole run through a freshly started (and calibrated) proxy."""
    proxy = pool.fresh_proxy()
    try:
        return whole_run(proxy.url, concurrency)
    finally:
        proxy.stop()
