"""The backend pool: live states, in-flight accounting and cached snapshots.

The proxy keeps its own in-flight count per backend; it is the primary load signal
(scraped engine gauges lag by seconds). Every mutation drops the cached snapshot and tells
the listeners (the admission queue), so waiting requests are reconsidered at once.

The set of backends can change while requests are in flight (the admin plane, a reload):
a drained backend takes no new requests; a removed one is drained and leaves the pool
when its last request ends, so every acquired slot is released on the state it came from.

A backend that keeps failing is ejected for a while (backends/outlier.py); the pool counts
the failures (live requests and health probes), schedules the end of each backoff on the
event loop and tells its ejection listeners (the gateway abandons the requests still
waiting there for a first byte, so they go elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from time import perf_counter

from backends.config import BackendConfig
from backends.kinds import ADAPTERS
from backends.outlier import Ejection, EjectionRule, Fault
from backends.snapshot import Health, PoolSnapshot
from backends.state import BackendState, Discovered
from backends.stats import RequestResult
from backends.tls import client_context

log = logging.getLogger("sluiceway.pool")

Listener = Callable[[], None]
EjectListener = Callable[[BackendState, str], None]

_ANSWERED = frozenset(("ok", "rejected"))  # the backend answered: alive


class Pool:
    def __init__(self, configs: Iterable[BackendConfig],
                 ejection: EjectionRule | None = None) -> None:
        self._states: dict[str, BackendState] = {}
        for index, config in enumerate(configs):
            self._states[config.name] = _new_state(config, index)
        self._snapshot: PoolSnapshot | None = None
        self._listeners: list[Listener] = []
        self._eject_listeners: list[EjectListener] = []
        self.ejection = ejection or EjectionRule()  # a reload may change it

    def __iter__(self) -> Iterator[BackendState]:
        return iter(self._states.values())

    def __getitem__(self, name: str) -> BackendState:
        return self._states[name]

    def get(self, name: str) -> BackendState | None:
        return self._states.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._states

    def __len__(self) -> int:
        return len(self._states)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def on_eject(self, listener: EjectListener) -> None:
        """Call `listener(state, reason)` whenever a backend is ejected."""
        self._eject_listeners.append(listener)

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

    def unlisted(self) -> list[str]:
        """Backends taking requests that have not said yet which models they serve (none
        configured, and no model list read: loading, or unreachable since the start). A
        model that no backend lists may still be one of theirs."""
        return [state.name for state in self._states.values()
                if not state.config.models and not state.discovered.models_listed
                and not state.draining and not state.removing]

    def acquire(self, name: str, prefill_chars: float = 0.0) -> float:
        """A slot taken for a request bringing `prefill_chars` body bytes to prefill;
        returns what that added to the backend's prefill backlog (give it back with
        `prefilled` once the first bytes come, or with `release`)."""
        state = self._states[name]
        state.advance_area(perf_counter())
        state.in_flight += 1
        backlog = state.excess_chars(prefill_chars)
        state.backlog_chars += backlog
        if state.outlier.state is Ejection.HALF_OPEN:
            state.outlier.take()  # the trial: it takes nothing more until this ends
        self._changed(notify=False)  # taking a slot never frees room for a waiter
        return backlog

    def prefilled(self, name: str, backlog: float) -> None:
        """A request's first bytes came: its prefill is no longer ahead of anyone."""
        if not backlog:
            return
        state = self._states.get(name)
        if state is not None:
            state.backlog_chars = max(0.0, state.backlog_chars - backlog)
            self._changed(notify=False)  # no room freed

    def load_area(self, name: str) -> float:
        """The backend's in-flight count integrated over time, up to now."""
        return self._states[name].advance_area(perf_counter())

    def release(self, name: str, result: RequestResult | None, backlog: float = 0.0) -> None:
        """A request ends: its slot is free and what it taught is learned. None: a slot
        reserved and given back unused (nothing was sent), which teaches nothing.
        `backlog`: what it still held of the prefill backlog (see `acquire`)."""
        state = self._states[name]
        state.advance_area(perf_counter())
        state.in_flight -= 1
        state.backlog_chars = max(0.0, state.backlog_chars - backlog)
        if result is not None:
            state.stats.record(result)
        if result is not None and result.fault:
            self._failed(state, result.fault, f"{result.outcome} on a request")
        elif result is not None and result.outcome in _ANSWERED:
            if state.outlier.succeeded():
                log.info("backend %s answered its trial request: back in routing", name)
        else:  # unused, or ended telling nothing of the backend
            state.outlier.ended_neutral()
        if state.removing and state.in_flight == 0:
            self._drop(state)
        self._changed()

    def learn(self, name: str, result: RequestResult) -> None:
        """What another replica's request taught about a backend (cluster/learning.py)."""
        state = self._states.get(name)
        if state is not None:
            state.stats.learn(result)
            self._changed(notify=False)

    def invalidate(self) -> None:
        """Estimates changed outside a request (taken over from another replica)."""
        self._changed(notify=False)

    def set_remote(self, name: str, count: int) -> None:
        """The other replicas' requests in flight on `name` (cluster/replica.py)."""
        state = self._states.get(name)
        if state is None or state.remote_in_flight == count:
            return
        state.advance_area(perf_counter())
        freed = count < state.remote_in_flight
        state.remote_in_flight = count
        self._changed(notify=freed)

    def set_share(self, name: str, share: int | None) -> None:
        """This replica's part of `name`'s capacity while replicas cannot coordinate
        (None: the whole capacity, counted across replicas)."""
        state = self._states.get(name)
        if state is None or state.share == share:
            return
        state.share = share
        self._changed()

    def probed(self, name: str, passed: bool, detail: str = "") -> None:
        """A health probe's verdict: a failure counts as the backend being down; a pass
        ends an ejection for being down (not one for answering errors)."""
        state = self._states.get(name)  # None: removed while it was being probed
        if state is None:
            return
        if not passed:
            self._failed(state, Fault.DOWN, f"health probe: {detail}")
        elif state.outlier.probe_passed():
            self._cancel_expiry(state)
            log.info("backend %s passes its probes again: half-open", name)
        else:
            return
        self._changed()

    def _failed(self, state: BackendState, fault: Fault, reason: str) -> None:
        outlier = state.outlier
        backoff = outlier.failed(self.ejection, self._may_eject(state), fault)
        if backoff is None:
            return
        loop = asyncio.get_running_loop()
        outlier.until = loop.time() + backoff
        self._cancel_expiry(state)
        state.expiry = loop.call_later(backoff, self._expire, state)
        log.warning("backend %s ejected for %g s after %d failures in a row (last: %s)",
                    state.name, backoff, outlier.failures, reason)
        for listener in tuple(self._eject_listeners):
            listener(state, reason)

    def _expire(self, state: BackendState) -> None:
        state.expiry = None
        state.outlier.expire()
        self._changed()  # routable again: waiters may go there

    def _may_eject(self, state: BackendState) -> bool:
        """Ejection never leaves one of the backend's models without a routable backend."""
        others = [s for s in self._states.values() if s is not state and s.health.routable
                  and not s.draining and not s.outlier.blocked]
        return all(any(model in other.models for other in others) for model in state.models)

    def set_health(self, name: str, health: Health, detail: str = "") -> None:
        state = self._states.get(name)  # None: removed while it was being probed
        if state is None or (state.health is health and state.health_detail == detail):
            return
        state.health, state.health_detail = health, detail
        self._changed()

    def set_discovered(self, name: str, discovered: Discovered) -> None:
        state = self._states.get(name)
        if state is not None:
            state.discovered = discovered
            self._changed()

    def set_draining(self, name: str, draining: bool) -> None:
        """Drained: no new requests are routed there; those in flight finish."""
        state = self._states[name]
        if state.removing and not draining:
            raise ValueError(f"backend {name} is being removed")
        state.draining = draining
        self._changed()

    def add(self, config: BackendConfig, draining: bool = False) -> BackendState:
        """A new backend, last in the tie-break order; unknown health until probed."""
        if config.name in self._states:
            raise ValueError(f"a backend named {config.name} exists already")
        index = max((s.index for s in self._states.values()), default=-1) + 1
        state = self._states[config.name] = _new_state(config, index)
        state.draining = draining
        self._changed()
        return state

    def revive(self, config: BackendConfig) -> BackendState:
        """A backend on its way out, wanted again (a reload that has it back): it stays,
        with its requests in flight and, where the server is the same, what it learned."""
        state = self._states[config.name]
        state.removing = state.draining = False
        self.reconfigure(config)
        return state

    def reorder(self, names: Sequence[str]) -> None:
        """Tie-break order as in the configuration; backends on their way out go last."""
        position = {name: i for i, name in enumerate(names)}
        for state in self._states.values():
            state.index = position.get(state.name, len(names) + state.index)
        self._changed()

    def remove(self, name: str) -> bool:
        """Drain the backend and drop it once nothing is in flight there; True when it is
        gone now, False when it leaves with its last request."""
        state = self._states[name]
        state.draining = state.removing = True
        if state.in_flight == 0:
            self._drop(state)
        self._changed()
        return name not in self._states

    def reconfigure(self, config: BackendConfig) -> None:
        """Apply a changed `[[backends]]` entry to the live state. Requests in flight keep
        their slots; what was learned is kept unless the backend is another server now
        (a new URL or engine kind), which starts from scratch."""
        state = self._states[config.name]
        fresh = _new_state(config, state.index)
        if state.config.url != config.url or state.config.kind != config.kind:
            state.health, state.health_detail = fresh.health, fresh.health_detail
            state.discovered, state.stats = fresh.discovered, fresh.stats
            self._end_ejection(state)
        state.config, state.adapter = config, fresh.adapter
        state.upstream_key, state.tls = fresh.upstream_key, fresh.tls
        self._changed()

    def end_ejection(self, name: str) -> None:
        """Return an ejected backend to routing now (an operator's call)."""
        self._end_ejection(self._states[name])
        self._changed()

    def close(self) -> None:
        """Cancel the pending ends of backoffs (at shutdown)."""
        for state in self._states.values():
            self._cancel_expiry(state)

    def _end_ejection(self, state: BackendState) -> None:
        self._cancel_expiry(state)
        state.outlier.reset()

    def _cancel_expiry(self, state: BackendState) -> None:
        if state.expiry is not None:
            state.expiry.cancel()
            state.expiry = None

    def _drop(self, state: BackendState) -> None:
        self._end_ejection(state)
        del self._states[state.name]

    def _changed(self, notify: bool = True) -> None:
        self._snapshot = None
        if notify:
            for listener in tuple(self._listeners):
                listener()


def _new_state(config: BackendConfig, index: int) -> BackendState:
    key = os.environ.get(config.api_key_env) if config.api_key_env else None
    return BackendState(config=config, adapter=ADAPTERS[config.kind], index=index,
                        upstream_key=key, tls=client_context(config))
