"""Room for the file descriptors the proxy may need: each client connection can hold an
upstream one, so `server.max_connections` wants about twice as many descriptors. Many
systems start processes with a soft limit of 1024; it is raised towards the hard limit
at start-up, as nginx's `worker_rlimit_nofile` does, and a shortfall is logged."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("sluiceway.server")

SPARE = 256  # the listening sockets, the admin plane, probes, logs, Python itself


def ensure_room(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to fit `max_connections`; return the limit in force."""
    needed = 2 * max_connections + SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open-file limit %d is below the %d that server.max_connections = %d "
                    "may need; lower it or raise the limit", soft, needed, max_connections)
    return int(soft)
