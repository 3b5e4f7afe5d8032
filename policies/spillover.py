"""spillover: fill backends in config order, each up to its capacity.

Formula: the eligible backend with the lowest config index. Put the backend you prefer
first (for example the one that is fastest for a single stream) and give it a capacity;
the rest of the pool takes only what overflows it. A backend with unknown capacity never
overflows, so later backends see traffic only when it is down.
"""

from __future__ import annotations

from backends.snapshot import PoolSnapshot
from policies.base import Decision, PolicyConfig, RouteRequest, pick_lowest


class Spillover:
    name = "spillover"

    def __init__(self, config: PolicyConfig) -> None:
        pass

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision:
        return pick_lowest(request, snapshot, lambda b: b.index)
