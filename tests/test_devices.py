"""Backends on one accelerator (policies/devices.py): adaptive keeps a slower member idle
until the overflow is big enough to pay for sharing the device. Policy decisions over
hand-built snapshots, the admission queue's order, and real proxies over emulators.

Curves are the H200 measurements (docs/benchmarks.md): llama-server 4 slots, 653 / 937 /
1,316 tok/s at 1 / 2 / 4 streams; transformers serve as a calibrated proxy first knows it,
89 tok/s at one stream, then the batching shape.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import httpx
import pytest

from backends.config import BackendConfig
from backends.pool import Pool
from backends.snapshot import BackendSnapshot, Health, PoolSnapshot
from backends.stats import RequestResult
from loadgen.report import result_json
from loadgen.runner import Target, closed_loop
from loadgen.workload import Workload
from policies import POLICIES, NoBackend, PolicyConfig, Route, RouteRequest, Wait
from policies.base import Decision, eligible
from proxy.admission import Admission
from tests.conftest import Launcher, backend

LLAMA = {1: 653, 2: 937, 4: 1316}
TF = {1: 89}
REQ = RouteRequest(endpoint="chat", model="m", max_tokens=128)


def member(name: str, index: int, in_flight: int, curve: dict[int, float], kind: str,
           capacity: int | None, device: str | None = "gpu0",
           health: Health = Health.HEALTHY) -> BackendSnapshot:
    return BackendSnapshot(
        name=name, index=index, kind=kind, health=health, capacity=capacity,
        in_flight=in_flight, models=frozenset({"m"}), ttft_s=None, decode_tok_s=None,
        upstream_running=None, upstream_waiting=None,
        throughput_curve=tuple(sorted(curve.items())), ttft_curve=((1, 0.02),),
        mean_output_tokens=128.0, device=device,
    )


def choose(llama_in_flight: int, tf_in_flight: int, waiting: int,
           tf_curve: dict[int, float] = TF, device: str | None = "gpu0",
           llama_health: Health = Health.HEALTHY) -> Decision:
    snapshot = PoolSnapshot((
        member("llama", 0, llama_in_flight, LLAMA, "llamacpp", 4, device, llama_health),
        member("tf", 1, tf_in_flight, tf_curve, "openai", None, device),
    ))
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0), affinity=False))
    return policy.choose(replace(REQ, waiting=waiting), snapshot)


def test_the_lead_takes_what_it_has_room_for() -> None:
    assert choose(0, 0, 0) == Route("llama")
    assert choose(1, 0, 0) == Route("llama")
    assert choose(3, 0, 0) == Route("llama")


@pytest.mark.parametrize("clients", [8, 16])
def test_a_small_overflow_waits_for_the_lead(clients: int) -> None:
    waiting = clients - 4 - 1  # the lead's 4 slots full, this request and the rest waiting
    decision = choose(4, 0, waiting)
    assert isinstance(decision, Wait) and decision.hold
    assert choose(4, 0, waiting, device=None) == Route("tf")  # spilled when independent


@pytest.mark.parametrize("clients", [32, 64])
def test_an_overflow_big_enough_to_pay_for_sharing_spills(clients: int) -> None:
    # 28 (60) for the batching engine, whose shape from 89 tok/s at one stream reaches
    # 1,112 (1,713) tok/s there, above 0.7 x llama-server's 1,316 at its 4 slots
    waiting = clients - 4 - 1
    assert choose(4, 0, waiting) == Route("tf")
    assert choose(4, 1, waiting - 1) == Route("tf")  # the next in the same pass


# as measured alone on the H200 (20 s a level, same machine)
TF_MEASURED = {1: 92, 2: 172, 4: 332, 8: 593, 16: 1128, 32: 1263, 64: 1547}


@pytest.mark.parametrize(("clients", "spills"), [(8, False), (16, False), (32, True),
                                                  (64, True)])
def test_with_the_measured_curves_it_shares_where_sharing_won(clients: int,
                                                              spills: bool) -> None:
    # sharing measured: 555 / 1,153 / 1,645 / 1,729 tok/s at 8 / 16 / 32 / 64 clients
    # against llama-server alone's 1,454-1,514 / 1,457-1,466 / 1,230-1,380 / 1,248-1,333
    decision = choose(4, 0, clients - 5, tf_curve=TF_MEASURED)
    assert (decision == Route("tf")) is spills


def test_a_member_already_sharing_keeps_its_share_below_the_lead_figure() -> None:
    beside = {1: 89, 8: 300, 40: 800}  # learned beside llama-server: lower than alone
    assert choose(4, 40, 0, tf_curve=beside) == Route("tf")  # 800+ >= 0.75 x 0.7 x 1,316
    decision = choose(4, 0, 0, tf_curve=beside)  # not sharing yet: the full bar
    assert isinstance(decision, Wait) and decision.hold


def test_a_lead_that_is_down_holds_nothing_back() -> None:
    assert choose(0, 0, 0, llama_health=Health.DOWN) == Route("tf")


def test_separate_devices_are_independent() -> None:
    snapshot = PoolSnapshot((
        member("llama", 0, 4, LLAMA, "llamacpp", 4, "gpu0"),
        member("tf", 1, 0, TF, "openai", None, "gpu1"),
    ))
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0), affinity=False))
    assert policy.choose(REQ, snapshot) == Route("tf")


class HoldUntil:
    """A policy with the shape of the device rule, for admission tests: `a` while it has
    room, else `b` once it would run `threshold` requests (its own, every waiting one and
    this one), else hold."""

    name = "hold-until"

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.routed: list[tuple[int, str]] = []  # (request's prompt_chars, backend)

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision:
        found = eligible(request, snapshot)
        if not isinstance(found, tuple):
            return found
        room = {b.name: b for b in found}
        if "a" in room:
            self.routed.append((request.prompt_chars, "a"))
            return Route("a")
        if room["b"].in_flight + request.waiting + 1 >= self.threshold:
            self.routed.append((request.prompt_chars, "b"))
            return Route("b")
        return Wait("held for a", hold=True)


async def a_full(policy: HoldUntil) -> tuple[Pool, HoldUntil, Admission]:
    """A pool of `a` (one slot, taken by the first request) and `b` (8) behind `policy`."""
    pool = Pool(BackendConfig(name=n, url=f"http://127.0.0.1:{9000 + i}", models=("m",),
                              max_concurrency=c)
                for i, (n, c) in enumerate({"a": 1, "b": 8}.items()))
    admission = Admission(pool, policy, queue_size=8, timeout_s=5)
    assert (await admission.admit(REQ)).backend == "a"
    return pool, policy, admission


def test_held_waiters_go_in_arrival_order_when_the_queue_is_long_enough() -> None:
    async def main() -> None:
        _, policy, admission = await a_full(HoldUntil(3))
        got: dict[int, str] = {}

        async def admit(i: int) -> None:
            got[i] = (await admission.admit(replace(REQ, prompt_chars=i))).backend

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(admit(i)))
            await asyncio.sleep(0.01)
            if i < 2:
                assert admission.depth == i + 1 and not got  # held: a is full, b too few
        # the third made three: all of them to b, the oldest first (decided alone, the
        # newcomer would have gone to b and left the two before it waiting for a); the
        # fourth finds b running three and goes there at once
        assert got == {0: "b", 1: "b", 2: "b", 3: "b"} and admission.depth == 0
        assert policy.routed == [(0, "a"), (0, "b"), (1, "b"), (2, "b"), (3, "b")]
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_hold_that_never_fills_waits_for_the_lead_in_order() -> None:
    async def main() -> None:
        pool, policy, admission = await a_full(HoldUntil(5))

        async def admit(i: int) -> None:
            await admission.admit(replace(REQ, prompt_chars=i + 1))

        tasks = [asyncio.create_task(admit(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert admission.depth == 3 and pool["b"].in_flight == 0
        for _ in range(3):
            pool.release("a", RequestResult("ok"))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert policy.routed == [(0, "a"), (1, "a"), (2, "a"), (3, "a")]
        assert pool["b"].in_flight == 0

    asyncio.run(main())


def test_no_policy_decision_leaves_nothing_for_a_group_of_one() -> None:
    snapshot = PoolSnapshot((member("llama", 0, 4, LLAMA, "llamacpp", 4),))
    decision = POLICIES["adaptive"](PolicyConfig(random.Random(0))).choose(REQ, snapshot)
    assert isinstance(decision, Wait) and not decision.hold
    assert not isinstance(decision, NoBackend)


def test_a_pool_on_one_device_keeps_the_slow_member_for_a_big_overflow(
        launch: Launcher) -> None:
    """Real proxies over the emulated H200 pair (llama-server 4 slots at 653 tok/s a
    stream, the batching engine at 89): 8 clients. Declared on one device, the batching
    engine gets nothing (the overflow of 4 waits for llama-server's slots, as it should on
    a shared GPU: measured there, spilling it cost 62%); undeclared, it takes the overflow.
    The admin view says which device each backend is on."""
    work = Workload("chat", "m", input_len=128, output_len=32)
    llama = launch.emulator("llamacpp", "h200-llamacpp-q4km", model="m")
    batching = launch.emulator("vllm", "h200-transformers-cb", model="m")
    shares = {}
    for device in ("gpu0", ""):
        proxy = launch.proxy(
            [backend("llama", llama, kind="llamacpp", models=["m"], device=device),
             backend("tf", batching, kind="openai", models=["m"], device=device,
                     max_concurrency=256)],
            routing={"calibrate_tokens": 32})
        views = httpx.get(proxy.url + "/admin/backends").json()["backends"]
        assert [v["device"] for v in views] == [device or None] * 2
        level = asyncio.run(closed_loop(Target("pool", proxy.url), work, 8, requests=48,
                                        duration_s=None, warmup=0, timeout_s=60,
                                        show_progress=False))
        result = result_json(level, [99])
        assert result["failed"] == 0 and result["completed"] == 48
        shares[device] = result["backends"].get("tf", {"requests": 0})["requests"]
    assert shares["gpu0"] == 0, shares
    assert shares[""] >= 8, shares  # the control: independent, the overflow spills


def test_a_lead_with_no_known_capacity_keeps_what_the_slower_member_cannot_beat() -> None:
    """A lead whose capacity is unknown never fills: the bar is its curve at what it would
    hold with this request (its streams + the waiting + 1), and the slower member's curve
    at one more stream of its own must reach BAR of that."""
    def decide(device: str | None) -> Decision:
        snapshot = PoolSnapshot((
            member("llama", 0, 8, LLAMA, "llamacpp", None, device),
            member("tf", 1, 0, TF, "openai", None, device),
        ))
        policy = POLICIES["adaptive"](PolicyConfig(random.Random(0), affinity=False))
        return policy.choose(REQ, snapshot)

    assert decide(None) == Route("tf")  # independent: llama.cpp's ninth stream adds little
    assert decide("gpu0") == Route("llama")  # 89 tok/s is far below 0.7 x its 1,316+
