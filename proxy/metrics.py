"""Prometheus metrics, on a registry of the app's own (one per app instance).

Per-request metrics are recorded once per attempt, after it ends, never per chunk. Gauges
of live state (in flight, capacity, health, queue depth) are read from the pool when
scraped, so the hot path never touches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.outlier import Ejection
from backends.pool import Pool
from backends.snapshot import Health
from cluster.replica import Cluster, Mode

# Prefill of a long prompt on a busy llama.cpp can take minutes: buckets reach 300 s.
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

M = TypeVar("M", Counter, Histogram)


class _Children(Generic[M]):
    """A labelled metric whose children are looked up once per set of label values:
    prometheus_client's `labels()` validates and takes a lock on every call, several
    microseconds that the proxy would otherwise spend on each of a request's metrics."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self, pool: Pool, queue_depth: Callable[[], int],
                 cluster: Cluster | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = _Children(Counter(
            "sluiceway_requests", "Requests sent to a backend (one per attempt), by outcome.",
            ["backend", "endpoint", "outcome"], registry=r,
        ))
        self.ttft = _Children(Histogram(
            "sluiceway_ttft_seconds", "Time from sending upstream to the first content.",
            ["backend"], buckets=_LATENCY_BUCKETS, registry=r,
        ))
        self.duration = _Children(Histogram(
            "sluiceway_request_duration_seconds", "Time from sending upstream to the end.",
            ["backend"], buckets=_LATENCY_BUCKETS, registry=r,
        ))
        self.tpot = _Children(Histogram(
            "sluiceway_time_per_output_token_seconds",
            "Decode time per output token after the first.",
            ["backend"], buckets=_TOKEN_BUCKETS, registry=r,
        ))
        self.prompt_tokens = _Children(Counter(
            "sluiceway_prompt_tokens", "Prompt tokens reported by backends.", ["backend"],
            registry=r,
        ))
        self.output_tokens = _Children(Counter(
            "sluiceway_output_tokens", "Output tokens reported by backends (or estimated).",
            ["backend"], registry=r,
        ))
        self.estimated_tokens = _Children(Counter(
            "sluiceway_output_tokens_estimated",
            "Output tokens of streams that reported no usage, counted as one per content "
            "event (included in sluiceway_output_tokens_total).", ["backend"], registry=r,
        ))
        self.queue_wait = Histogram(
            "sluiceway_queue_wait_seconds", "Time a request waited for a backend with room.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.decisions = _Children(Counter(
            "sluiceway_routing_decisions", "Backends chosen by the routing policy.",
            ["backend", "policy"], registry=r,
        ))
        self.retries = _Children(Counter(
            "sluiceway_retries", "Attempts that failed before any byte reached the client "
            "and were retried on another backend, by the backend that failed.",
            ["backend"], registry=r,
        ))
        self.clamped = _Children(Counter(
            "sluiceway_max_tokens_clamped", "Requests whose max_tokens was lowered to fit "
            "the backend's context (routing.clamp_max_tokens).", ["backend"], registry=r,
        ))
        self.translated = _Children(Counter(
            "sluiceway_translated_requests", "Requests in an API the backend does not serve, "
            "sent to it as Chat Completions and translated back, by backend and client API.",
            ["backend", "api"], registry=r,
        ))
        self.admin_actions = _Children(Counter(
            "sluiceway_admin_actions", "Changes made through the admin plane or SIGHUP, by "
            "action and result (ok, rejected, not_found, conflict).",
            ["action", "result"], registry=r,
        ))
        self._live = _LiveState(pool, queue_depth)
        r.register(self._live)
        if cluster is not None:
            r.register(_ClusterState(pool, cluster))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, ...

    def watch_server(self, connections: Callable[[], tuple[int, int]]) -> None:
        """Export the HTTP server's open and refused client connections (`connections`
        returns both), once it listens."""
        self._live.connections = connections

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterState(Collector):
    """Several replicas (cluster/replica.py): how this one coordinates with the others."""

    def __init__(self, pool: Pool, cluster: Cluster) -> None:
        self._pool = pool
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        cluster = self._cluster
        total = GaugeMetricFamily(
            "sluiceway_backend_in_flight_cluster", "Requests in flight on the backend from "
            "every replica (this one's, and the others' as last seen in Redis).",
            labels=["backend"])
        share = GaugeMetricFamily(
            "sluiceway_backend_share", "This replica's share of the backend's capacity "
            "while it cannot coordinate through Redis; absent otherwise.", labels=["backend"])
        for state in self._pool:
            total.add_metric([state.name], state.total_in_flight)
            if state.share is not None:
                share.add_metric([state.name], state.share)
        yield total
        yield share
        yield GaugeMetricFamily(
            "sluiceway_cluster_partitioned", "1 while Redis is unreachable (or has just come "
            "back) and each backend is limited to this replica's share of its capacity.",
            value=0.0 if cluster.mode is Mode.SHARED else 1.0)
        yield GaugeMetricFamily(
            "sluiceway_cluster_replicas", "Live replicas, as last seen in Redis.",
            value=len(cluster.replicas))
        yield CounterMetricFamily(
            "sluiceway_cluster_partitions", "Times this replica lost Redis and fell back to "
            "its shares.", value=cluster.partitions_total)


