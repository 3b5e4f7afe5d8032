"""A replica that takes leases and renews them until it is killed (tests/test_leases.py).

    python -m tests.cluster_holder REDIS_URL BACKEND N TTL_S
"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from cluster.leases import LeaseStore


async def main(url: str, backend: str, n: int, ttl_s: float) -> None:
    store = LeaseStore(Redis.from_url(url), "holder", ttl_s=ttl_s)
    for _ in range(n):
        lease, _count = await store.acquire(backend, limit=100)
        assert lease is not None
    print("held", flush=True)
    await store.renew_forever(lambda exc: print(f"renew failed: {exc}", flush=True))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
