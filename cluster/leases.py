"""Global in-flight slots on Redis: leases that every sluiceway replica shares.

A backend's in-flight requests, summed over all replicas, are the members of one sorted
set (`{prefix}:leases:{backend}`), each a lease id scored by its expiry in milliseconds on
Redis's own clock (`TIME`: replicas' clocks never matter). Acquiring is one Lua script,
run atomically by Redis: drop the expired members, and add one only while fewer than the
limit remain. So the sum over replicas never exceeds the limit, whatever the replicas
do at the same moment. Acquiring and releasing publish the backend's new count on
`{prefix}:in_flight`: every replica's view of the backend's load follows, and a replica
with requests waiting for that backend can try again at once instead of polling. A
replica renews its own leases every `ttl / 3`; one that dies (SIGKILL, a lost host) stops
renewing and its leases expire within `ttl`.

A request that finds a backend full waits in that backend's queue in Redis
(`{prefix}:queue:{backend}`, tickets scored by when they joined, with expiries renewed
like leases): the acquire script grants a slot only while the free slots outnumber the
tickets ahead, so the replicas serve a full backend first come, first served.

Replicas also keep a heartbeat (`{prefix}:replicas`, ids scored by expiry), so each knows
how many are alive and its own rank among them: `partition` turns that into this
replica's share of a backend's capacity for when Redis cannot be reached (the shares of
all replicas sum to the capacity, so the fallback never over-admits either).

This module owns no policy and no HTTP: it is the store. The proxy's admission decides
what to acquire and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cluster.channels import subscribe_forever

# KEYS[1] the backend's lease set, KEYS[2] the channel, KEYS[3] its queue (tickets scored
# by when they joined), KEYS[4] the tickets' expiries, KEYS[5] (optional) a session key;
# ARGV: lease id, limit, ttl in ms, the backend's name, the request's ticket, '1' to join
# the queue when refused, (with KEYS[5]) the session's new value and its ttl in s.
# Granted only while the slots left outnumber the tickets ahead of this request's (all of
# them for a request without one): the replicas' requests are served in the order they
# first found the backend full, whichever replica frees a slot. A replica's own tickets
# are its places in that order, shared by its waiters: what is ahead is counted up to its
# first ticket, so its local queue (which only asks with its head) can never be blocked
# by one of its own tickets ahead of the head's (two joins in one millisecond rank by
# name, "r0:t10" before "r0:t9": the slot stayed free 4.4 s with 23 requests waiting).
# Returns {1 if granted else 0, the count the policy should see (held, plus the queue when
# refused), the session's value before (absent when none)}. A grant publishes the new
# count and records where the session went, in the same atomic step.
_ACQUIRE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ms)
if #gone > 0 then
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('ZREM', KEYS[4], unpack(gone))
end
local before = false
if KEYS[5] then before = redis.call('GET', KEYS[5]) end
local held = redis.call('ZCARD', KEYS[1])
local rank = redis.call('ZRANK', KEYS[3], ARGV[5])
local ahead = rank or redis.call('ZCARD', KEYS[3])
local mine = string.match(ARGV[5], '^(.*:)t%d+$')
if rank and rank > 0 and mine then
  for i, other in ipairs(redis.call('ZRANGE', KEYS[3], 0, rank - 1)) do
    if string.sub(other, 1, #mine) == mine then
      ahead = i - 1
      break
    end
  end
end
if held + ahead < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ms + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  if rank then
    redis.call('ZREM', KEYS[3], ARGV[5])
    redis.call('ZREM', KEYS[4], ARGV[5])
  end
  redis.call('PUBLISH', KEYS[2], ARGV[4] .. ' ' .. (held + 1))
  if KEYS[5] then
    redis.call('SET', KEYS[5], ARGV[7], 'EX', tonumber(ARGV[8]))
  end
  return {1, held + 1, before}
end
if not rank and ARGV[6] == '1' then
  redis.call('ZADD', KEYS[3], ms, ARGV[5])
  redis.call('ZADD', KEYS[4], ms + ttl, ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ttl * 2)
  redis.call('PEXPIRE', KEYS[4], ttl * 2)
end
return {0, held + redis.call('ZCARD', KEYS[3]), before}
"""

