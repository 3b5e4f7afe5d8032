"""Bodies of the proxy's own (not forwarded) endpoints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from backends.outlier import Ejection, Outlier
from backends.pool import Pool
from backends.snapshot import Health
from backends.state import BackendState
from cluster.replica import Cluster
from proxy.aliases import Aliases

_STARTED = int(time.time())


def models(pool: Pool, aliases: Aliases, anthropic: bool = False) -> bytes:
    """`/v1/models`: every model the pool serves and every exact alias of one, in
    OpenAI's list shape, or Anthropic's when the client sent `anthropic-version` (Claude
    Code's gateway model discovery reads that shape)."""
    served = pool.models()
    listed: dict[str, list[BackendState]] = dict(served)
    for alias, target in aliases.names.items():
        if target in served and alias not in listed:
            listed[alias] = served[target]
    if anthropic:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_STARTED))
        entries = [{"type": "model", "id": name, "display_name": name, "created_at": created}
                   for name in listed]
        return orjson.dumps({"data": entries, "has_more": False,
                             "first_id": entries[0]["id"] if entries else None,
                             "last_id": entries[-1]["id"] if entries else None})
    data: list[dict[str, Any]] = []
    for name, states in listed.items():
        entry: dict[str, Any] = {
            "id": name, "object": "model", "created": _STARTED, "owned_by": "sluiceway",
        }
        lengths = [s.discovered.max_model_len for s in states if s.discovered.max_model_len]
        if lengths:
            entry["max_model_len"] = min(lengths)
        data.append(entry)
    return orjson.dumps({"object": "list", "data": data})


def ready(pool: Pool, cluster: Cluster | None = None) -> tuple[int, bytes]:
    """Ready while some backend is healthy, not drained (one that is drained finishes
    what it has but takes nothing new) and not ejected for failing. With several replicas,
    the detail says how this one coordinates (a replica that lost Redis still serves,
    within its share: it stays ready)."""
    healthy = [s.name for s in pool if s.health is Health.HEALTHY and not s.draining
               and not s.outlier.blocked]
    draining = [s.name for s in pool if s.draining]
    ejected = [s.name for s in pool if s.outlier.state is not Ejection.ACTIVE]
    status = 200 if healthy else 503
    body: dict[str, Any] = {"ready": bool(healthy), "healthy_backends": healthy,
                            "draining_backends": draining, "ejected_backends": ejected}
    if cluster is not None:
        body["cluster"] = {"replica": cluster.replica_id, "mode": cluster.mode.value,
                           "replicas": len(cluster.replicas), "detail": cluster.detail,
                           "shares": {s.name: s.share for s in pool if s.share is not None}}
    return status, orjson.dumps(body)


def admin_backends(pool: Pool, policy: str, queue_depth: int) -> bytes:
    backends = [backend_view(s) for s in pool]
    return orjson.dumps({"policy": policy, "queue_depth": queue_depth, "backends": backends})


def ejection_view(outlier: Outlier) -> dict[str, Any]:
    """Where the backend stands with outlier ejection (backends/outlier.py)."""
    left = None
    if outlier.state is Ejection.EJECTED and outlier.until is not None:
        left = round(max(0.0, outlier.until - asyncio.get_running_loop().time()), 3)
    return {"state": outlier.state.value, "failures_in_a_row": outlier.failures,
            "ejections_in_a_row": outlier.ejections, "ejections_total": outlier.ejections_total,
            "seconds_left": left, "last_fault": outlier.last_fault.value or None}


def backend_view(s: BackendState) -> dict[str, Any]:
    """One backend as `/admin/backends` shows it, on either plane."""
    return {
        "name": s.name,
        "kind": s.config.kind.value,
        "url": s.config.base_url,
        "models": list(s.models),
        "served_model": s.served_model,
        "device": s.config.device or None,
        "health": s.health.value,
        "health_detail": s.health_detail,
        "draining": s.draining,
        "removing": s.removing,
        "ejection": ejection_view(s.outlier),
        "capacity": s.capacity,
        "capacity_source": "config" if s.config.max_concurrency else (
            "discovered" if s.discovered.capacity else None
        ),
        "in_flight": s.in_flight,
        "in_flight_all_replicas": s.total_in_flight,
        "share": s.share,
        "upstream_running": s.discovered.running,
        "upstream_waiting": s.discovered.waiting,
        "kv_cache_usage": s.discovered.kv_cache_usage,
        "max_model_len": s.discovered.max_model_len,
        "ttft_s": s.stats.ttft_s.value,
        "decode_tok_s": s.stats.decode_tok_s.value,
        "prefill_chars_per_s": s.stats.prefill_chars_per_s.value,
        "prefill_overhead_s": s.stats.prefill_overhead_s,
        "mean_uncached_chars": s.stats.uncached_chars.value,
        "prefill_backlog_chars": s.backlog_chars,
        "throughput_curve": [list(p) for p in s.stats.curve.throughput_points()],
        "ttft_curve": [list(p) for p in s.stats.curve.ttft_points()],
        "completed": s.stats.completed,
        "failed": s.stats.failed,
    }
