"""The promise: a pool under `adaptive` is at least as good as its best member, measured as
users measure it (a freshly started proxy, every request counted, whole-run output tok/s as
`vllm bench serve` reports it), on emulated llama.cpp and vLLM.

Which member is best changes with the load and the pool: vLLM with AITER kernels wins
everywhere (121 against 114 tok/s for one stream), stock FP8 vLLM loses a lone stream to
llama.cpp (104 against 114) and wins from 8 up. So a policy that always picks vLLM fails
here, as does one that balances load.

Tolerance (MARGIN): a fresh proxy pays for what it does not know yet: one request on the
backend it has not measured (a probe: 1 of 8 requests at c=1 is 1% of the run on the
slower member), and a whole run through the proxy carries its overhead. Five runs of these
levels on an idle 2-core machine and three with two busy-loop processes beside them put
the pool at 0.99-1.02x its best member after the kind shapes of policies/priors.py; the
code before them gave 0.85x at c=8 (llama.cpp took 3 of the first 8 streams). 0.95 sits
between the two with room for the noise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadgen.report import result_json
from loadgen.runner import Target, closed_loop
from loadgen.workload import Workload
from tests.conftest import Launcher, backend
from tests.processes import Server

SPEED = 2  # the emulators, proxy and client together stay well inside two cores here
MARGIN = 0.95
WORK = Workload("chat", "m", input_len=512, output_len=128)
REQUESTS = {1: 8, 8: 24, 32: 64}


def whole_run(url: str, concurrency: int) -> dict:  # type: ignore[type-arg]
    level = asyncio.run(closed_loop(Target("t", url), WORK, concurrency,
                                    requests=REQUESTS[concurrency], duration_s=None,
                                    warmup=1, timeout_s=120, show_progress=False))
    return result_json(level, [99])


class Pool:
    def __init__(self, launch: Launcher, vllm_profile: str) -> None:
        self.launch = launch
        self.llama = launch.emulator("llamacpp", "llamacpp-q4km", speed=SPEED, model="m")
        self.vllm = launch.emulator("vllm", vllm_profile, speed=SPEED, model="m")

    def fresh_proxy(self) -> Server:
        return self.launch.proxy([
            backend("llama", self.llama, kind="llamacpp", models=["m"]),
            backend("vllm", self.vllm, kind="vllm", models=["m"], max_concurrency=1024)])


@pytest.fixture(scope="module", params=["vllm-fp8-aiter", "vllm-fp8"])
def emulated_pool(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    launch = Launcher(tmp_path_factory.mktemp("promise"))
    try:
        yield Pool(launch, request.param)
    finally:
        launch.stop_all()


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_pool_is_at_least_as_good_as_its_best_member(emulated_pool: Pool,
                                                     concurrency: int,
                                                     tmp_path: Path) -> None:
    llama = whole_run(emulated_pool.llama.url, concurrency)
    vllm = whole_run(emulated_pool.vllm.url, concurrency)
    proxy = emulated_pool.fresh_proxy()
    try:
        pool = whole_run(proxy.url, concurrency)
    finally:
        proxy.stop()
    for run in (llama, vllm, pool):
        assert run["failed"] == 0 and run["completed"] == REQUESTS[concurrency]
    best = max(llama["output_throughput"], vllm["output_throughput"])
    ratio = pool["output_throughput"] / best
    shares = {name: b["share"] for name, b in pool["backends"].items()}
    assert ratio >= MARGIN, (ratio, llama["output_throughput"], vllm["output_throughput"],
                             shares)
