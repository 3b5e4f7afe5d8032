"""Helpers for servers started on this machine (the demo, the benchmarks, the tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


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


def spawn(cmd: list[str], log: Path, cwd: Path, cpus: set[int] | None = None,
          env: dict[str, str] | None = None, new_session: bool = False,
          ) -> subprocess.Popen[bytes]:
    """Start a server with its output in `log`, on `cpus` if given (see pin())."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=new_session,
                            preexec_fn=None if cpus is None else
                            (lambda: os.sched_setaffinity(0, cpus)))


def pin(pinned: bool) -> set[int]:
    """Pinned (the default with 2+ CPUs), the server under test gets the first CPU and this
    process, so every tool it starts, the others: a tool that needs more CPU than it has
    then shows as its own ceiling instead of taking CPU from the server (unpinned on 2
    cores, the tools disagreed by 5-18% at 32 concurrent on the fast servers). Returns the
    servers' CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pinned or len(cpus) < 2:
        print(f"servers and tools share CPUs {cpus}", file=sys.stderr)
        return set(cpus)
    os.sched_setaffinity(0, set(cpus[1:]))
    print(f"servers on CPU {cpus[0]}, tools on CPUs {cpus[1:]}", file=sys.stderr)
    return {cpus[0]}


def metric_sums(url: str) -> dict[str, float]:
    """Every sample of a server's /metrics, summed over label sets."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values