# KEYS[1] the lease set, KEYS[2] the channel; ARGV[1] the backend's name, ARGV[2..] ids.
# Returns the set's size after.
_RELEASE = """
local removed = redis.call('ZREM', KEYS[1], unpack(ARGV, 2))
local held = redis.call('ZCARD', KEYS[1])
if removed > 0 then
  redis.call('PUBLISH', KEYS[2], ARGV[1] .. ' ' .. held)
end
return held
"""

# KEYS: per backend its lease set and its tickets' expiries, then the replicas set;
# ARGV[1] ttl in ms, ARGV[2] replica id, then per backend: a count and the lease ids to
# renew (only while they exist: a lease released meanwhile must not come back), a count
# and the lease ids to write (taken while Redis was unreachable, or lost with it: requests
# really in flight), a count and the tickets to renew (only while they exist). Pushes
# their expiry and this replica's heartbeat. Returns {live replicas, the unexpired lease
# count of every backend}.
_RENEW = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[1])
local at = 3
local counts = {}
for i = 1, (#KEYS - 1) / 2 do
  local leases, expiries = KEYS[2 * i - 1], KEYS[2 * i]
  for pass = 1, 3 do
    local n = tonumber(ARGV[at])
    for j = 1, n do
      if pass == 1 then
        redis.call('ZADD', leases, 'XX', ms + ttl, ARGV[at + j])
      elseif pass == 2 then
        redis.call('ZADD', leases, ms + ttl, ARGV[at + j])
      else
        redis.call('ZADD', expiries, 'XX', ms + ttl, ARGV[at + j])
      end
    end
    if n > 0 then redis.call('PEXPIRE', pass == 3 and expiries or leases, ttl * 2) end
    at = at + n + 1
  end
  counts[i] = redis.call('ZCOUNT', leases, '(' .. ms, '+inf')
end
local replicas = KEYS[#KEYS]
redis.call('ZREMRANGEBYSCORE', replicas, '-inf', ms)
redis.call('ZADD', replicas, ms + ttl, ARGV[2])
return {redis.call('ZRANGE', replicas, 0, -1), counts}
"""

Listener = Callable[[str, int], None]


@dataclass(frozen=True, slots=True)
class Lease:
    backend: str
    lease_id: str


@dataclass(slots=True)
class _Held:
    ids: set[str] = field(default_factory=set)
    unwritten: set[str] = field(default_factory=set)  # not (or no longer) in Redis
    tickets: set[str] = field(default_factory=set)  # this replica's requests in the queue


def partition(capacity: int, replicas: list[str], me: str, at_least: int = 1) -> int:
    """This replica's share of `capacity` when the replicas cannot coordinate: an even
    split by rank in the sorted replica ids, the remainder to the first ones, so the
    shares sum to exactly `capacity` (a replica may get 0 where there are more replicas
    than slots). With fewer replicas known than `at_least` (one that started while Redis
    was down knows only itself), ranks are unknown: floor(capacity / at_least) each."""
    live = sorted(set(replicas) | {me})
    if len(live) < at_least:
        return capacity // at_least
    rank = live.index(me)
    base, extra = divmod(capacity, len(live))
    return base + (1 if rank < extra else 0)


class LeaseStore:
    """One replica's leases, held in Redis (see the module docstring)."""

    def __init__(self, client: Redis, replica_id: str, ttl_s: float = 3.0,
                 prefix: str = "sluiceway") -> None:
        self._redis = client
        self.replica_id = replica_id
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix
        self._serial = itertools.count()
        self._held: dict[str, _Held] = {}
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self.replicas: list[str] = [replica_id]  # as of the last heartbeat

    @property
    def channel(self) -> str:
        return f"{self._prefix}:in_flight"

    def _key(self, backend: str) -> str:
        return f"{self._prefix}:leases:{backend}"

    def _queue_keys(self, backend: str) -> list[str]:
        return [f"{self._prefix}:queue:{backend}", f"{self._prefix}:queue-expiry:{backend}"]

    def new_ticket(self) -> str:
        """An id for a request's place in the queues (the same for all its tries). The
        acquire script reads the replica from this form (`<replica id>:t<n>`): keep them
        in step."""
        return f"{self.replica_id}:t{next(self._serial)}"

    def held(self, backend: str) -> int:
        """Leases this replica holds on `backend` now."""
        entry = self._held.get(backend)
        return len(entry.ids) if entry else 0

    async def acquire(self, backend: str, limit: int) -> tuple[Lease | None, int]:
        """A lease on one of `backend`'s `limit` slots, or None when all are taken (or
        promised to requests queued before); and the backend's global count after. Raises
        RedisError (or OSError) when Redis fails."""
        lease, count, _ = await self.acquire_for(backend, limit)
        return lease, count

    async def acquire_for(self, backend: str, limit: int,
                          session: tuple[str, str, float] | None = None,
                          ticket: str | None = None) -> tuple[Lease | None, int, bytes | None]:
        """`acquire`, for a request: with a `ticket` (`new_ticket`) a refusal puts it in
        the backend's queue, where it keeps its place until granted or `leave`; with
        `session` = (key, value, ttl_s) a grant also sets that key, and the key's value
        before comes back (None: unset)."""
        lease_id = self._new_id()
        keys = [self._key(backend), self.channel, *self._queue_keys(backend)]
        args: list[str | int] = [lease_id, limit, self._ttl_ms, backend,
                                 ticket or lease_id, "1" if ticket else "0"]
        if session is not None:
            key, value, ttl_s = session
            keys.append(key)
            args += [value, max(1, int(ttl_s))]
        granted, count, *rest = await self._acquire(keys=keys, args=args)
        before = rest[0] if rest and isinstance(rest[0], bytes) else None
        entry = self._held.setdefault(backend, _Held())
        if not granted:
            if ticket:
                entry.tickets.add(ticket)
            return None, int(count), before
        if ticket:
            entry.tickets.discard(ticket)
        return self._hold(backend, lease_id), int(count), before

    async def join(self, backends: list[str], ticket: str) -> None:
        """Put `ticket` in the queues of `backends` (found full before asking Redis: the
        request keeps the place of the moment it started to wait); a place held already
        is kept."""
        fresh = [b for b in backends if ticket not in self._held.get(b, _Held()).tickets]
        if not fresh:
            return
        for backend in fresh:  # known here first: a `leave` meanwhile finds them
            self._held.setdefault(backend, _Held()).tickets.add(ticket)
        now_s, now_us = await self._redis.time()
        ms = now_s * 1000 + now_us // 1000
        async with self._redis.pipeline(transaction=False) as pipe:
            for backend in fresh:
                queue, expiries = self._queue_keys(backend)
                pipe.zadd(queue, {ticket: ms}, nx=True)
                pipe.zadd(expiries, {ticket: ms + self._ttl_ms}, nx=True)
                pipe.pexpire(queue, self._ttl_ms * 2)
                pipe.pexpire(expiries, self._ttl_ms * 2)
            await pipe.execute()

    async def leave(self, backend: str, ticket: str) -> None:
        """The request behind `ticket` no longer waits for `backend` (served elsewhere,
        or gone)."""
        entry = self._held.get(backend)
        if entry is None or ticket not in entry.tickets:
            return
        entry.tickets.discard(ticket)
        queue, expiries = self._queue_keys(backend)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(queue, ticket)
            pipe.zrem(expiries, ticket)
            await pipe.execute()

    def queued(self, ticket: str) -> list[str]:
        """The backends whose queue holds `ticket`."""
        return [backend for backend, entry in self._held.items() if ticket in entry.tickets]

    def adopt(self, backend: str) -> Lease:
        """A lease held here without asking Redis: while Redis cannot be reached, for a
        request admitted within this replica's share. The next renewal that reaches Redis
        writes it there, so the other replicas count it once Redis is back."""
        lease = self._hold(backend, self._new_id())
        self._held[backend].unwritten.add(lease.lease_id)
        return lease

    def rewrite(self) -> None:
        """Redis is back after an outage: it may have lost (or expired) the leases held
        here; the next renewal writes them all again."""
        for entry in self._held.values():
            entry.unwritten |= entry.ids

    def _new_id(self) -> str:
        return f"{self.replica_id}:{next(self._serial)}"

    def _hold(self, backend: str, lease_id: str) -> Lease:
        self._held.setdefault(backend, _Held()).ids.add(lease_id)
        return Lease(backend, lease_id)

    def forget(self, lease: Lease) -> None:
        """Stop holding (and renewing) a lease without telling Redis: it expires there."""
        entry = self._held.get(lease.backend)
        if entry is not None:
            entry.ids.discard(lease.lease_id)
            entry.unwritten.discard(lease.lease_id)

    async def release(self, lease: Lease) -> int:
        """Give the slot back (and wake the replicas waiting for it); the backend's global
        count after. The lease is forgotten here even when Redis fails: it then expires."""
        self.forget(lease)
        count = await self._release(keys=[self._key(lease.backend), self.channel],
                                    args=[lease.backend, lease.lease_id])
        return int(count)

    async def release_all(self) -> None:
        """Every lease this replica holds, at once (shutdown)."""
        for backend, entry in list(self._held.items()):
            ids, entry.ids, entry.unwritten = list(entry.ids), set(), set()
            for ticket in list(entry.tickets):
                await self.leave(backend, ticket)
            if ids:
                await self._release(keys=[self._key(backend), self.channel],
                                    args=[backend, *ids])
        await self._redis.zrem(f"{self._prefix}:replicas", self.replica_id)

    async def renew(self, backends: Iterable[str] = ()) -> dict[str, int]:
        """Push back the expiry of every lease and ticket held here (writing the leases
        Redis lacks), and this replica's heartbeat (`replicas` is then the live replicas'
        ids); return the global in-flight count of every backend held here or named in
        `backends`."""
        names = list(dict.fromkeys([*self._held, *backends]))
        keys, args = [], [str(self._ttl_ms), self.replica_id]
        writing: list[tuple[_Held, list[str]]] = []
        for backend in names:
            entry = self._held.get(backend) or _Held()
            fresh = sorted(entry.unwritten & entry.ids)
            known = sorted(entry.ids - entry.unwritten)
            tickets = sorted(entry.tickets)
            keys += [self._key(backend), self._queue_keys(backend)[1]]
            args += [str(len(known)), *known, str(len(fresh)), *fresh,
                     str(len(tickets)), *tickets]
            writing.append((entry, fresh))
        keys.append(f"{self._prefix}:replicas")
        live, counts = await self._renew(keys=keys, args=args)
        for entry, fresh in writing:
            entry.unwritten.difference_update(fresh)
        self.replicas = sorted(x.decode() if isinstance(x, bytes) else str(x) for x in live)
        return {name: int(n) for name, n in zip(names, counts, strict=True)}

    async def count(self, backend: str) -> int:
        """The backend's global in-flight count (expired leases not counted)."""
        now_s, now_us = await self._redis.time()
        ms = now_s * 1000 + now_us // 1000
        return int(await self._redis.zcount(self._key(backend), f"({ms}", "+inf"))

    async def renew_forever(self, on_error: Callable[[RedisError | OSError], None]) -> None:
        """Renew every ttl / 3 until cancelled; report failures and keep trying."""
        while True:
            try:
                await self.renew()
            except (RedisError, OSError) as exc:
                on_error(exc)
            await asyncio.sleep(self._ttl_ms / 3000)

    async def listen(self, listener: Listener) -> None:
        """Call `listener(backend, count)` for every count any replica publishes, until
        cancelled (resubscribing after a failure)."""
        await subscribe_forever(self._redis, {self.channel: lambda data: self.parse(
            data, listener)})

    @staticmethod
    def parse(data: bytes, listener: Listener) -> None:
        """Hand one published `backend count` to `listener`; ignore anything else."""
        backend, _, count = data.decode(errors="replace").rpartition(" ")
        with contextlib.suppress(ValueError):
            listener(backend, int(count))
