"""Frozen views of the pool that routing policies read.

A snapshot is taken once per routing decision; it never changes after it is made and it
holds no references to live state, so a policy can be a pure function of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Health(StrEnum):
    UNKNOWN = "unknown"  # not probed yet: routable, so the first requests are not refused
    HEALTHY = "healthy"
    LOADING = "loading"  # answers, but not ready (llama.cpp 503 "Loading model")
    DOWN = "down"  # connection refused, timeout, or a failed request on the wire

    @property
    def routable(self) -> bool:
        return self in (Health.UNKNOWN, Health.HEALTHY)


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    name: str
    index: int  # position in the config, the tie-break of every policy
    kind: str
    health: Health
    capacity: int | None  # None: not known (no cap configured, none discoverable)
    in_flight: int
    models: frozenset[str]
    ttft_s: float | None  # moving estimate from routed traffic
    decode_tok_s: float | None  # moving estimate of one stream's decode rate
    upstream_running: int | None  # as scraped from the engine's /metrics
    upstream_waiting: int | None
    kv_cache_usage: float | None = None  # 0-1, from the engine's /metrics where it has one
    # learned from routed traffic: (concurrency, aggregate output tok/s) and
    # (concurrency, TTFT s), sorted by concurrency; empty until observed
    throughput_curve: tuple[tuple[int, float], ...] = ()
    ttft_curve: tuple[tuple[int, float], ...] = ()
    mean_output_tokens: float | None = None
    prefill_chars_per_s: float | None = None  # learned; see BackendStats
    mean_uncached_chars: float | None = None  # the prompts behind the TTFT curve
    # body bytes beyond mean_uncached_chars that requests sent here and not yet answered
    # bring to prefill: queueing the TTFT curve, learned on typical prompts, cannot see
    prefill_backlog_chars: float = 0.0
    draining: bool = False  # taken out of rotation by an operator: finishes, takes nothing
    ejected: bool = False  # failing: out for a backoff, or half-open with its trial out
    device: str | None = None  # backends that share an accelerator name the same one

    @property
    def routable(self) -> bool:
        return self.health.routable and not self.draining and not self.ejected

    @property
    def has_room(self) -> bool:
        return self.capacity is None or self.in_flight < self.capacity

    @property
    def load(self) -> float:
        """In-flight over capacity; an unknown capacity counts as one slot."""
        return self.in_flight / (self.capacity or 1)

    def serves(self, model: str) -> bool:
        return model in self.models


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    backends: tuple[BackendSnapshot, ...]
