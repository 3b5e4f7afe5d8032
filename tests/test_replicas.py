"""Several sluiceway replicas over one Redis (cluster/): one capacity, one session table,
one learning. Everything here is real: a redis-server on a free loopback port, sluiceway
processes, test upstreams that record their own peak concurrency."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis as sync_redis

from backends.config import BackendConfig
from backends.pool import Pool
from cluster.replica import Cluster, Mode
from loadgen.local import free_port
from proxy.settings import ClusterSettings
from tests.conftest import Launcher, backend
from tests.probes import access_lines
from tests.processes import ROOT, Server
from tests.redis_server import RedisServer

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
        "stream": True}
TTL_S = 2.0
ORDER_MARGIN_S = 0.1  # arrivals closer than this may be served either way (see its test)


def replicas(launch: Launcher, redis: RedisServer | None, backends: list[dict[str, Any]],
             n: int, **sections: dict[str, Any]) -> list[Server]:
    """`n` sluiceway replicas of one configuration (Redis-less with `redis` None)."""
    started = []
    for i in range(n):
        cluster = {} if redis is None else {"cluster": {
            "redis_url": redis.url, "replica_id": f"r{i}", "lease_ttl_s": TTL_S}}
        started.append(launch.proxy(backends, **sections, **cluster))
    return started


def arrivals(proxy: Server) -> dict[str, float]:
    """When each request (by its x-request-id) reached `proxy`, on the wall clock: its access
    line's time less its duration (once the proxy has logged everything)."""
    return {record["request_id"]: logged - record["duration_ms"] / 1000
            for logged, record in access_lines(proxy)}


