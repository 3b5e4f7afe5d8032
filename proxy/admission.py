"""Admission: pick a backend now, or wait in a bounded FIFO queue until one has room.

Invariant: after every change to the pool (a release, a health or capacity change) the
queue is scanned in arrival order and every waiter that fits is admitted. So whatever is
still queued does not fit the current pool, and a newcomer that fits may go ahead of it
without breaking first-come-first-served for the backends the waiters need.

The choice and the in-flight increment happen in one synchronous step on the event loop,
so two requests can never both take a backend's last slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

from backends.pool import Pool
from backends.stats import RequestResult
from policies import NoBackend, Policy, Route, RouteRequest
from proxy.errors import no_capacity

RETRY_AFTER_S = 2  # what a refused client is told; well under the SDKs' 60-120 s ceilings


@dataclass(slots=True)
class _Waiter:
    request: RouteRequest
    future: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Admission:
    def __init__(self, pool: Pool, policy: Policy, queue_size: int, timeout_s: float) -> None:
        self._pool = pool
        self._policy = policy
        self._queue_size = queue_size
        self._timeout_s = timeout_s
        self._waiters: deque[_Waiter] = deque()
        pool.subscribe(self._dispatch)

    def configure(self, policy: Policy, queue_size: int, timeout_s: float) -> None:
        """Settings for decisions from now on (a reload); waiters keep their deadlines."""
        self._policy, self._queue_size, self._timeout_s = policy, queue_size, timeout_s
        self._dispatch()

    @property
    def depth(self) -> int:
        return len(self._waiters)

    @property
    def policy_name(self) -> str:
        return self._policy.name

    async def admit(self, request: RouteRequest) -> str:
        """Return the name of a backend whose slot is now held for this request."""
        decision = self._policy.choose(request, self._pool.snapshot())
        if isinstance(decision, Route):
            self._pool.acquire(decision.backend)
            return decision.backend
        if isinstance(decision, NoBackend):
            raise no_capacity(decision.reason, RETRY_AFTER_S)
        if len(self._waiters) >= self._queue_size:
            raise no_capacity("the admission queue is full", RETRY_AFTER_S)
        waiter = _Waiter(request)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout_s):
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
                self._pool.release(waiter.future.result(), RequestResult("client_closed"))
            return
        waiter.future.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _dispatch(self) -> None:
        """Admit, in arrival order, every waiter that fits the pool as it is now."""
        if not self._waiters:
            return
        still_waiting: deque[_Waiter] = deque()
        # Admitting only removes room, so once a (model, exclude) pair had to wait in this
        # pass, every later waiter with the same pair must wait too: no need to ask again.
        blocked: set[tuple[str, frozenset[str]]] = set()
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            key = (waiter.request.model, waiter.request.exclude)
            if key in blocked:
                still_waiting.append(waiter)
                continue
            decision = self._policy.choose(waiter.request, self._pool.snapshot())
            if isinstance(decision, Route):
                self._pool.acquire(decision.backend)
                waiter.future.set_result(decision.backend)
            elif isinstance(decision, NoBackend):
                waiter.future.set_exception(no_capacity(decision.reason, RETRY_AFTER_S))
            else:
                blocked.add(key)
                still_waiting.append(waiter)
        self._waiters = still_waiting
