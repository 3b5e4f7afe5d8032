"""Admission: pick a backend now, or wait in a bounded FIFO queue until one has room.

Invariant: after every change to the pool (a release, a health or capacity change) the
queue is scanned in arrival order and every waiter that fits is admitted. So whatever is
still queued does not fit the current pool, and a newcomer that fits may go ahead of it
without breaking first-come-first-served for the backends the waiters need. The policy is
told how many wait besides the request it decides (`waiting`): a backend held back from a
short queue (a slow member of a shared device, policies/devices.py) may be worth using for
a long one, and then the queue is asked again, oldest first.

The choice and the in-flight increment happen in one synchronous step on the event loop,
so two requests can never both take a backend's last slot.

With several replicas (cluster/replica.py), the slot taken here is then backed by a lease
in Redis; when the other replicas took the backend's last slots meanwhile, the slot goes
back and the request waits again, at the head of this replica's queue, holding a ticket
in the backend's queue in Redis: a freed slot goes to the request that found the backend
full first, whichever replica it is on (FIFO across the replicas, from the moment each
request first met a full backend).
A session's backend is written with the lease, and the same atomic step returns where the
session went before: when that is news to this replica (another one moved it), the slot
goes back and the request is routed once more, knowing it. So a conversation keeps its
backend whichever replica it reaches, at no extra round trip while it stays put.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from backends.pool import Pool
from backends.stats import RequestResult
from cluster.leases import Lease
from cluster.replica import Cluster
from policies import NoBackend, Policy, Route, RouteRequest, Wait
from policies.sessions import KeepsSessions, Sessions
from proxy.errors import no_capacity

RETRY_AFTER_S = 2  # what a refused client is told; well under the SDKs' 60-120 s ceilings

_Taken = tuple[str, float]  # a local slot: the backend, and what it added to its backlog


@dataclass(frozen=True, slots=True)
class Slot:
    """A request's place on a backend: its local slot, with several replicas its lease
    (None: one process, or a backend without a known capacity), and what it added to the
    backend's prefill backlog (Pool.acquire)."""

    backend: str
    lease: Lease | None = None
    backlog: float = 0.0


