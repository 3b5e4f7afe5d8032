"""Table-driven tests of each policy: exact picks over hand-built snapshots."""

from __future__ import annotations

import random
from typing import Any

import pytest

from backends.snapshot import BackendSnapshot, Health, PoolSnapshot
from policies import POLICIES, NoBackend, Route, RouteRequest, Wait


def b(name: str, index: int, in_flight: int = 0, capacity: int | None = 4,
      health: Health = Health.HEALTHY, models: tuple[str, ...] = ("m",)) -> BackendSnapshot:
    return BackendSnapshot(
        name=name, index=index, kind="openai", health=health, capacity=capacity,
        in_flight=in_flight, models=frozenset(models), ttft_s=None, decode_tok_s=None,
        upstream_running=None, upstream_waiting=None,
    )


def pool(*backends: BackendSnapshot) -> PoolSnapshot:
    return PoolSnapshot(tuple(backends))


REQ = RouteRequest(endpoint="chat", model="m")

# (policy, snapshot, request, expected decision type, expected backend or None)
CASES: list[tuple[str, PoolSnapshot, RouteRequest, type, str | None]] = [
    # least_loaded: ratio in_flight / capacity decides, not the raw count
    ("least_loaded", pool(b("a", 0, 3, 4), b("b", 1, 4, 16)), REQ, Route, "b"),
    ("least_loaded", pool(b("a", 0, 1, 4), b("b", 1, 1, 4)), REQ, Route, "a"),  # tie: order
    ("least_loaded", pool(b("a", 0, 2, 4), b("b", 1, 1, 2)), REQ, Route, "b"),  # tie: fewer
    ("least_loaded", pool(b("a", 0, 4, 4), b("b", 1, 9, 10)), REQ, Route, "b"),  # a is full
    ("least_loaded", pool(b("a", 0, 0, None), b("b", 1, 1, 4)), REQ, Route, "a"),
    ("least_loaded", pool(b("a", 0, 4, 4), b("b", 1, 2, 2)), REQ, Wait, None),
    ("least_loaded", pool(b("a", 0, 0, 4, Health.DOWN), b("b", 1, 3, 4)), REQ, Route, "b"),
    ("least_loaded", pool(b("a", 0, 0, 4, Health.LOADING)), REQ, NoBackend, None),
    ("least_loaded", pool(b("a", 0, models=("x",))), REQ, NoBackend, None),
    ("least_loaded", pool(b("a", 0), b("b", 1, 3)),
     RouteRequest(endpoint="chat", model="m", exclude=frozenset({"a"})), Route, "b"),
    ("least_loaded", pool(b("a", 0)),
     RouteRequest(endpoint="chat", model="m", exclude=frozenset({"a"})), NoBackend, None),
    # unknown health (not probed yet) is routable
    ("least_loaded", pool(b("a", 0, 0, 4, Health.UNKNOWN)), REQ, Route, "a"),
    # spillover: first in config order with room
    ("spillover", pool(b("a", 0, 3, 4), b("b", 1, 0, 4)), REQ, Route, "a"),
    ("spillover", pool(b("a", 0, 4, 4), b("b", 1, 0, 4)), REQ, Route, "b"),
    ("spillover", pool(b("a", 0, 0, 4, Health.DOWN), b("b", 1, 3, 4)), REQ, Route, "b"),
    ("spillover", pool(b("a", 0, 4, 4), b("b", 1, 4, 4)), REQ, Wait, None),
    ("spillover", pool(b("a", 0, 100, None), b("b", 1, 0, 4)), REQ, Route, "a"),
    # round_robin from a fresh cursor starts at the first eligible backend
    ("round_robin", pool(b("a", 0), b("b", 1)), REQ, Route, "a"),
    ("round_robin", pool(b("a", 0, 4, 4), b("b", 1)), REQ, Route, "b"),
    ("round_robin", pool(b("a", 0, 4, 4), b("b", 1, 4, 4)), REQ, Wait, None),
]


@pytest.mark.parametrize(("policy", "snapshot", "request_", "kind", "expected"), CASES)
def test_pick(policy: str, snapshot: PoolSnapshot, request_: RouteRequest, kind: type,
              expected: str | None) -> None:
    decision: Any = POLICIES[policy](random.Random(0)).choose(request_, snapshot)
    assert isinstance(decision, kind)
    if expected is not None:
        assert decision.backend == expected


def test_round_robin_cycles_in_order_and_skips_full() -> None:
    policy = POLICIES["round_robin"](random.Random(0))
    snap = pool(b("a", 0), b("b", 1), b("c", 2))
    picks = [policy.choose(REQ, snap) for _ in range(5)]
    assert [p.backend for p in picks if isinstance(p, Route)] == ["a", "b", "c", "a", "b"]
    full_b = pool(b("a", 0), b("b", 1, 4, 4), b("c", 2))
    picks = [policy.choose(REQ, full_b) for _ in range(3)]
    assert [p.backend for p in picks if isinstance(p, Route)] == ["c", "a", "c"]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_no_policy_exceeds_capacity(policy: str) -> None:
    """Fill a pool by following each policy's picks: no backend goes over capacity."""
    chooser = POLICIES[policy](random.Random(1))
    caps = {"a": 1, "b": 3, "c": 2}
    load = dict.fromkeys(caps, 0)
    for _ in range(20):
        snap = pool(*(b(n, i, load[n], caps[n]) for i, n in enumerate(caps)))
        decision = chooser.choose(REQ, snap)
        if not isinstance(decision, Route):
            assert isinstance(decision, Wait)
            break
        load[decision.backend] += 1
        assert load[decision.backend] <= caps[decision.backend]
    assert load == caps
