"""least_loaded: the eligible backend with the lowest in-flight / capacity.

Formula: minimise `in_flight / capacity` (an unknown capacity counts as 1, so such a
backend is compared by its raw in-flight count). Tie-break: fewer in flight, then config
order.
"""

from __future__ import annotations

from backends.snapshot import PoolSnapshot
from policies.base import Decision, PolicyConfig, RouteRequest, pick_lowest


class LeastLoaded:
    name = "least_loaded"

    def __init__(self, config: PolicyConfig) -> None:
        pass

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision:
        return pick_lowest(request, snapshot, lambda b: (b.load, b.in_flight, b.index))
