"""What a Redis lease costs sluiceway per request: acquire + release, CPU and wall time.

Starts a real redis-server on a free loopback port, then one process (one replica) runs
acquire+release pairs through `cluster.leases.LeaseStore` with 1 and with 32 concurrent
tasks, and reports this process's CPU time (user + system) and the wall time per pair.
The issue's budget is 0.5 ms of sluiceway CPU per request.

    .venv/bin/python benchmarks/lease_cost.py [--pairs 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from cluster.leases import LeaseStore
from tests.redis_server import RedisServer


async def pairs(store: LeaseStore, n: int, concurrency: int) -> tuple[float, float]:
    async def worker(count: int) -> None:
        for _ in range(count):
            lease, _ = await store.acquire("b", 1_000_000)
            assert lease is not None
            await store.release(lease)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    share = n // concurrency
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    done = share * concurrency
    return ((time.process_time() - cpu0) / done * 1000,
            (time.perf_counter() - wall0) / done * 1000)


async def main(n: int, url: str) -> None:
    store = LeaseStore(Redis.from_url(url), "bench")
    try:
        await pairs(store, 200, 8)  # connections, scripts loaded
        print(f"redis-py {__import__('redis').__version__}, hiredis "
              f"{'yes' if _has_hiredis() else 'no'}, {os.cpu_count()} CPUs")
        for c in (1, 32):
            cpu, wall = await pairs(store, n, c)
            print(f"concurrency {c:>2}: {cpu:.3f} ms CPU and {wall:.3f} ms wall per "
                  f"acquire+release pair")
    finally:
        await store._redis.aclose()


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            asyncio.run(main(args.pairs, server.url))
        finally:
            server.stop()
