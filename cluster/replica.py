"""One replica among several: capacity, learning and sessions shared through Redis.

The replica runs in one of three modes:

- `shared` (Redis reachable): a request to a backend with a known capacity holds a lease
  (cluster/leases.py) besides its local slot, so the replicas together never exceed the
  capacity. Every acquire and release publishes the backend's global count; the pool
  keeps the other replicas' part (`remote_in_flight`), so the policy sees, and learns its
  curves against, what the backend is really serving. A release anywhere wakes this
  replica's queue.
- `partitioned` (Redis unreachable): each backend is limited to this replica's share of
  its capacity (`partition`: the shares of the live replicas, as last seen, sum to the
  capacity), never to the whole of it. The requests admitted meanwhile hold leases known
  only here, and every renewal that reaches Redis again writes them there. The shares
  admit nothing until the subscription has handled the last counts the lost Redis sent
  (or `SETTLE_S` has passed): a grant another replica had just taken may still be on its
  way, and the room left by the others is counted from what they held last.
- `recovering` (Redis back): the shares still hold for one lease TTL, the time every
  replica needs to notice Redis is back and to write its requests there; then `shared`.
  So replicas that notice at different moments never count against different rules.

An operator's drain is the cluster's: it is kept in Redis (`{prefix}:drained`) and
announced to every replica, so no replica routes to a drained backend, and a replica that
starts later finds it drained too.

Each admitted request holds its own lease (None for a backend without a known capacity)
and hands back exactly that one when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Coroutine
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from backends.pool import Pool
from backends.state import BackendState
from backends.stats import RequestResult
from cluster import learning, sessions
from cluster.channels import subscribe_forever
from cluster.leases import Lease, LeaseStore, partition
from proxy.settings import ClusterSettings

log = logging.getLogger("sluiceway.cluster")

PUBLISH_EVERY_S = 0.25  # observations go out in batches this often
PERSIST_EVERY_S = 5.0  # and the learned state is stored this often
MAX_BATCH = 4096  # observations kept while Redis cannot take them
# Redis lost: how long the counts it sent last may still be on their way (a subscription
# to a Redis that died ends at once; one cut off in silence does not)
SETTLE_S = 1.0


class Mode(StrEnum):
    SHARED = "shared"
    PARTITIONED = "partitioned"
    RECOVERING = "recovering"


Session = tuple[str, int]  # (backend, chars of the session's last request)


class Cluster:
    def __init__(self, settings: ClusterSettings, pool: Pool) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id or f"{socket.gethostname()}:{os.getpid()}"
        self._redis = Redis.from_url(settings.redis_url, socket_timeout=1.0,
                                     socket_connect_timeout=1.0)
        self._store = LeaseStore(self._redis, self.replica_id, settings.lease_ttl_s,
                                 settings.prefix)
        self._pool = pool
        self.mode = Mode.SHARED
        self.detail = ""
        self.partitions_total = 0  # times this replica fell back to its shares
        self._since = 0.0  # when recovery began
        self._batch: list[tuple[str, RequestResult]] = []
        self._joins: dict[str, asyncio.Task[None]] = {}  # tickets on their way to queues
        # when Redis was lost: the other replicas' count on each backend, and until when
        # their requests from before may still run
        self._others_then: dict[str, tuple[int, float]] = {}
        self._listening = False  # subscribed to the channels now
        self._settling = False  # Redis lost: its last counts not yet all handled
        self._settle_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def interval_s(self) -> float:
        return min(0.5, self.settings.lease_ttl_s / 3)

    @property
    def replicas(self) -> list[str]:
        """The live replicas as last seen (this one included)."""
        return sorted(set(self._store.replicas) | {self.replica_id})

    @property
    def learned_channel(self) -> str:
        return f"{self.settings.prefix}:learned"

    @property
    def drains_channel(self) -> str:
        return f"{self.settings.prefix}:drains"

    @property
    def _drained_key(self) -> str:
        return f"{self.settings.prefix}:drained"

    # --- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        """Join: heartbeat, counts and the stored learning (warm start), then the loops."""
        try:
            await self._restore()
            for name in await self._redis.hkeys(self._drained_key):
                self._drain_here(name.decode() if isinstance(name, bytes) else str(name), True)
            self._reachable(await self._store.renew(self._capped()))
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
        handlers = {self._store.channel: self._on_count,
                    self.learned_channel: self._on_learned,
                    self.drains_channel: self._on_drain}
        self._tasks += [
            asyncio.create_task(self._refresh_forever(), name="cluster-refresh"),
            asyncio.create_task(subscribe_forever(self._redis, handlers,
                                                  listening=self._on_listening),
                                name="cluster-listen"),
            asyncio.create_task(self._share_forever(), name="cluster-share"),
        ]
        log.info("cluster: replica %s on %s (%s, %d live replicas)", self.replica_id,
                 _safe_url(self.settings.redis_url), self.mode, len(self.replicas))

    async def close(self) -> None:
        """Stop the loops and hand back every lease and the heartbeat at once (SIGTERM:
        the drain has ended every request; the others need not wait for a TTL)."""
        self._settled()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
        try:
            async with asyncio.timeout(2.0):
                await self._flush()
                await self._store.release_all()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("cluster: could not hand back the leases (%s): they expire in %g s",
                        exc, self.settings.lease_ttl_s)
        await self._redis.aclose()

    # --- capacity ------------------------------------------------------------------------

    def ticket(self) -> str:
        """A request's place in the backends' queues, for all its tries (see `take`)."""
        return self._store.new_ticket()

    async def take(self, name: str, session: tuple[str, str, int] | None = None,
                   ticket: str | None = None) -> tuple[bool, Lease | None, Session | None]:
        """A lease for a request that holds a local slot on `name`: (False, None, ...) when
        the backend is full across the replicas, or its free slots are promised to
        requests that found it full earlier (the slot must go back, and the request wait;
        with a `ticket` it keeps its own place in that queue until `leave`); (True, None,
        ...) for a backend without a known capacity. `session` = (affinity key, backend,
        chars) is recorded with the grant; what the shared table held for that key before
        comes back (None: nothing known)."""
        state = self._pool[name]
        if self.mode is not Mode.SHARED:
            return *self._take_locally(state), None
        limit = state.capacity
        stored = None if session is None else (
            sessions.session_key(self.settings.prefix, session[0]),
            sessions.encode(session[1], session[2]), self.settings.session_ttl_s)
        if limit is None:  # no capacity known: nothing to count, only the session
            return True, None, await self._swap_session(stored) if stored else None
        joining = self._joins.get(ticket) if ticket is not None else None
        if joining is not None:
            # its place lands in the queues before it asks: a grant then takes the ticket out.
            # A join landing after the grant left the ticket at the head of the queue, where
            # it held the backend's free slot from every replica until it expired (a TTL).
            await asyncio.wait([joining])
        try:
            lease, count, before = await self._acquire(name, limit, stored, ticket)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return *self._take_locally(state), None
        self._view(name, count)
        return lease is not None, lease, sessions.decode(before)

    def give(self, lease: Lease | None) -> None:
        """The request holding `lease` ended (its local slot is free already)."""
        if lease is None:
            return
        if self.mode is Mode.PARTITIONED:
            self._store.forget(lease)  # it expires in Redis, or was never written there
        else:
            self._spawn(self._release(lease))

    def _take_locally(self, state: BackendState) -> tuple[bool, Lease | None]:
        if state.capacity is None:
            return True, None
        share = state.admission_capacity
        if share is not None and state.in_flight > share:
            return False, None
        return True, self._store.adopt(state.name)

    def join(self, ticket: str, backends: list[str]) -> None:
        """The request behind `ticket` waits for one of `backends`, found full here: it
        takes its place in their queues now (not when it first asks Redis)."""
        if self.mode is Mode.SHARED and backends and ticket not in self._joins:
            self._joins[ticket] = self._spawn(self._join(backends, ticket))

    async def _join(self, backends: list[str], ticket: str) -> None:
        try:
            await self._store.join(backends, ticket)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)

    def leave(self, ticket: str) -> None:
        """The request behind `ticket` is served (or gone): out of every queue it is in,
        once a join still on its way has landed (or the ticket would outlive it)."""
        joining = self._joins.pop(ticket, None)
        if joining is not None or self._store.queued(ticket):
            self._spawn(self._leave(ticket, joining))

    async def _leave(self, ticket: str, joining: asyncio.Task[None] | None) -> None:
        if joining is not None:
            await asyncio.wait([joining])
        try:
            for backend in self._store.queued(ticket):
                await self._store.leave(backend, ticket)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)

    async def _acquire(self, name: str, limit: int, session: tuple[str, str, float] | None,
                       ticket: str | None) -> tuple[Lease | None, int, bytes | None]:
        """The Redis call, shielded: a request cancelled meanwhile (the client left) must
        not leave a granted lease behind."""
        task = asyncio.ensure_future(self._store.acquire_for(name, limit, session, ticket))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._drop_orphan)
            raise

    def _drop_orphan(self, task: asyncio.Future[tuple[Lease | None, int, bytes | None]]
                     ) -> None:
        if not task.cancelled() and task.exception() is None:
            lease = task.result()[0]
            if lease is not None:
                self._spawn(self._release(lease))

    async def _release(self, lease: Lease) -> None:
        try:
            self._view(lease.backend, await self._store.release(lease))
        except (RedisError, OSError) as exc:
            self._unreachable(exc)

    def _view(self, name: str, count: int) -> None:
        """A global count from Redis: the other replicas' part is what this one does not
        hold."""
        if self.mode is Mode.SHARED and name in self._pool:
            self._pool.set_remote(name, max(0, count - self._store.held(name)))

    def _on_count(self, data: bytes) -> None:
        LeaseStore.parse(data, self._last_count if self._settling else self._view)

    def _last_count(self, name: str, count: int) -> None:
        """A count the lost Redis had sent before it went: the others' part is what they
        hold at the loss (an upper bound: this replica's own releases that never reached
        Redis are counted as theirs)."""
        state = self._pool.get(name)
        if state is None:
            return
        _, until = self._others_then.get(name, (0, 0.0))
        if not until:
            until = self._drain_until(state, asyncio.get_running_loop().time())
        self._others_then[name] = (max(0, count - self._store.held(name)), until)

    def _on_listening(self, listening: bool) -> None:
        self._listening = listening
        if not listening:
            self._settled()  # every count the subscription will ever bring is handled

    def _settled(self) -> None:
        """The last counts are in (or `SETTLE_S` passed): the shares apply."""
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        if self._settling:
            self._settling = False
            if self.mode is not Mode.SHARED:
                self._set_shares()

    def _capped(self) -> list[str]:
        return [s.name for s in self._pool if s.capacity is not None]

    # --- modes ---------------------------------------------------------------------------

    async def _refresh_forever(self) -> None:
        """Renew leases and heartbeat, and re-read every count, every `interval_s`: what
        corrects a view that missed a message, and how this replica notices Redis come
        and go."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self._reachable(await self._store.renew(self._capped()))
            except (RedisError, OSError) as exc:
                self._unreachable(exc)

    def _reachable(self, counts: dict[str, int]) -> None:
        now = asyncio.get_running_loop().time()
        if self.mode is Mode.PARTITIONED:
            self.mode, self._since = Mode.RECOVERING, now
            self._store.rewrite()  # what Redis lost with its outage, written at once
            log.warning("cluster: Redis is back; shared leases again in %g s",
                        self.settings.lease_ttl_s)
        elif self.mode is Mode.RECOVERING and now - self._since >= self.settings.lease_ttl_s:
            self._settled()
            self.mode, self.detail = Mode.SHARED, ""
            log.warning("cluster: shared leases again (%d live replicas)", len(self.replicas))
        if self.mode is Mode.SHARED:
            for name, count in counts.items():
                self._view(name, count)
            for state in list(self._pool):
                self._pool.set_share(state.name, None)
        else:
            self._set_shares()

    def _unreachable(self, exc: BaseException) -> None:
        if self.mode is Mode.PARTITIONED:
            self._set_shares()  # capacities may have been discovered meanwhile
            return
        self.mode = Mode.PARTITIONED
        self.partitions_total += 1
        self.detail = f"Redis unreachable: {exc or type(exc).__name__}"
        # the pool's other connections died with this one (a restarted Redis): drop them
        # now, or each would fail once more after Redis is back
        self._spawn(self._reconnect())
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._others_then = {s.name: (s.remote_in_flight, self._drain_until(s, now))
                             for s in self._pool if s.remote_in_flight}
        if self._listening:  # what the subscription still holds is newer than that view
            self._settling = True
            self._settle_timer = loop.call_later(SETTLE_S, self._settled)
        self._set_shares()
        for state in list(self._pool):
            self._pool.set_remote(state.name, 0)
        log.warning("cluster: %s; each backend limited to this replica's share of its "
                    "capacity (%d live replicas as last seen)", self.detail,
                    len(self.replicas))

    async def _reconnect(self) -> None:
        # idle ones only: the subscription's connection is in use, and cutting it would
        # drop the counts it still holds unread (the last grants, which settling waits for)
        await self._redis.connection_pool.disconnect(inuse_connections=False)

    def _set_shares(self) -> None:
        """Each backend's share for this replica. Right after Redis is lost, the others
        may still run more than their shares (admitted by leases before): until those
        requests have ended, this replica also keeps within what they left free
        (capacity less their count as last seen), so the sum never passes the capacity.
        While settling (the last counts not yet in), no share admits anything."""
        live = self.replicas
        now = asyncio.get_running_loop().time()
        for state in list(self._pool):
            capacity = state.capacity
            share = None if capacity is None else partition(
                capacity, live, self.replica_id, self.settings.min_replicas)
            others, until = self._others_then.get(state.name, (0, 0.0))
            if share is not None and capacity is not None and now < until:
                share = min(share, max(0, capacity - others))
            if share is not None and self._settling:
                share = 0
            self._pool.set_share(state.name, share)

    def _drain_until(self, state: BackendState, now: float) -> float:
        """When the requests the others ran on `state` at the loss of Redis are assumed
        to have ended."""
        return now + self._drain_bound_s(state)

    def _drain_bound_s(self, state: BackendState) -> float:
        """How long requests admitted before the loss of Redis are assumed to run: three
        times the backend's typical request (its learned TTFT and decode of its typical
        reply), at least one lease TTL, at most two minutes; 30 s while unmeasured."""
        stats = state.stats
        ttft, rate, tokens = (stats.ttft_s.value, stats.decode_tok_s.value,
                              stats.output_tokens.value)
        if ttft is None or not rate or tokens is None:
            return max(self.settings.lease_ttl_s, 30.0)
        typical = ttft + tokens / rate
        return min(120.0, max(self.settings.lease_ttl_s, 3 * typical))

    # --- sessions ------------------------------------------------------------------------

    async def _swap_session(self, stored: tuple[str, str, float]) -> Session | None:
        """Record where a session went (a backend without leases); what was there before."""
        key, value, ttl_s = stored
        try:
            before = await self._redis.set(key, value, ex=max(1, int(ttl_s)), get=True)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return None
        return sessions.decode(before if isinstance(before, bytes | str) else None)

    # --- drains --------------------------------------------------------------------------

    async def drain(self, name: str, draining: bool) -> bool:
        """An operator drained (or undrained) `name` here: every replica does the same, now
        and when it starts later. False when Redis cannot be reached (this replica only)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if draining:
                    pipe.hset(self._drained_key, name, self.replica_id)
                else:
                    pipe.hdel(self._drained_key, name)
                pipe.publish(self.drains_channel, f"{int(draining)} {name}")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return False
        return True

    def _on_drain(self, data: bytes) -> None:
        flag, _, name = data.decode(errors="replace").partition(" ")
        if flag in ("0", "1"):
            self._drain_here(name, flag == "1")

    def _drain_here(self, name: str, draining: bool) -> None:
        state = self._pool.get(name)
        if state is not None and not state.removing and state.draining != draining:
            self._pool.set_draining(name, draining)
            log.info("cluster: backend %s %s by another replica", name,
                     "drained" if draining else "back in rotation")

    # --- learning ------------------------------------------------------------------------

    def observe(self, name: str, result: RequestResult) -> None:
        """What one of this replica's requests taught: the others learn it too."""
        if learning.teaches(result) and len(self._batch) < MAX_BATCH:
            self._batch.append((name, result))

    def _on_learned(self, data: bytes) -> None:
        for name, result in learning.decode_batch(data, self.replica_id):
            self._pool.learn(name, result)

    async def _share_forever(self) -> None:
        loop = asyncio.get_running_loop()
        persisted = loop.time()
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            if self.mode is not Mode.SHARED:
                continue
            try:
                await self._flush()
                if loop.time() - persisted >= PERSIST_EVERY_S:
                    persisted = loop.time()
                    await self._persist()
            except (RedisError, OSError) as exc:
                self._unreachable(exc)

    async def _flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            await self._redis.publish(self.learned_channel,
                                      learning.encode_batch(self.replica_id, batch))

    async def _persist(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for state in list(self._pool):
                if state.stats.curve.samples:
                    pipe.set(learning.stats_key(self.settings.prefix, state.name),
                             learning.encode_state(state), ex=learning.STATE_TTL_S)
            await pipe.execute()

    async def _restore(self) -> None:
        """Start warm: what the replicas learned about each backend, where this replica
        has not measured it itself."""
        states = [s for s in self._pool if not s.stats.curve.samples]
        if not states:
            return
        stored = await self._redis.mget([learning.stats_key(self.settings.prefix, s.name)
                                         for s in states])
        loaded = [s.name for s, data in zip(states, stored, strict=True)
                  if data is not None and learning.load_state(s, data)]
        if loaded:
            self._pool.invalidate()
            log.info("cluster: started warm: learned state of %s", ", ".join(loaded))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background; `close` waits for what is still running."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _safe_url(url: str) -> str:
    """The Redis URL without its password, for the logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