def chat(url: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    response = httpx.post(url + "/v1/chat/completions", json={**BODY, **extra},
                          headers=headers, timeout=60)
    response.read()
    return response


def spread(proxies: list[Server], clients: int, turns: int) -> list[int]:
    """`clients` closed-loop clients, client i on replica i mod n: every status."""
    def client(i: int) -> list[int]:
        url = proxies[i % len(proxies)].url
        return [chat(url).status_code for _ in range(turns)]

    with ThreadPoolExecutor(clients) as workers:
        return [s for statuses in workers.map(client, range(clients)) for s in statuses]


def test_three_replicas_share_one_capacity(launch: Launcher, redis_server: RedisServer
                                           ) -> None:
    """40 clients over 3 replicas, one backend of capacity 4: the backend never serves
    more than 4 at once (its own count), every request is answered. The same load on
    replicas without Redis is the control: each fills the backend on its own."""
    up = launch.upstream("a", token_delay_ms=15)
    pool = [backend("a", up, models=["m"], max_concurrency=4)]
    shared = replicas(launch, redis_server, pool, 3)
    statuses = spread(shared, clients=40, turns=3)
    stats = up.get("/_stats")
    assert statuses == [200] * 120
    assert stats["max_active"] == 4  # full, and never over
    # and no lease outlives its request (a leaked one would be renewed for ever): gone
    # well within the TTL, as the releases land
    assert _wait(lambda: _leases(redis_server, "a") == 0, TTL_S / 2) < TTL_S / 2
    for proxy in shared:
        proxy.stop()
    up.post("/_control", {"reset": True})
    alone = replicas(launch, None, pool, 3)
    assert spread(alone, clients=40, turns=1) == [200] * 40
    assert up.get("/_stats")["max_active"] > 4  # what the leases prevent


def test_a_killed_replicas_slots_come_back_within_the_ttl(launch: Launcher,
                                                          redis_server: RedisServer) -> None:
    """A replica holding all 4 slots is SIGKILLed: another replica's request, queued
    behind those leases, is served once they expire (within TTL + 1 s), not before."""
    up = launch.upstream("a", token_delay_ms=50)
    a, b = replicas(launch, redis_server, [backend("a", up, models=["m"],
                                                     max_concurrency=4)], 2)
    with ThreadPoolExecutor(5) as workers:
        for _ in range(4):  # 4 long streams on replica a: ~25 s each
            workers.submit(chat, a.url, max_tokens=500)
        deadline = time.monotonic() + 10
        while up.get("/_stats")["active"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up.get("/_stats")["active"] == 4
        queued = workers.submit(chat, b.url)
        time.sleep(0.5)
        assert not queued.done()  # b waits: the backend is full across the replicas
        a.kill()
        killed = time.monotonic()
        reply = queued.result(timeout=TTL_S + 5)
        waited = time.monotonic() - killed
    assert reply.status_code == 200
    assert TTL_S - 0.7 < waited < TTL_S + 1.0


def _leases(redis: RedisServer, backend: str) -> int:
    client = sync_redis.Redis(port=redis.port)
    try:
        return int(client.zcard(f"sluiceway:leases:{backend}"))
    finally:
        client.close()


def _wait(predicate: Any, timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


def _ready(proxy: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(proxy.url + "/ready", timeout=5).json()
    return body


def _wait_cluster(proxy: Server, key: str, value: Any, timeout_s: float) -> float:
    """Seconds until `/ready`'s cluster detail has `key` == `value` (polled every 0.1 s)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if _ready(proxy)["cluster"][key] == value:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{proxy.url}: {key} not {value} within {timeout_s} s: "
                         f"{_ready(proxy)}")


def _wait_mode(proxy: Server, mode: str, timeout_s: float) -> float:
    return _wait_cluster(proxy, "mode", mode, timeout_s)


def test_redis_lost_the_shares_hold_capacity_and_redis_back_restores_leases(
        launch: Launcher, tmp_path: Path) -> None:
    """Redis killed under load: each of 2 replicas keeps to its share (2 of 4), traffic
    continues, `/ready` and the metrics say so. Redis restarted: shared leases again
    without restarting sluiceway (one replica may then use all 4 slots)."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        up = launch.upstream("a", token_delay_ms=15)
        a, b = replicas(launch, redis, [backend("a", up, models=["m"], max_concurrency=4)],
                        2)
        assert _ready(a)["cluster"]["mode"] == "shared"
        _wait_cluster(a, "replicas", 2, 3)  # b's heartbeat seen (a renews every 0.5 s)
        # each replica has measured the backend before Redis goes: how long requests the
        # other replica admitted may still run is then ~3 of them (at least a lease TTL),
        # not the 30 s assumed for an unmeasured backend, during which a replica that saw
        # the other holding all 4 slots may admit nothing (once, in a clean-clone run, 7
        # requests on one replica waited the admission's 30 s and got 503; this bound is
        # the likely cause: they timed out exactly 30 s after Redis went)
        assert [chat(p.url).status_code for p in (a, b)] == [200, 200]
        with ThreadPoolExecutor(1) as background:
            load = background.submit(spread, [a, b], 16, 12)
            time.sleep(0.5)
            redis.stop()
            _wait_mode(a, "partitioned", 5)
            _wait_mode(b, "partitioned", 5)
            statuses = load.result(timeout=120)
        assert statuses == [200] * 16 * 12
        assert up.get("/_stats")["max_active"] <= 4
        cluster = _ready(a)["cluster"]
        assert cluster["shares"] == {"a": 2} and "Redis unreachable" in cluster["detail"]
        metrics = httpx.get(a.url + "/metrics", timeout=5).text
        assert "sluiceway_cluster_partitioned 1.0" in metrics
        assert 'sluiceway_backend_share{backend="a"} 2.0' in metrics
        up.post("/_control", {"reset": True})
        assert spread([a], 8, 3) == [200] * 24  # alone on it, a still keeps to its 2
        assert up.get("/_stats")["max_active"] == 2

        redis.start()  # the same port, empty
        back = _wait_mode(a, "shared", TTL_S + 5)
        _wait_mode(b, "shared", TTL_S + 5)
        assert back >= TTL_S - 1  # recovery waits a TTL for every replica to write its own
        up.post("/_control", {"reset": True})
        assert spread([a], 8, 3) == [200] * 24
        assert up.get("/_stats")["max_active"] == 4  # the whole capacity, by leases again
        assert spread([a, b], 16, 2) == [200] * 32
        assert up.get("/_stats")["max_active"] == 4
        assert "sluiceway_cluster_partitioned 0.0" in httpx.get(a.url + "/metrics").text
    finally:
        redis.stop()


def test_grants_still_on_their_way_when_redis_dies_are_counted_before_a_share_admits(
        tmp_path: Path) -> None:
    """Another replica takes 3 of a backend's 4 slots and Redis dies before this replica
    has handled the counts Redis sent it (its event loop busy meanwhile, as under load).
    It admits nothing until its subscription has handled them, then only the one slot
    left (the soak once saw the backend at 5 of 4 when a replica lost Redis just then).
    In-process, so the order is exact: the loop is blocked from the other replica's
    grants to the loss, which is reported as a failing Redis call reports it."""
    redis = RedisServer(tmp_path / "redis").start()
    holder: subprocess.Popen[str] | None = None

    async def main() -> None:
        nonlocal holder
        pool = Pool([BackendConfig(name="a", url="http://127.0.0.1:9", models=("m",),
                                   max_concurrency=4)])
        cluster = Cluster(ClusterSettings(redis_url=redis.url, replica_id="r1",
                                          lease_ttl_s=TTL_S), pool)
        await cluster.start()
        try:
            counts = sync_redis.Redis(port=redis.port)
            deadline = time.monotonic() + 5
            while counts.pubsub_numsub("sluiceway:in_flight") != [(b"sluiceway:in_flight", 1)]:
                assert time.monotonic() < deadline, "never subscribed"
                await asyncio.sleep(0.02)
            counts.close()
            # blocking from here to the loss: the counts wait unread in the subscription
            holder = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster_holder", redis.url, "a", "3",
                 str(TTL_S)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            redis.stop()
            cluster._unreachable(ConnectionError("Connection closed by server."))
            assert cluster.mode is Mode.PARTITIONED

            pool.acquire("a")  # a request's local slot, taken before its lease
            granted, lease, _ = await cluster.take("a")
            assert (granted, lease) == (False, None)  # the last counts are not in yet
            pool.release("a", None)
            deadline = time.monotonic() + 5
            while not pool["a"].share:  # 0 while the last counts are read
                assert time.monotonic() < deadline, "never settled"
                await asyncio.sleep(0.01)
            assert pool["a"].share == 1  # 4 less the 3 the other replica held

            taken = []
            for _ in range(2):
                pool.acquire("a")
                taken.append((await cluster.take("a"))[0])
            assert taken == [True, False]
        finally:
            await cluster.close()

    try:
        asyncio.run(main())
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(10)
        redis.stop()


def test_a_session_keeps_its_backend_whichever_replica_it_reaches(
        launch: Launcher, redis_server: RedisServer) -> None:
    """Sessions start together on replica 0 (so they spread over both backends), then
    their later turns go round the other replicas, one at a time on an idle pool: each
    returns to the backend of its first turn."""
    ups = [launch.upstream(name, token_delay_ms=20) for name in ("a", "b")]
    pool = [backend(u_name, up, models=["m"], max_concurrency=4)
            for u_name, up in zip(("a", "b"), ups, strict=True)]
    proxies = replicas(launch, redis_server, pool, 3)
    sessions = [f"s{i}" for i in range(8)]

    def first(session: str) -> str:
        return chat(proxies[0].url, {"x-session-id": session}).headers[
            "x-sluiceway-backend"]

    with ThreadPoolExecutor(len(sessions)) as workers:
        homes = dict(zip(sessions, workers.map(first, sessions), strict=True))
    assert set(homes.values()) == {"a", "b"}  # both backends hold sessions
    for turn in range(4):
        for session in sessions:
            proxy = proxies[1 + (turn % 2)]
            reply = chat(proxy.url, {"x-session-id": session})
            assert reply.status_code == 200
            assert reply.headers["x-sluiceway-backend"] == homes[session], (session, turn)


def test_a_late_replica_starts_warm_and_every_replica_learns_from_all(
        launch: Launcher, redis_server: RedisServer) -> None:
    """Replica 0 serves traffic; a replica started later has the learned curves before
    its first request (and does not calibrate: the backend sees no probe from it); what
    replica 1 then serves is learned by replica 0 too."""
    up = launch.upstream("a", token_delay_ms=10)
    pool = [backend("a", up, models=["m"], max_concurrency=8)]
    routing = {"routing": {"calibrate_tokens": 16}}
    (first,) = replicas(launch, redis_server, pool, 1, **routing)
    assert spread([first], 4, 5) == [200] * 20
    time.sleep(5.5)  # persisted every 5 s
    served = up.get("/_stats")["requests"]
    late = launch.proxy(pool, **routing, cluster={
        "redis_url": redis_server.url, "replica_id": "late", "lease_ttl_s": TTL_S})
    view = httpx.get(late.url + "/admin/backends").json()["backends"][0]
    learned = httpx.get(first.url + "/admin/backends").json()["backends"][0]
    assert view["throughput_curve"] and view["completed"] == 0
    assert view["throughput_curve"] == learned["throughput_curve"]
    assert up.get("/_stats")["requests"] == served  # no calibration probe
    assert spread([late], 8, 4) == [200] * 32  # a concurrency replica 0 never saw alone
    time.sleep(1.0)
    after = httpx.get(first.url + "/admin/backends").json()["backends"][0]
    assert after["completed"] == learned["completed"]  # it served none of them
    assert after["throughput_curve"] != learned["throughput_curve"]  # yet it learned


def test_sigterm_hands_back_leases_and_heartbeat_at_once(launch: Launcher,
                                                         redis_server: RedisServer) -> None:
    """A replica stopped with SIGTERM leaves nothing in Redis: no lease, no heartbeat (the
    other replicas' shares grow at once, not after a TTL)."""
    up = launch.upstream("a", token_delay_ms=5)
    a, b = replicas(launch, redis_server, [backend("a", up, models=["m"],
                                                     max_concurrency=4)], 2)
    assert spread([a], 4, 2) == [200] * 8
    _wait_cluster(b, "replicas", 2, 3)
    a.stop()

    async def leftovers() -> tuple[int, list[bytes]]:
        from redis.asyncio import Redis
        client = Redis.from_url(redis_server.url)
        try:
            return (await client.zcard("sluiceway:leases:a"),
                    await client.zrange("sluiceway:replicas", 0, -1))
        finally:
            await client.aclose()

    leases, live = asyncio.run(leftovers())
    assert leases == 0 and live == [b"r1"]


def test_a_drain_on_one_replica_is_every_replicas(launch: Launcher,
                                                  redis_server: RedisServer) -> None:
    """An operator drains backend a on replica 0's admin plane: replica 1 stops routing
    there too, a replica started later finds it drained; undrained on replica 1, it is back
    everywhere."""
    ups = {name: launch.upstream(name, token_delay_ms=5) for name in ("a", "b")}
    pool = [backend(name, up, models=["m"], max_concurrency=4) for name, up in ups.items()]
    admins = [free_port(), free_port(), free_port()]

    def replica(i: int) -> Server:
        return launch.proxy(pool, admin={"port": admins[i]}, cluster={
            "redis_url": redis_server.url, "replica_id": f"r{i}", "lease_ttl_s": TTL_S})

    def admin(i: int, method: str, path: str) -> Any:
        response = httpx.request(method, f"http://127.0.0.1:{admins[i]}{path}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    _first, second = replica(0), replica(1)
    admin(0, "POST", "/admin/backends/a/drain")
    assert _wait(lambda: admin(1, "GET", "/admin/backends/a")["draining"], 2.0) < 2.0
    served = {chat(second.url).headers["x-sluiceway-backend"] for _ in range(8)}
    assert served == {"b"}
    late = replica(2)
    assert admin(2, "GET", "/admin/backends/a")["draining"] is True
    assert {chat(late.url).headers["x-sluiceway-backend"] for _ in range(4)} == {"b"}
    admin(1, "POST", "/admin/backends/a/undrain")
    for i in (0, 2):
        assert _wait(lambda i=i: not admin(i, "GET", "/admin/backends/a")["draining"],
                     2.0) < 2.0


def test_replicas_serve_a_full_backend_first_come_first_served(
        launch: Launcher, redis_server: RedisServer) -> None:
    """30 requests, 15 ms apart, round the 3 replicas, on a backend of one slot that takes
    ~60 ms a request: served in the order they reached the replicas, whichever replica
    holds each, and the slot never idles while requests wait.

    Served: the order the backend started them in, by its own record (the test upstream
    notes each stream's arrival and x-request-id). Not the order of the replies' first bytes
    at the client: beside two busy loops, one of 30 client threads read its first bytes
    after those of the request the backend served next, about 60 ms later. Reached: each
    replica's own record (its access line's time less the request's duration). Not the order
    the client sent them: 30 client threads starting up reach the replicas up to 150 ms out
    of the order they were submitted in (a test that compared with the send order failed on
    an idle machine with every reply in arrival order). Two requests that reached replicas
    within ORDER_MARGIN_S of each other may go either way: each takes its place in Redis a
    moment after it arrives (idle: swaps of at most 9 ms seen). Without the queue in Redis
    the replica that frees the slot kept it for its own waiters: one request 24 places
    (1.4 s) late. The longest gap between the backend's starts bounds an idle slot: a ticket
    left in the queue by a request already served held the slot 2.2-4.6 s (test_tickets.py)."""
    up = launch.upstream("a", token_delay_ms=10)
    proxies = replicas(launch, redis_server, [backend("a", up, models=["m"],
                                                       max_concurrency=1)], 3,
                       routing={"queue_timeout_s": 60})
    n = 30

    def one(i: int) -> None:
        body = {**BODY, "max_tokens": 5, "messages": [{"role": "user", "content": f"r{i}"}]}
        with httpx.stream("POST", proxies[i % 3].url + "/v1/chat/completions", json=body,
                          headers={"x-request-id": f"r{i}"}, timeout=60) as reply:
            assert reply.status_code == 200
            for _ in reply.iter_bytes():
                pass

    with ThreadPoolExecutor(n) as workers:
        sent = []
        for i in range(n):
            sent.append(workers.submit(one, i))
            time.sleep(0.015)
        for future in sent:
            future.result()
    reached = {r: t for proxy in proxies for r, t in arrivals(proxy).items()}
    started = {t["request_id"]: t["arrival"] for t in up.get("/_stats")["timings"]}
    assert sorted(reached) == sorted(started) == sorted(f"r{i}" for i in range(n))
    served = sorted(started, key=started.__getitem__)
    overtaken = [(a, b, round(reached[a] - reached[b], 3))
                 for x, a in enumerate(served) for b in served[x + 1:]
                 if reached[a] - reached[b] > ORDER_MARGIN_S]
    assert not overtaken, overtaken  # (served first, yet reached later than, by s)
    gaps = [started[b] - started[a] for a, b in itertools.pairwise(served)]
    assert max(gaps) < TTL_S / 2, max(gaps)
    assert up.get("/_stats")["max_active"] == 1
    client = sync_redis.Redis(port=redis_server.port)
    try:  # every ticket left the queue with its request
        assert _wait(lambda: client.zcard("sluiceway:queue:a") == 0, 1.0) < 1.0
    finally:
        client.close()
