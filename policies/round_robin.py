"""round_robin: take backends in turn, in config order, skipping any without room.

Formula: the first eligible backend whose config index is at or after the cursor, else the
first eligible one; the cursor then moves past the pick. Ties cannot occur.
"""

from __future__ import annotations

from backends.snapshot import PoolSnapshot
from policies.base import Decision, PolicyConfig, Route, RouteRequest, eligible


class RoundRobin:
    name = "round_robin"

    def __init__(self, config: PolicyConfig) -> None:
        self._cursor = 0

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision:
        found = eligible(request, snapshot)
        if not isinstance(found, tuple):
            return found
        pick = next((b for b in found if b.index >= self._cursor), found[0])
        self._cursor = pick.index + 1
        return Route(pick.name)
