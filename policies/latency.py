"""latency: the backend with the lowest predicted time to first token.

Formula: TTFT_b(n + 1) from the backend's learned TTFT-by-concurrency curve (linear
between learned points, flat outside; a backend not yet observed is predicted at the best
TTFT seen in the pool, so it gets tried). Tie-break: in_flight / capacity, then config
order.
"""

from __future__ import annotations

from backends.snapshot import PoolSnapshot
from policies import model
from policies.base import Decision, PolicyConfig, RouteRequest, pick_lowest


class Latency:
    name = "latency"

    def __init__(self, config: PolicyConfig) -> None:
        pass

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision:
        prior = model.prior_ttft_s(snapshot.backends)
        return pick_lowest(request, snapshot,
                           lambda b: (model.ttft_s(b, b.in_flight + 1, prior), b.load, b.index))
