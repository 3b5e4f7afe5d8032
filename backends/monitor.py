"""Background probing: health, model discovery, capacity discovery and load scraping.

One round probes every backend concurrently, each bounded by the health timeout. A probe
that fails part-way keeps what earlier rounds discovered. Between rounds, backends that
are failing (down, ejected, or with failures in a row) are probed every `failing_s`, so a
hung or dead backend is ejected within seconds (each failed probe counts towards ejection:
backends/outlier.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from backends.pool import Pool
from backends.snapshot import Health
from backends.state import BackendState, Discovered

log = logging.getLogger("sluiceway.monitor")

_PROBE_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)


class Monitor:
    def __init__(
        self, pool: Pool, session: aiohttp.ClientSession, interval_s: float, timeout_s: float,
        failing_s: float | None = None,
    ) -> None:
        self._pool = pool
        self._session = session
        self.configure(interval_s, timeout_s, failing_s)

    def configure(self, interval_s: float, timeout_s: float,
                  failing_s: float | None = None) -> None:
        """New probe intervals and timeout, from the next round on (a reload)."""
        self._interval_s, self._timeout_s = interval_s, timeout_s
        self._failing_s = min(interval_s, failing_s or interval_s)

    async def run(self) -> None:
        """Probe forever; the gateway cancels this task at shutdown."""
        loop = asyncio.get_running_loop()
        next_round = loop.time() + self._interval_s
        while True:
            await asyncio.sleep(max(0.0, min(self._failing_s, next_round - loop.time())))
            if loop.time() >= next_round - 1e-3:
                await self.probe_all()
                next_round = loop.time() + self._interval_s
            else:
                failing = [state for state in self._pool if state.failing]
                await asyncio.gather(*(self.probe(state) for state in failing))

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(state) for state in self._pool))

    async def probe(self, state: BackendState) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                health, detail = await self._health(state)
                discovered = await self._discover(state) if health is Health.HEALTHY else None
        except _PROBE_ERRORS as exc:
            health, detail, discovered = Health.DOWN, _describe(exc), None
        if health is not state.health:
            log.info("backend %s is %s %s", state.name, health.value, detail)
        self._pool.set_health(state.name, health, detail)
        if health is not Health.LOADING:  # loading is neither up nor failing
            self._pool.probed(state.name, health is Health.HEALTHY, detail)
        if discovered is not None:
            self._pool.set_discovered(state.name, discovered)

    async def _health(self, state: BackendState) -> tuple[Health, str]:
        async with self._get(state, state.adapter.health_path) as resp:
            await resp.read()
            if resp.status == 200:
                return Health.HEALTHY, ""
            if resp.status in state.adapter.loading_statuses:
                return Health.LOADING, f"HTTP {resp.status} on {state.adapter.health_path}"
            return Health.DOWN, f"HTTP {resp.status} on {state.adapter.health_path}"

    async def _discover(self, state: BackendState) -> Discovered:
        found = replace(state.discovered)
        adapter = state.adapter
        with contextlib.suppress(*_PROBE_ERRORS):
            models = await self._json(state, adapter.models_path)
            entries = models.get("data", []) if isinstance(models, dict) else []
            found.models = tuple(str(m["id"]) for m in entries if "id" in m)
            found.models_listed = True
            lengths = [
                m["max_model_len"] for m in entries if isinstance(m.get("max_model_len"), int)
            ]
            found.max_model_len = lengths[0] if lengths else found.max_model_len
        if adapter.capacity_path and adapter.capacity_field:
            with contextlib.suppress(*_PROBE_ERRORS):
                props = await self._json(state, adapter.capacity_path)
                slots = props.get(adapter.capacity_field) if isinstance(props, dict) else None
                if isinstance(slots, int) and slots > 0:
                    found.capacity = slots
                context = _dig(props, adapter.context_field)
                if isinstance(context, int) and context > 0 and adapter.context_field:
                    found.max_model_len = context
        with contextlib.suppress(*_PROBE_ERRORS):
            await self._scrape_load(state, found)
        return found

    async def _scrape_load(self, state: BackendState, found: Discovered) -> None:
        adapter = state.adapter
        if adapter.metrics_path and found.metrics_available:
            async with self._get(state, adapter.metrics_path) as resp:
                if resp.status == 200:
                    gauges = _read_gauges(await resp.text(), adapter.load_gauges)
                    running, waiting = gauges.get("running"), gauges.get("waiting")
                    found.running = None if running is None else int(running)
                    found.waiting = None if waiting is None else int(waiting)
                    found.kv_cache_usage = gauges.get("kv_cache")
                    return
                found.metrics_available = resp.status not in (404, 501)
        if adapter.slots_path:
            slots = await self._json(state, adapter.slots_path)
            if isinstance(slots, list):
                found.running = sum(1 for s in slots if s.get("is_processing"))

    def _get(self, state: BackendState, path: str) -> Any:
        headers = {"Authorization": f"Bearer {state.upstream_key}"} if state.upstream_key else {}
        return self._session.get(state.config.base_url + path, headers=headers,
                                 ssl=state.tls or True)

    async def _json(self, state: BackendState, path: str) -> Any:
        async with self._get(state, path) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} on {path}")
            return orjson.loads(await resp.read())


def _read_gauges(text: str, wanted: Mapping[str, str]) -> dict[str, float]:
    """The wanted gauges, over every series (vLLM has one per engine): request counts are
    summed, the KV-cache fraction is the fullest engine's."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = wanted.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name != family.name:
                continue
            if field == "kv_cache":
                totals[field] = max(totals.get(field, 0.0), sample.value)
            else:
                totals[field] = totals.get(field, 0.0) + sample.value
    return totals


def _dig(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "probe timed out"
    return f"{type(exc).__name__}: {exc}"[:200]