class _LiveState(Collector):
    def __init__(self, pool: Pool, queue_depth: Callable[[], int],
                 cluster: Cluster | None = None) -> None:
        self._pool = pool
        self._queue_depth = queue_depth
        self.connections: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "sluiceway_backend_in_flight", "Requests the proxy has in flight.", labels=["backend"]
        )
        capacity = GaugeMetricFamily(
            "sluiceway_backend_capacity", "Concurrency cap (configured or discovered); "
            "absent while unknown.", labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "sluiceway_backend_healthy", "1 when the last probe found the backend ready.",
            labels=["backend"],
        )
        draining = GaugeMetricFamily(
            "sluiceway_backend_draining", "1 while an operator has the backend drained (or "
            "it is being removed): requests in flight finish, no new ones go there.",
            labels=["backend"],
        )
        ejected = GaugeMetricFamily(
            "sluiceway_backend_ejected", "1 while the backend is out of routing for failing "
            "(ejected, or half-open: one trial request at a time).", labels=["backend"],
        )
        ejections = CounterMetricFamily(
            "sluiceway_backend_ejections", "Times the backend was ejected for failures in a "
            "row.", labels=["backend"],
        )
        kv_cache = GaugeMetricFamily(
            "sluiceway_backend_kv_cache_usage", "The engine's KV-cache fill, 0-1, as scraped "
            "from its /metrics (vLLM); absent where not published.", labels=["backend"],
        )
        for state in self._pool:
            in_flight.add_metric([state.name], state.in_flight)
            if state.discovered.kv_cache_usage is not None:
                kv_cache.add_metric([state.name], state.discovered.kv_cache_usage)
            if state.capacity is not None:
                capacity.add_metric([state.name], state.capacity)
            healthy.add_metric([state.name], 1.0 if state.health is Health.HEALTHY else 0.0)
            draining.add_metric([state.name], 1.0 if state.draining else 0.0)
            outlier = state.outlier
            ejected.add_metric([state.name], 0.0 if outlier.state is Ejection.ACTIVE else 1.0)
            ejections.add_metric([state.name], outlier.ejections_total)
        yield in_flight
        yield capacity
        yield healthy
        yield draining
        yield ejected
        yield ejections
        yield kv_cache
        yield GaugeMetricFamily(
            "sluiceway_queue_depth", "Requests waiting for a backend with room.",
            value=self._queue_depth(),
        )
        yield GaugeMetricFamily(
            "sluiceway_event_loop_tasks", "asyncio tasks alive in the proxy's event loop "
            "(one per request in progress, plus a few background ones).",
            value=len(asyncio.all_tasks()))
        if self.connections is not None:
            open_now, refused = self.connections()
            yield GaugeMetricFamily(
                "sluiceway_client_connections", "Open client connections.", value=open_now)
            yield CounterMetricFamily(
                "sluiceway_client_connections_refused", "Client connections turned away "
                "with 503 at server.max_connections.", value=refused)
