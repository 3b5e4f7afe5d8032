"""The policy seam: `choose(request, snapshot) -> Decision`.

A policy is a pure function of the request and a frozen pool snapshot (it may keep a
little state of its own, such as a round-robin cursor, and draws randomness only from the
RNG it was built with). It does no I/O, logging or metrics.

Every policy first narrows the pool with `eligible()`: backends that serve the model, were
not tried already for this request, are routable, and have room below their capacity. A
policy therefore can never pick a full backend.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.snapshot import BackendSnapshot, PoolSnapshot


@dataclass(frozen=True, slots=True)
class RouteRequest:
    endpoint: str  # e.g. "chat", "completions", "embeddings"
    model: str
    stream: bool = False
    max_tokens: int | None = None
    prompt_chars: int = 0  # size of the body: a cheap stand-in for prompt length
    affinity_key: str | None = None
    exclude: frozenset[str] = frozenset()  # backends already tried for this request
    waiting: int = 0  # other requests waiting in admission when this one is decided


@dataclass(frozen=True, slots=True)
class Route:
    backend: str
    # body bytes the policy expects the backend to prefill (what its cache does not hold);
    # None: all of the body. Admission counts it into the backend's prefill backlog.
    prefill_chars: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Wait:
    """Some backend could take it later: queue the request. `hold`: one has room, but the
    policy holds the request back from it (policies/devices.py); the answer depends on
    how many wait, so the queue is asked again as it grows."""

    reason: str
    hold: bool = False


@dataclass(frozen=True, slots=True)
class NoBackend:
    """Nothing can take it now or soon: fail fast."""

    reason: str


Decision = Route | Wait | NoBackend


class Policy(Protocol):
    name: str

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision: ...


@dataclass(frozen=True)
class PolicyConfig:
    """What a policy is built with."""

    rng: random.Random = field(default_factory=random.Random)
    affinity: bool = True  # adaptive: prefer the backend that served the session


PolicyFactory = Callable[[PolicyConfig], Policy]


def eligible(
    request: RouteRequest, snapshot: PoolSnapshot
) -> tuple[BackendSnapshot, ...] | Wait | NoBackend:
    """Backends that could take the request now, or why none can."""
    serving = [
        b for b in snapshot.backends if b.serves(request.model) and b.name not in request.exclude
    ]
    if not serving:
        return NoBackend(f"no untried backend serves model {request.model!r}")
    routable = [b for b in serving if b.routable]
    if not routable:
        return NoBackend(f"no healthy backend serves model {request.model!r}")
    with_room = tuple(b for b in routable if b.has_room)
    if not with_room:
        return Wait(f"every backend serving {request.model!r} is at capacity")
    return with_room


def pick_lowest(
    request: RouteRequest, snapshot: PoolSnapshot, key: Callable[[BackendSnapshot], Any]
) -> Decision:
    """Route to the eligible backend with the lowest `key`, or say why none can take it."""
    found = eligible(request, snapshot)
    if not isinstance(found, tuple):
        return found
    return Route(min(found, key=key).name)
