"""The engine adapter seam: what sluiceway needs to know to probe and scrape one engine.

An adapter is data, not code. Adding an engine means one module that builds an `Adapter`
and one line in `backends.kinds.ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.config import EngineKind


@dataclass(frozen=True, slots=True)
class Adapter:
    kind: EngineKind
    health_path: str  # GET; 200 means ready to serve
    loading_statuses: frozenset[int] = frozenset()  # alive but not ready (e.g. loading)
    models_path: str = "/v1/models"
    capacity_path: str | None = None  # GET returning JSON with the slot count
    capacity_field: str | None = None
    # where in that JSON one request's context length is (a path of keys), if anywhere
    context_field: tuple[str, ...] = ()
    metrics_path: str | None = None  # Prometheus text with the load gauges below
    # metric -> running | waiting | kv_cache (a 0-1 fraction)
    load_gauges: Mapping[str, str] = field(default_factory=dict)
    slots_path: str | None = None  # JSON list of slots with `is_processing` (fallback)
