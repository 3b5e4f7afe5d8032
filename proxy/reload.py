"""What a new configuration changes, compared with the running one (a pure diff).

`plan` is applied by `Gateway.apply`: backends added, removed (drained, then dropped when
their last request ends) or changed (learned state kept unless the URL or kind changed),
and the routing, health and timeout settings for requests from then on. The `[server]`
and `[admin]` sections hold listening sockets and the data plane's keys, and `[cluster]`
the Redis connection every replica agrees on: a change there needs a restart, and is
reported rather than half-applied.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.config import BackendConfig
from proxy.settings import Settings

RESTART_SECTIONS = ("server", "admin", "cluster")


@dataclass(frozen=True, slots=True)
class Changes:
    added: tuple[BackendConfig, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[BackendConfig, ...] = ()
    order: tuple[str, ...] = ()  # every backend of the new config, in its order
    routing: bool = False
    health: bool = False
    timeouts: bool = False
    models: bool = False  # [models.aliases]
    restart_needed: tuple[str, ...] = ()  # sections that changed but apply only at start

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.routing or self.health
                    or self.timeouts or self.models or self.restart_needed)

    def summary(self) -> dict[str, list[str] | bool]:
        return {
            "added": [b.name for b in self.added],
            "removed": list(self.removed),
            "changed": [b.name for b in self.changed],
            "routing": self.routing,
            "health": self.health,
            "timeouts": self.timeouts,
            "models": self.models,
            "restart_needed": list(self.restart_needed),
        }


def plan(old: Settings, new: Settings) -> Changes:
    before = {b.name: b for b in old.backends}
    after = {b.name: b for b in new.backends}
    return Changes(
        added=tuple(b for name, b in after.items() if name not in before),
        removed=tuple(name for name in before if name not in after),
        changed=tuple(b for name, b in after.items() if name in before and before[name] != b),
        order=tuple(after),
        routing=old.routing != new.routing,
        health=old.health != new.health,
        timeouts=old.timeouts != new.timeouts,
        models=old.models != new.models,
        restart_needed=tuple(s for s in RESTART_SECTIONS
                             if getattr(old, s, None) != getattr(new, s, None)),
    )
