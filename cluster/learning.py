"""Learning shared by replicas: every replica folds in every replica's observations.

Each finished request teaches its backend's estimates (backends/stats.py). A replica
publishes what its requests taught, in batches, on `{prefix}:learned`; the others fold
each observation into their own estimates exactly as if they had served the request, so
all replicas learn the same curves from all the traffic, and learn them against the
global concurrency (the load integral counts every replica's requests).

What was learned is also persisted (`{prefix}:stats:{backend}`, refreshed every few
seconds by each replica): a replica that starts (a new one, a restart) loads it before it
takes traffic and routes warm from its first request. A stored state is used only for a
backend at the same URL and of the same kind (another server teaches nothing).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

import orjson

from backends.state import BackendState
from backends.stats import RequestResult

log = logging.getLogger("sluiceway.cluster")

STATE_TTL_S = 7 * 24 * 3600  # a pool unused for a week starts afresh
_FIELDS = tuple(f.name for f in fields(RequestResult) if f.name != "fault")


def teaches(result: RequestResult) -> bool:
    """Worth telling the others: it measured something."""
    return result.outcome == "ok" or result.ttft_s is not None


def encode_batch(replica_id: str, batch: list[tuple[str, RequestResult]]) -> bytes:
    observations = [[name, [getattr(result, f) for f in _FIELDS]] for name, result in batch]
    return orjson.dumps({"from": replica_id, "obs": observations})


def decode_batch(data: bytes, me: str) -> list[tuple[str, RequestResult]]:
    """Another replica's observations (none for this replica's own batches or anything
    malformed: a bad message teaches nothing rather than failing the listener)."""
    try:
        message = orjson.loads(data)
        if message.get("from") == me:
            return []
        return [(str(name), RequestResult(**dict(zip(_FIELDS, values, strict=True))))
                for name, values in message["obs"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        log.warning("cluster: ignoring a malformed learning message")
        return []


def stats_key(prefix: str, backend: str) -> str:
    return f"{prefix}:stats:{backend}"


def encode_state(state: BackendState) -> bytes:
    return orjson.dumps({"url": state.config.base_url, "kind": state.config.kind.value,
                         "stats": state.stats.state()})


def load_state(state: BackendState, data: bytes | str) -> bool:
    """Take over a stored state when it is for the same server; True when it was."""
    try:
        stored: dict[str, Any] = orjson.loads(data)
        if (stored.get("url"), stored.get("kind")) != (state.config.base_url,
                                                         state.config.kind.value):
            return False
        state.stats.load(stored["stats"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        log.warning("cluster: ignoring a malformed stored state for backend %s", state.name)
        return False
    return True

