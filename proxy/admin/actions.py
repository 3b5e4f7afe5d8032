"""What an operator can change while the gateway serves, each logged and counted once.

The admin routes and SIGHUP both come through here; problems are raised as `ActionError`
with a reason (`not_found`, `conflict`, `rejected`) that the admin app turns into a status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from backends.config import BackendConfig
from backends.state import BackendState
from proxy.gateway import Gateway
from proxy.reload import Changes
from proxy.settings import ConfigError, Settings

log = logging.getLogger("sluiceway.admin")

Reason = Literal["not_found", "conflict", "rejected", "unauthorized"]


class ActionError(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Actions:
    def __init__(self, gateway: Gateway, reread: Callable[[], Settings] | None) -> None:
        self._gateway = gateway
        self._reread = reread  # the config file, as at start; None: started without one

    def backend(self, name: str) -> BackendState:
        if name not in self._gateway.pool:
            raise ActionError("not_found", f"no backend named {name!r}")
        return self._gateway.pool[name]

    async def drain(self, name: str, draining: bool, wait_s: float) -> BackendState:
        action = "drain" if draining else "undrain"
        with self._counted(action):
            state = self.backend(name)
            if state.removing:
                raise ActionError("conflict", f"backend {name} is being removed")
            everywhere = await self._gateway.drain(name, draining)
            log.info("backend %s %s (%d in flight)", name,
                     "drained" if draining else "back in rotation", state.in_flight)
            if not everywhere:
                log.warning("backend %s: Redis unreachable, so only this replica has it %s",
                            name, "drained" if draining else "back in rotation")
        if draining and wait_s > 0:
            await self._gateway.wait_idle(name, wait_s)
        return state

    def readmit(self, name: str) -> BackendState:
        """End an ejection now: the backend takes requests again (its next failures count
        from zero)."""
        with self._counted("readmit"):
            state = self.backend(name)
            was = state.outlier.state.value
            self._gateway.pool.end_ejection(name)
            log.info("backend %s readmitted by an operator (was %s)", name, was)
        return state

    async def add(self, config: BackendConfig) -> BackendState:
        with self._counted("add"):
            if config.name in self._gateway.pool:
                raise ActionError("conflict", f"a backend named {config.name} exists already")
            state = await self._gateway.add(config)
            log.info("backend %s added (%s, %s): %s", config.name, config.kind.value,
                     config.base_url, state.health.value)
            return state

    async def remove(self, name: str, wait_s: float) -> tuple[bool, int]:
        """Drain and remove; (gone now, requests still in flight)."""
        with self._counted("remove"):
            state = self.backend(name)
            if len(self._gateway.pool) == 1:
                raise ActionError("conflict", "the last backend cannot be removed; add "
                                  "its replacement first")
            log.info("removing backend %s (%d in flight)", name, state.in_flight)
            gone = await self._gateway.remove(name, wait_s)
            return gone, 0 if gone else state.in_flight

    async def reload(self, trigger: str) -> Changes:
        """Re-read the config file and apply it; an invalid one leaves everything as is."""
        with self._counted("reload"):
            if self._reread is None:
                raise ActionError("conflict", "the gateway was not started from a config file")
            try:
                settings = self._reread()
            except ConfigError as exc:
                log.error("reload (%s) rejected; the running configuration stays: %s",
                          trigger, exc)
                raise ActionError("rejected", str(exc)) from None
            changes = await self._gateway.apply(settings)
            log.info("reloaded the configuration (%s): %s", trigger, changes.summary())
            if changes.restart_needed:
                log.warning("reload: [%s] changed; that takes a restart, the running values "
                            "stay", "], [".join(changes.restart_needed))
            return changes

    def _counted(self, action: str) -> _Counted:
        return _Counted(self._gateway, action)


class _Counted:
    """Counts the action once, by how it ended."""

    def __init__(self, gateway: Gateway, action: str) -> None:
        self._gateway = gateway
        self._action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> None:
        if kind is None:
            result = "ok"
        elif isinstance(exc, ActionError):
            result = exc.reason
        else:
            result = "error"
        self._gateway.metrics.admin_actions.labels(self._action, result).inc()