@dataclass(slots=True)
class _Waiter:
    request: RouteRequest
    future: asyncio.Future[_Taken] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Admission:
    def __init__(self, pool: Pool, policy: Policy, queue_size: int, timeout_s: float,
                 cluster: Cluster | None = None) -> None:
        self._pool = pool
        self._policy = policy
        self._queue_size = queue_size
        self._timeout_s = timeout_s
        self._cluster = cluster
        self._sessions = _sessions(policy)
        self._waiters: deque[_Waiter] = deque()
        self._held = False  # the last decisions held a waiter back from a backend with room
        pool.subscribe(self._dispatch)

    def configure(self, policy: Policy, queue_size: int, timeout_s: float) -> None:
        """Settings for decisions from now on (a reload); waiters keep their deadlines."""
        self._policy, self._queue_size, self._timeout_s = policy, queue_size, timeout_s
        self._sessions = _sessions(policy)
        self._dispatch()

    @property
    def depth(self) -> int:
        return len(self._waiters)

    @property
    def policy_name(self) -> str:
        return self._policy.name

    async def admit(self, request: RouteRequest) -> Slot:
        """A slot now held for this request on the backend the policy chose."""
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        cluster, table = self._cluster, self._sessions
        if cluster is None:
            name, backlog = await self._reserve(request, deadline)
            return Slot(name, None, backlog)
        key = request.affinity_key if table is not None else None
        ticket = cluster.ticket()  # its place in the queues of backends found full
        ahead = asked = False
        try:
            while True:
                known = table.get(key) if table is not None and key is not None else None
                name, backlog = await self._reserve(
                    request, deadline, ahead, lambda: cluster.join(ticket, self._full(request)))
                try:
                    granted, lease, shared = await cluster.take(
                        name, None if key is None else (key, name, request.prompt_chars),
                        ticket)
                except BaseException:
                    self._pool.release(name, None, backlog)
                    raise
                # chosen without knowing where the session went last (another replica sent
                # it elsewhere): choose once more, knowing it
                uninformed = (shared is not None and shared[0] != name and not asked
                              and (known is None or known[0] != shared[0]))
                if granted and not uninformed:
                    return Slot(name, lease, backlog)
                if uninformed and table is not None and key is not None and shared is not None:
                    table.put(key, *shared)
                    asked = True
                self._pool.release(name, None, backlog)
                cluster.give(lease)  # the lease taken for the uninformed choice, if any
                ahead = not granted  # full, or not its turn: wait for a change, at the head
        finally:
            cluster.leave(ticket)

    async def hold(self, name: str) -> Slot | None:
        """Take a slot on `name` itself, outside the policy (calibration); None when it
        is full."""
        state = self._pool[name]
        capacity = state.admission_capacity
        if capacity is not None and state.total_in_flight >= capacity:
            return None
        self._pool.acquire(name)
        if self._cluster is None:
            return Slot(name)
        granted, lease, _ = await self._cluster.take(name)
        if granted:
            return Slot(name, lease)
        self._pool.release(name, None)
        return None

    def release(self, slot: Slot, result: RequestResult, backlog: float = 0.0) -> None:
        """The request ended: its slot (and lease) back, what it still held of the
        backend's prefill backlog dropped, what it taught learned (here and, through the
        cluster, by every replica)."""
        self._pool.release(slot.backend, result, backlog)
        if self._cluster is not None:
            self._cluster.give(slot.lease)
            self._cluster.observe(slot.backend, result)

    def _full(self, request: RouteRequest) -> list[str]:
        """The backends the request could go to but for their room."""
        return [b.name for b in self._pool.snapshot().backends
                if b.serves(request.model) and b.name not in request.exclude
                and b.routable and not b.has_room]

    def _take(self, request: RouteRequest, route: Route) -> _Taken:
        """The slot the policy chose, taken in the same step as the choice."""
        chars = request.prompt_chars if route.prefill_chars is None else route.prefill_chars
        return route.backend, self._pool.acquire(route.backend, chars)

    async def _reserve(self, request: RouteRequest, deadline: float, ahead: bool = False,
                       on_wait: Callable[[], None] | None = None) -> _Taken:
        """A local slot: now, or after waiting in the queue (at its head with `ahead`);
        `on_wait` is called when it starts to wait."""
        # While the policy holds waiters back from a backend with room, a newcomer joins the
        # queue before anything is decided: the longer queue may be worth that backend now,
        # and then it goes to the oldest waiter first.
        queue_first = self._held and 0 < len(self._waiters) < self._queue_size
        if not ahead and not queue_first:
            asked = replace(request, waiting=len(self._waiters)) if self._waiters else request
            decision = self._policy.choose(asked, self._pool.snapshot())
            if isinstance(decision, Route):
                return self._take(request, decision)
            if isinstance(decision, NoBackend):
                raise no_capacity(decision.reason, RETRY_AFTER_S)
            self._held = self._held or decision.hold
        if len(self._waiters) >= self._queue_size and not ahead:
            raise no_capacity("the admission queue is full", RETRY_AFTER_S)
        waiter = _Waiter(request)
        if ahead:
            self._waiters.appendleft(waiter)
            self._dispatch()  # the backend may have room again already
        else:
            self._waiters.append(waiter)
            if on_wait is not None:
                on_wait()
            if self._held:
                self._dispatch()
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter.future
        except TimeoutError:
            self._forget(waiter)
            raise no_capacity(
                f"waited {self._timeout_s:g} s for a free backend", RETRY_AFTER_S
            ) from None
        except asyncio.CancelledError:
            self._forget(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up; hand back a slot granted to it meanwhile."""
        if waiter.future.done() and not waiter.future.cancelled():
            if waiter.future.exception() is None:
                name, backlog = waiter.future.result()
                self._pool.release(name, None, backlog)
            return
        waiter.future.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _dispatch(self) -> None:
        """Admit, in arrival order, every waiter that fits the pool as it is now."""
        if not self._waiters:
            self._held = False
            return
        held = False
        still_waiting: deque[_Waiter] = deque()
        # Admitting only removes room, so once a (model, exclude) pair had to wait in this
        # pass, every later waiter with the same pair must wait too: no need to ask again.
        # (A hold depends on how many wait besides the waiter: fewer for each later one.)
        blocked: set[tuple[str, frozenset[str]]] = set()
        remaining = sum(not waiter.future.done() for waiter in self._waiters)
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            key = (waiter.request.model, waiter.request.exclude)
            if key in blocked:
                still_waiting.append(waiter)
                continue
            request = replace(waiter.request, waiting=remaining - 1)
            decision = self._policy.choose(request, self._pool.snapshot())
            if not isinstance(decision, Wait):
                remaining -= 1
            if isinstance(decision, Route):
                waiter.future.set_result(self._take(waiter.request, decision))
            elif isinstance(decision, NoBackend):
                waiter.future.set_exception(no_capacity(decision.reason, RETRY_AFTER_S))
            else:
                held = held or decision.hold
                blocked.add(key)
                still_waiting.append(waiter)
        self._waiters = still_waiting
        self._held = held


def _sessions(policy: Policy) -> Sessions | None:
    """The policy's session table, shared through the cluster (None: it keeps none)."""
    return policy.sessions if isinstance(policy, KeepsSessions) else None
