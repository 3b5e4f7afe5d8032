"""Live, mutable state of one backend. Only the pool and the monitor write it."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from time import perf_counter

from backends.adapter import Adapter
from backends.config import BackendConfig
from backends.outlier import Ejection, Outlier
from backends.snapshot import BackendSnapshot, Health
from backends.stats import BackendStats


@dataclass(slots=True)
class Discovered:
    """What probing the backend found out; empty until the first successful probe."""

    models: tuple[str, ...] = ()
    models_listed: bool = False  # its model list was read (it may be empty)
    max_model_len: int | None = None
    capacity: int | None = None
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # 0-1, vLLM's KV-cache gauge
    metrics_available: bool = True


@dataclass(slots=True)
class BackendState:
    config: BackendConfig
    adapter: Adapter
    index: int
    upstream_key: str | None = None
    tls: ssl.SSLContext | None = None  # https backends: see backends/tls.py
    health: Health = Health.UNKNOWN
    health_detail: str = ""
    in_flight: int = 0  # this process's requests (slots reserved here)
    # several replicas (cluster/): the other replicas' requests here, as last seen in Redis,
    # and this replica's share of the capacity while Redis cannot be reached (None: none)
    remote_in_flight: int = 0
    share: int | None = None
    draining: bool = False  # no new requests (admin drain, or on the way out)
    removing: bool = False  # leaves the pool when its last request ends
    outlier: Outlier = field(default_factory=Outlier)  # ejection after failures in a row
    expiry: asyncio.TimerHandle | None = None  # ends the ejection's backoff
    discovered: Discovered = field(default_factory=Discovered)
    stats: BackendStats = field(default_factory=BackendStats)
    load_area: float = 0.0  # integral of in_flight over time (request-seconds)
    backlog_chars: float = 0.0  # see BackendSnapshot.prefill_backlog_chars
    load_area_at: float = field(default_factory=perf_counter)

    def advance_area(self, now: float) -> float:
        """Bring the in-flight integral (over all replicas) up to `now` and return it."""
        self.load_area += self.total_in_flight * (now - self.load_area_at)
        self.load_area_at = now
        return self.load_area

    def excess_chars(self, prefill_chars: float) -> float:
        """What a request bringing `prefill_chars` to prefill adds to the backlog: the part
        beyond the typical prompt behind the TTFT curve (nothing while none is known)."""
        typical = self.stats.uncached_chars.value
        return 0.0 if typical is None else max(0.0, prefill_chars - typical)

    @property
    def total_in_flight(self) -> int:
        """In flight from every replica: what the backend itself is serving."""
        return self.in_flight + self.remote_in_flight

    @property
    def failing(self) -> bool:
        """Failing lately, down, or out of routing for failing: worth probing more often."""
        return (self.outlier.failures > 0 or self.health is Health.DOWN
                or self.outlier.state is not Ejection.ACTIVE)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def capacity(self) -> int | None:
        """A configured cap wins; otherwise what the engine published, if anything."""
        return self.config.max_concurrency or self.discovered.capacity

    @property
    def admission_capacity(self) -> int | None:
        """The capacity this replica may fill: all of it, or its share while partitioned."""
        capacity = self.capacity
        if capacity is None or self.share is None:
            return capacity
        return min(capacity, self.share)

    @property
    def models(self) -> tuple[str, ...]:
        return self.config.models or self.discovered.models

    @property
    def served_model(self) -> str | None:
        """The name sent upstream; None keeps the client's name."""
        if self.config.served_model:
            return self.config.served_model
        return self.discovered.models[0] if self.discovered.models else None

    def snapshot(self) -> BackendSnapshot:
        return BackendSnapshot(
            name=self.config.name,
            index=self.index,
            kind=self.config.kind.value,
            health=self.health,
            draining=self.draining,
            ejected=self.outlier.blocked,
            capacity=self.admission_capacity,
            in_flight=self.total_in_flight,
            models=frozenset(self.models),
            ttft_s=self.stats.ttft_s.value,
            decode_tok_s=self.stats.decode_tok_s.value,
            upstream_running=self.discovered.running,
            upstream_waiting=self.discovered.waiting,
            kv_cache_usage=self.discovered.kv_cache_usage,
            throughput_curve=self.stats.curve.throughput_points(),
            ttft_curve=self.stats.curve.ttft_points(),
            mean_output_tokens=self.stats.output_tokens.value,
            prefill_chars_per_s=self.stats.prefill_chars_per_s.value,
            mean_uncached_chars=self.stats.uncached_chars.value,
            prefill_backlog_chars=self.backlog_chars,
            device=self.config.device or None,
        )
