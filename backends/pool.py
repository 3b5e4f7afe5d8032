"""The backend pool: live states, in-flight accounting and cached snapshots.

The proxy keeps its own in-flight count per backend; it is the primary load signal
(scraped engine gauges lag by seconds). Every mutation drops the cached snapshot and tells
the listeners (the admission queue), so waiting requests are reconsidered at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter

from backends.config import BackendConfig
from backends.kinds import ADAPTERS
from backends.snapshot import Health, PoolSnapshot
from backends.state import BackendState, Discovered
from backends.stats import RequestResult
from backends.tls import client_context

Listener = Callable[[], None]


class Pool:
    def __init__(self, configs: Iterable[BackendConfig]) -> None:
        self._states: dict[str, BackendState] = {}
        for index, config in enumerate(configs):
            key = os.environ.get(config.api_key_env) if config.api_key_env else None
            self._states[config.name] = BackendState(
                config=config, adapter=ADAPTERS[config.kind], index=index, upstream_key=key,
                tls=client_context(config),
            )
        self._snapshot: PoolSnapshot | None = None
        self._listeners: list[Listener] = []

    def __iter__(self) -> Iterator[BackendState]:
        return iter(self._states.values())

    def __getitem__(self, name: str) -> BackendState:
        return self._states[name]

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def snapshot(self) -> PoolSnapshot:
        if self._snapshot is None:
            self._snapshot = PoolSnapshot(tuple(s.snapshot() for s in self._states.values()))
        return self._snapshot

    def models(self) -> dict[str, list[BackendState]]:
        """Model name or alias -> the backends that serve it, in config order."""
        table: dict[str, list[BackendState]] = {}
        for state in self._states.values():
            for model in state.models:
                table.setdefault(model, []).append(state)
        return table

    def knows_model(self, model: str) -> bool:
        return any(model in state.models for state in self._states.values())

    def acquire(self, name: str) -> BackendState:
        state = self._states[name]
        state.advance_area(perf_counter())
        state.in_flight += 1
        self._changed(notify=False)  # taking a slot never frees room for a waiter
        return state

    def load_area(self, name: str) -> float:
        """The backend's in-flight count integrated over time, up to now."""
        return self._states[name].advance_area(perf_counter())

    def release(self, name: str, result: RequestResult) -> None:
        state = self._states[name]
        state.advance_area(perf_counter())
        state.in_flight -= 1
        state.stats.record(result)
        self._changed()

    def set_health(self, name: str, health: Health, detail: str = "") -> None:
        state = self._states[name]
        if state.health is health and state.health_detail == detail:
            return
        state.health, state.health_detail = health, detail
        self._changed()

    def set_discovered(self, name: str, discovered: Discovered) -> None:
        self._states[name].discovered = discovered
        self._changed()

    def _changed(self, notify: bool = True) -> None:
        self._snapshot = None
        if notify:
            for listener in self._listeners:
                listener()
