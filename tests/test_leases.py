"""cluster/leases.py against a real redis-server: one capacity shared by several replicas.

Each LeaseStore here is one replica (its own Redis connection); the killed replica is a
real process. What is asserted is what the issue asks of the store: the sum of leases
never exceeds a backend's limit however the replicas race, every waiter is served, a dead
replica's slots come back within its TTL, releases wake the other replicas, a shutdown
frees everything at once, a restarted Redis is used again without a restart of ours, and
the fallback shares sum to the capacity.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cluster.leases import LeaseStore, partition
from tests.processes import ROOT
from tests.redis_server import RedisServer


def stores(url: str, n: int, ttl_s: float = 3.0) -> list[LeaseStore]:
    return [LeaseStore(Redis.from_url(url), f"replica-{i}", ttl_s=ttl_s) for i in range(n)]


async def close(*items: LeaseStore) -> None:
    for store in items:
        await store._redis.aclose()


def test_leases_never_exceed_the_limit_across_replicas(redis_server: RedisServer) -> None:
    """Three replicas, 40 clients spread over them, a backend of 4 slots: at no moment do
    more than 4 hold a lease, and every client gets its turns."""
    limit, clients, turns = 4, 40, 5

    async def run() -> tuple[int, int, int]:
        replicas = stores(redis_server.url, 3)
        wake = [asyncio.Event() for _ in replicas]
        listeners = [asyncio.create_task(r.listen(lambda b, c, e=e: e.set()))
                     for r, e in zip(replicas, wake, strict=True)]
        await asyncio.sleep(0.2)  # subscribed
        holding, peak, served = 0, 0, 0
        rng = random.Random(7)

        async def client(i: int) -> None:
            nonlocal holding, peak, served
            replica, event = replicas[i % 3], wake[i % 3]
            for _ in range(turns):
                for _attempt in range(10_000):
                    lease, _count = await replica.acquire("b", limit)
                    if lease is not None:
                        break
                    event.clear()
                    with _suppress_timeout():
                        await asyncio.wait_for(event.wait(), 0.05)
                else:
                    raise AssertionError("never got a slot")
                holding += 1
                peak = max(peak, holding)
                await asyncio.sleep(rng.uniform(0.002, 0.012))
                holding -= 1
                await replica.release(lease)
                served += 1

        try:
            await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), 120)
            left = await replicas[0].count("b")
        finally:
            for task in listeners:
                task.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
            await close(*replicas)
        return peak, served, left

    peak, served, left = asyncio.run(run())
    assert served == clients * turns
    assert peak == limit  # contended (40 clients for 4 slots) and never over
    assert left == 0


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return kind is TimeoutError


def test_a_killed_replica_loses_its_leases_within_the_ttl(redis_server: RedisServer) -> None:
    ttl = 1.5
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster_holder", redis_server.url, "b", "3", str(ttl)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

        async def count() -> int:
            store = stores(redis_server.url, 1)[0]
            try:
                return await store.count("b")
            finally:
                await close(store)

        assert asyncio.run(count()) == 3
        time.sleep(2 * ttl)  # renewals keep a live replica's leases past their TTL
        assert asyncio.run(count()) == 3
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        killed = time.monotonic()
        while asyncio.run(count()) and time.monotonic() - killed < ttl + 3:
            time.sleep(0.05)
        recovered = time.monotonic() - killed
        assert asyncio.run(count()) == 0
        assert recovered <= ttl + 1.0, recovered
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_every_count_change_reaches_every_other_replica(redis_server: RedisServer) -> None:
    """Grants and releases publish the backend's new count (a refusal changes nothing and
    says nothing): a release wakes the waiting replicas, and every replica's view of the
    backend's load follows the others'."""
    async def run() -> list[tuple[str, int]]:
        a, b = stores(redis_server.url, 2)
        heard: list[tuple[str, int]] = []
        task = asyncio.create_task(a.listen(lambda backend, n: heard.append((backend, n))))
        await asyncio.sleep(0.2)
        try:
            first, _ = await b.acquire("gpu-0", 2)
            second, _ = await b.acquire("gpu-0", 2)
            assert first is not None and second is not None
            assert (await b.acquire("gpu-0", 2))[0] is None  # full
            await b.release(first)
            for _ in range(100):
                if len(heard) >= 3:
                    break
                await asyncio.sleep(0.01)
            return heard
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await close(a, b)

    assert asyncio.run(run()) == [("gpu-0", 1), ("gpu-0", 2), ("gpu-0", 1)]


def test_shutdown_releases_everything_at_once(redis_server: RedisServer) -> None:
    async def run() -> tuple[list[str], int, list[str]]:
        a, b = stores(redis_server.url, 2, ttl_s=30)
        try:
            for backend in ("x", "x", "y"):
                assert (await a.acquire(backend, 8))[0] is not None
            await b.acquire("x", 8)
            await a.renew()
            await b.renew()
            live = b.replicas
            await a.release_all()
            counts = await b.renew(["x", "y"])
            return live, counts["x"] + counts["y"], b.replicas
        finally:
            await close(a, b)

    live, left, after = asyncio.run(run())
    assert live == ["replica-0", "replica-1"]
    assert left == 1  # only the other replica's lease
    assert after == ["replica-1"]


def test_redis_restarted_is_used_again(tmp_path: Path) -> None:
    first = RedisServer(tmp_path / "r").start()
    second = RedisServer(tmp_path / "r", port=first.port)

    async def run() -> None:
        store = stores(first.url, 1)[0]
        try:
            assert (await store.acquire("b", 1))[0] is not None
            first.stop()
            with pytest.raises((RedisError, OSError)):
                await store.acquire("b", 1)
            second.start()
            lease, count = await store.acquire("b", 1)  # an empty Redis: the slot is free
            assert lease is not None and count == 1
        finally:
            await close(store)

    try:
        asyncio.run(run())
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize(("capacity", "replicas", "shares"), [
    (4, 3, [2, 1, 1]), (8, 2, [4, 4]), (2, 3, [1, 1, 0]), (5, 1, [5]), (0, 2, [0, 0])])
def test_fallback_shares_sum_to_the_capacity(capacity: int, replicas: int,
                                            shares: list[int]) -> None:
    ids = [f"r{i}" for i in range(replicas)]
    assert [partition(capacity, ids, me) for me in ids] == shares
    assert sum(shares) == capacity


def test_fallback_without_the_others_known_splits_by_the_floor() -> None:
    """A replica that never saw Redis knows only itself: with min_replicas 3 it takes
    floor(capacity / 3), never the whole capacity."""
    assert partition(8, [], "me", at_least=3) == 2
    assert partition(2, ["me"], "me", at_least=3) == 0
    assert partition(8, ["a", "b", "me"], "me", at_least=3) == 2  # known: by rank
    assert partition(8, [], "me") == 8  # the default: alone
