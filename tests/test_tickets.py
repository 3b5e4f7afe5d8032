"""A request's place in a full backend's queue in Redis (cluster/replica.py), against a real
redis-server: one replica's `Cluster` driven directly, as admission drives it.

A request that meets a full backend joins its queue (a task: Redis's clock, then the
ticket); when a slot frees, it asks for it with that ticket. A soak run of the suite caught
the race between the two: the slot freed while the join was still on its way, the grant
went ahead of it, and the join then put the ticket of a request already served at the head
of the queue, where it held the backend's free slot from every replica until its expiry
(2.2 s of an idle backend with 28 requests waiting, in the replicas' first-come test).
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from backends.config import BackendConfig
from backends.pool import Pool
from cluster.replica import Cluster
from proxy.settings import ClusterSettings
from tests.redis_server import RedisServer


def test_a_request_granted_while_its_join_is_on_its_way_leaves_no_ticket(
        redis_server: RedisServer) -> None:
    """Twenty times: join, then take at once (the slot is free), then leave, as a request
    does that is served the moment it started to wait. The queue is empty after each, and
    the next request is granted at once. Without waiting for the join, 20 of 20 left their
    ticket behind (the grant's script ran between the join's two round trips)."""
    async def run() -> list[tuple[bool, int, bool]]:
        pool = Pool([BackendConfig(name="a", url="http://127.0.0.1:9", models=("m",),
                                   max_concurrency=1)])
        cluster = Cluster(ClusterSettings(redis_url=redis_server.url, replica_id="r0",
                                          lease_ttl_s=2), pool)
        probe = Redis.from_url(redis_server.url)
        try:
            granted, lease, _ = await cluster.take("a")  # the scripts are loaded
            assert granted
            cluster.give(lease)
            # idle connections in the client's pool, as in a replica that has served a while:
            # the join's and the grant's commands then go out side by side
            await asyncio.gather(*(cluster._redis.ping() for _ in range(4)))
            out = []
            for _ in range(20):
                await asyncio.sleep(0.02)  # the last lease given back
                ticket = cluster.ticket()
                cluster.join(ticket, ["a"])
                granted, lease, _ = await cluster.take("a", ticket=ticket)
                cluster.leave(ticket)
                await asyncio.sleep(0.02)  # the leave's own task
                queued = int(await probe.zcard("sluiceway:queue:a"))
                cluster.give(lease)
                await asyncio.sleep(0.02)
                after, lease, _ = await cluster.take("a", ticket=cluster.ticket())
                cluster.give(lease)
                out.append((granted, queued, after))
            return out
        finally:
            await probe.aclose()
            await cluster.close()

    results = asyncio.run(run())
    assert results == [(True, 0, True)] * 20, results


def test_a_replicas_waiters_share_its_places_in_the_queue(redis_server: RedisServer) -> None:
    """One replica's two waiters whose tickets rank the other way round from its own queue
    (two joins within one millisecond rank by name: "r0:t10" before "r0:t9"); a second
    replica's waiter joined after both. When the slot frees, the first replica's head asks
    and is granted on its replica's first place; then its other waiter; the second
    replica's only after both. Counting the replica's own ticket as ahead of its head, all
    three were refused while the slot stayed free (4.4 s in the replicas' first-come test,
    until the ticket order changed)."""
    async def run() -> list[tuple[str, bool]]:
        pools = [Pool([BackendConfig(name="a", url="http://127.0.0.1:9", models=("m",),
                                     max_concurrency=1)]) for _ in range(2)]
        first, second = (Cluster(ClusterSettings(redis_url=redis_server.url,
                                                 replica_id=f"r{i}", lease_ttl_s=2), pool)
                         for i, pool in enumerate(pools))
        try:
            granted, holding, _ = await second.take("a")  # the slot is taken
            assert granted
            head, behind, other = first.ticket(), first.ticket(), second.ticket()
            for cluster, ticket in ((first, behind), (first, head), (second, other)):
                cluster.join(ticket, ["a"])  # `behind` takes the first place
                await asyncio.sleep(0.01)
            second.give(holding)
            await asyncio.sleep(0.05)
            asked = []
            for cluster, ticket in ((second, other), (first, head), (second, other),
                                    (first, behind), (second, other)):
                granted, lease, _ = await cluster.take("a", ticket=ticket)
                asked.append((ticket, granted))
                if granted:
                    cluster.leave(ticket)
                    cluster.give(lease)
                    await asyncio.sleep(0.05)
            return asked
        finally:
            await first.close()
            await second.close()

    assert asyncio.run(run()) == [("r1:t1", False), ("r0:t0", True), ("r1:t1", False),
                                  ("r0:t1", True), ("r1:t1", True)]
