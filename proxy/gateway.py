"""Everything the app owns between start-up and shutdown (started and stopped by
`proxy.app.serve`), and the changes an operator makes to it while it runs (the admin
plane and SIGHUP call these): drain, add, remove, apply a new configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import aiohttp

from backends.config import BackendConfig
from backends.monitor import Monitor
from backends.pool import Pool
from backends.state import BackendState
from cluster.replica import Cluster
from policies import POLICIES, Policy, PolicyConfig
from proxy.admission import Admission
from proxy.aliases import Aliases
from proxy.calibrate import Calibrator
from proxy.forward import Forwarder
from proxy.metrics import Metrics
from proxy.reload import Changes, plan
from proxy.settings import RoutingSettings, Settings
from proxy.upstream import Upstream, make_client

log = logging.getLogger("sluiceway.gateway")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = Pool(settings.backends, settings.health.ejection)
        self.aliases = Aliases(settings.models.aliases)
        routing = settings.routing
        self.policy = _policy(routing)
        # several replicas share capacity, learning and sessions through Redis
        self.cluster = Cluster(settings.cluster, self.pool) if settings.cluster.enabled \
            else None
        self.admission = Admission(
            self.pool, self.policy, routing.queue_size, routing.queue_timeout_s, self.cluster
        )
        self.metrics = Metrics(self.pool, lambda: self.admission.depth, self.cluster)
        self._data = make_client(settings.timeouts, self.pool)
        self._control = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.health.timeout_s)
        )
        self._upstream = upstream = Upstream(self._data, settings.timeouts)
        self.forwarder = Forwarder(
            self.pool, self.admission, upstream, self.metrics, routing.max_attempts,
            routing.clamp_max_tokens, settings.server.stream_keepalive_s,
        )
        health = settings.health
        self.monitor = Monitor(self.pool, self._control, health.interval_s, health.timeout_s,
                               health.failing_interval_s)
        self.pool.on_eject(self._abandon_waiting)
        self.calibrator = Calibrator(self.pool, self.admission, upstream,
                                     routing.calibrate_tokens)
        self._tasks: list[asyncio.Task[None]] = []
        self._reconfiguring = asyncio.Lock()  # one change to the backend set at a time

    @classmethod
    async def start(cls, settings: Settings) -> Gateway:
        gateway = cls(settings)
        await gateway.monitor.probe_all()  # know who is up before taking traffic
        if gateway.cluster is not None:
            await gateway.cluster.start()  # the other replicas' load, and what they learned
        await gateway.calibrator.round()  # and how fast each one is (unless learned)
        gateway._tasks.append(asyncio.create_task(gateway.monitor.run(), name="monitor"))
        gateway._tasks.append(asyncio.create_task(gateway._calibrate_later(),
                                                  name="calibrate"))
        return gateway

    async def _calibrate_later(self) -> None:
        """Backends that were down or loading at start are calibrated once they are up."""
        while True:
            await asyncio.sleep(self.settings.health.interval_s)
            await self.calibrator.round()

    # --- changes at run time -------------------------------------------------------------

    async def drain(self, name: str, draining: bool = True) -> bool:
        """Route no new requests to `name` (or again, with False); in flight ones finish.
        With several replicas, all of them do (False: Redis unreachable, this one only)."""
        self.pool.set_draining(name, draining)
        if self.cluster is not None:
            return await self.cluster.drain(name, draining)
        return True

    async def add(self, config: BackendConfig) -> BackendState:
        """Add a backend: probed and calibrated before it takes traffic, as at start-up."""
        async with self._reconfiguring:
            return await self._add(config)

    async def remove(self, name: str, timeout_s: float) -> bool:
        """Drain `name` and drop it when its last request ends; wait up to `timeout_s`
        for that. True when it is gone; False: still finishing, and it leaves by itself."""
        async with self._reconfiguring:
            self.pool.remove(name)
            self.settings = self.settings.model_copy(update={
                "backends": tuple(b for b in self.settings.backends if b.name != name)})
        return await self.wait_gone(name, timeout_s)

    async def wait_gone(self, name: str, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a removed backend's last request to end."""
        return await self._wait_for(lambda: name not in self.pool, timeout_s)

    async def wait_idle(self, name: str, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for nothing to be in flight on `name` (from any replica)."""
        return await self._wait_for(
            lambda: name not in self.pool or self.pool[name].total_in_flight == 0, timeout_s)

    async def _wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        done = asyncio.Event()

        def check() -> None:
            if condition():
                done.set()

        self.pool.subscribe(check)  # told of every release
        try:
            check()
            async with asyncio.timeout(timeout_s):
                await done.wait()
        except TimeoutError:
            pass
        finally:
            self.pool.unsubscribe(check)
        return done.is_set()

    async def apply(self, new: Settings) -> Changes:
        """Apply a new configuration to new requests; streams in flight are untouched and
        unchanged backends keep what they learned. See proxy/reload.py."""
        async with self._reconfiguring:
            changes = plan(self.settings, new)
            for name in changes.removed:
                self.pool.remove(name)
            for config in changes.changed:
                self.pool.reconfigure(config)
                self._upstream.trust(self.pool[config.name])
            self.pool.reorder(changes.order)
            if changes.routing:
                self._configure_routing(new.routing)
            if changes.health:
                health = new.health
                self.monitor.configure(health.interval_s, health.timeout_s,
                                       health.failing_interval_s)
                self.pool.ejection = health.ejection
            if changes.timeouts:
                self._upstream.configure(new.timeouts)
            if changes.models:
                self.aliases = Aliases(new.models.aliases)
            # sections that need a restart keep their running values
            self.settings = new.model_copy(update={
                s: getattr(self.settings, s) for s in changes.restart_needed})
            for config in changes.added:
                await self._add(config)
            self.pool.reorder(changes.order)
        return changes

    async def _add(self, config: BackendConfig) -> BackendState:
        if config.name in self.pool and self.pool[config.name].removing:
            return self.pool.revive(config)  # removed, still finishing, and back in the file
        state = self.pool.add(config, draining=True)  # no traffic before probe + calibration
        self._upstream.trust(state)
        if config.name not in {b.name for b in self.settings.backends}:
            self.settings = self.settings.model_copy(
                update={"backends": (*self.settings.backends, config)})
        try:
            await self.monitor.probe(state)
            await self.calibrator.round()
        finally:
            if config.name in self.pool:
                self.pool.set_draining(config.name, False)
        return state

    def _abandon_waiting(self, state: BackendState, reason: str) -> None:
        """An ejected backend's requests still waiting for a first byte go elsewhere."""
        moved = self._upstream.abandon(state, reason)
        if moved:
            log.warning("%d requests waiting on backend %s go to other backends", moved,
                        state.name)

    def _configure_routing(self, routing: RoutingSettings) -> None:
        old = self.settings.routing
        if (routing.policy, routing.affinity) != (old.policy, old.affinity):
            self.policy = _policy(routing)  # a new policy starts its own state afresh
        self.admission.configure(self.policy, routing.queue_size, routing.queue_timeout_s)
        self.forwarder.max_attempts = routing.max_attempts
        self.forwarder.clamp_max_tokens = routing.clamp_max_tokens
        self.calibrator.tokens = routing.calibrate_tokens

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.pool.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self._data.close()
        await self._control.close()


def _policy(routing: RoutingSettings) -> Policy:
    return POLICIES[routing.policy](PolicyConfig(rng=random.Random(), affinity=routing.affinity))
