"""Helpers for servers started on this machine (the demo, the benchmarks, the tests)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None,
              timeout_s: float = 30) -> None:
    """Poll until `url` answers 2xx; fail early if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


def proxy_head(policy: str) -> str:
    """The start of a `sluiceway serve` config for a local benchmark: no access log, the
    policy, health read every second (the [[backends]] follow)."""
    return f"""[server]
access_log = false
[routing]
policy = "{policy}"
[health]
interval_s = 1
"""
