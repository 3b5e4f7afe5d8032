"""Debian programs some tests drive: Chromium (the admin page), promtool (/metrics),
nginx (an ingress that times out silent responses) and redis-server (the replicas' shared
state).

    python -m tests.debian_tools      # installs what is missing (apt-get, as root)
"""

from __future__ import annotations

from tests.machine import ensure_debian_packages

TOOLS = {"chromium": "chromium", "promtool": "prometheus", "nginx": "nginx-light",
         "redis-server": "redis-server"}


def ensure() -> None:
    ensure_debian_packages(TOOLS, "debian tools")


if __name__ == "__main__":
    ensure()
