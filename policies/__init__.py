"""Routing policies and the name -> policy table."""

from collections.abc import Mapping

from policies.adaptive import Adaptive
from policies.base import (
    Decision,
    NoBackend,
    Policy,
    PolicyConfig,
    PolicyFactory,
    Route,
    RouteRequest,
    Wait,
)
from policies.latency import Latency
from policies.least_loaded import LeastLoaded
from policies.round_robin import RoundRobin
from policies.spillover import Spillover

POLICIES: Mapping[str, PolicyFactory] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    Spillover.name: Spillover,
    Latency.name: Latency,
    Adaptive.name: Adaptive,
}

__all__ = [
    "POLICIES",
    "Decision",
    "NoBackend",
    "Policy",
    "PolicyConfig",
    "PolicyFactory",
    "Route",
    "RouteRequest",
    "Wait",
]
