"""Everything the app owns between start-up and shutdown (started and stopped by
`proxy.app.serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import aiohttp

from backends.monitor import Monitor
from backends.pool import Pool
from policies import POLICIES, PolicyConfig
from proxy.admission import Admission
from proxy.calibrate import Calibrator
from proxy.forward import Forwarder
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.upstream import Upstream, make_client


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = Pool(settings.backends)
        routing = settings.routing
        self.policy = POLICIES[routing.policy](
            PolicyConfig(rng=random.Random(), affinity=routing.affinity)
        )
        self.admission = Admission(
            self.pool, self.policy, routing.queue_size, routing.queue_timeout_s
        )
        self.metrics = Metrics(self.pool, lambda: self.admission.depth)
        self._data = make_client(settings.timeouts, self.pool)
        self._control = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.health.timeout_s)
        )
        upstream = Upstream(self._data, settings.timeouts)
        self.forwarder = Forwarder(
            self.pool, self.admission, upstream, self.metrics, routing.max_attempts,
        )
        self.monitor = Monitor(
            self.pool, self._control, settings.health.interval_s, settings.health.timeout_s
        )
        self.calibrator = Calibrator(self.pool, upstream, routing.calibrate_tokens)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls, settings: Settings) -> Gateway:
        gateway = cls(settings)
        await gateway.monitor.probe_all()  # know who is up before taking traffic
        await gateway.calibrator.round()  # and how fast each one is
        gateway._tasks.append(asyncio.create_task(gateway.monitor.run(), name="monitor"))
        gateway._tasks.append(asyncio.create_task(gateway._calibrate_later(),
                                                  name="calibrate"))
        return gateway

    async def _calibrate_later(self) -> None:
        """Backends that were down or loading at start are calibrated once they are up."""
        while True:
            await asyncio.sleep(self.settings.health.interval_s)
            await self.calibrator.round()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._data.close()
        await self._control.close()
