"""The admission queue over a real pool: FIFO order, timeouts, capacity, cancellation."""

from __future__ import annotations

import asyncio
import random

import pytest

from backends.config import BackendConfig
from backends.pool import Pool
from backends.snapshot import Health
from backends.stats import RequestResult
from policies import POLICIES, PolicyConfig, RouteRequest
from proxy.admission import Admission
from proxy.errors import ProxyError

REQ = RouteRequest(endpoint="chat", model="m")


def make(caps: dict[str, int], queue_size: int = 8, timeout_s: float = 5) -> tuple[Pool, Admission]:
    pool = Pool(BackendConfig(name=n, url=f"http://127.0.0.1:{9000 + i}", models=("m",),
                              max_concurrency=c) for i, (n, c) in enumerate(caps.items()))
    policy = POLICIES["least_loaded"](PolicyConfig(random.Random(0)))
    return pool, Admission(pool, policy, queue_size=queue_size, timeout_s=timeout_s)


def test_waiters_are_admitted_in_arrival_order_as_slots_free() -> None:
    async def main() -> None:
        pool, admission = make({"a": 1})
        assert (await admission.admit(REQ)).backend == "a"
        order: list[int] = []

        async def wait(i: int) -> None:
            await admission.admit(REQ)
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert admission.depth == 3 and pool["a"].in_flight == 1
        for _ in range(3):
            pool.release("a", RequestResult("ok"))
            await asyncio.sleep(0.01)
            assert pool["a"].in_flight == 1  # never above the capacity of 1
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]

    asyncio.run(main())


def test_queue_timeout_and_full_queue_give_503_with_retry_after() -> None:
    async def main() -> None:
        pool, admission = make({"a": 1}, queue_size=1, timeout_s=0.05)
        await admission.admit(REQ)
        waiting = asyncio.create_task(admission.admit(REQ))
        await asyncio.sleep(0.01)
        with pytest.raises(ProxyError) as full:
            await admission.admit(REQ)
        assert full.value.status == 503 and "queue is full" in full.value.message
        with pytest.raises(ProxyError) as timed_out:
            await waiting
        assert timed_out.value.status == 503 and timed_out.value.retry_after_s
        assert admission.depth == 0 and pool["a"].in_flight == 1

    asyncio.run(main())


def test_cancelled_waiter_leaves_no_slot_behind() -> None:
    async def main() -> None:
        pool, admission = make({"a": 1})
        await admission.admit(REQ)
        waiter = asyncio.create_task(admission.admit(REQ))
        await asyncio.sleep(0.01)
        pool.release("a", RequestResult("ok"))  # grants the slot to the waiter...
        waiter.cancel()  # ...which gives up before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool["a"].in_flight == 0 and admission.depth == 0

    asyncio.run(main())


def test_waiter_fails_fast_when_its_only_backend_goes_down() -> None:
    async def main() -> None:
        pool, admission = make({"a": 1})
        await admission.admit(REQ)
        waiter = asyncio.create_task(admission.admit(REQ))
        await asyncio.sleep(0.01)
        pool.set_health("a", Health.DOWN, "gone")
        with pytest.raises(ProxyError) as err:
            await waiter
        assert err.value.status == 503 and "no healthy backend" in err.value.message

    asyncio.run(main())


def test_newcomer_for_a_free_backend_is_not_blocked_by_waiters_for_a_full_one() -> None:
    async def main() -> None:
        pool = Pool([
            BackendConfig(name="a", url="http://127.0.0.1:9001", models=("x",), max_concurrency=1),
            BackendConfig(name="b", url="http://127.0.0.1:9002", models=("y",), max_concurrency=1),
        ])
        admission = Admission(pool, POLICIES["spillover"](PolicyConfig(random.Random(0))), 8, 5)
        x = RouteRequest(endpoint="chat", model="x")
        await admission.admit(x)
        waiter = asyncio.create_task(admission.admit(x))
        await asyncio.sleep(0.01)
        assert (await admission.admit(RouteRequest(endpoint="chat", model="y"))).backend == "b"
        waiter.cancel()

    asyncio.run(main())
