"""The admin plane's request and response bodies (they make its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel


class EjectionView(BaseModel):
    """Outlier ejection (backends/outlier.py): active, ejected (out for `seconds_left`) or
    half_open (one trial request at a time)."""

    state: str
    failures_in_a_row: int
    ejections_in_a_row: int
    ejections_total: int
    seconds_left: float | None
    last_fault: str | None  # down | error


class BackendView(BaseModel):
    """One backend: its configuration, live state and what sluiceway learned of it."""

    name: str
    kind: str
    url: str
    models: list[str]
    served_model: str | None
    device: str | None  # backends sharing an accelerator name the same one
    health: str
    health_detail: str
    draining: bool
    removing: bool
    ejection: EjectionView
    capacity: int | None
    capacity_source: str | None
    in_flight: int  # this replica's requests
    in_flight_all_replicas: int  # with the other replicas' (cluster/), as last seen
    share: int | None  # this replica's part of the capacity while Redis is unreachable
    upstream_running: int | None
    upstream_waiting: int | None
    kv_cache_usage: float | None
    max_model_len: int | None
    ttft_s: float | None
    decode_tok_s: float | None
    prefill_chars_per_s: float | None
    prefill_overhead_s: float | None  # TTFT besides prefill, from calibration
    mean_uncached_chars: float | None
    prefill_backlog_chars: float  # of requests sent and not yet answered (BackendSnapshot)
    throughput_curve: list[tuple[int, float]]  # (concurrency, aggregate output tok/s)
    ttft_curve: list[tuple[int, float]]  # (concurrency, TTFT s)
    completed: int
    failed: int


class PoolView(BaseModel):
    policy: str
    queue_depth: int
    backends: list[BackendView]


class Removal(BaseModel):
    name: str
    removed: bool  # False: drained, and it leaves when its last request ends
    in_flight: int


class ReloadResult(BaseModel):
    added: list[str]
    removed: list[str]
    changed: list[str]
    routing: bool
    health: bool
    timeouts: bool
    models: bool
    restart_needed: list[str]  # sections that changed but take a restart


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str


class ErrorReply(BaseModel):
    error: ErrorBody
