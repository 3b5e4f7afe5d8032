"""Talking to servers from the tests: the openai SDK, Prometheus gauges, bounded polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import orjson
from openai import OpenAI

from loadgen.local import metric_sums
from tests.processes import Server


def gauges(server: Server) -> dict[str, float]:
    """Every sample of the server's /metrics, summed over label sets."""
    return metric_sums(server.url)


def access_records(proxy: Server) -> list[dict[str, Any]]:
    """The proxy's access log so far, one dict per request: once nothing is in flight, if
    it still runs. A client can have its whole reply (an SDK reads the last event, a CLI
    exits) a moment before the proxy has written the request's line: the proxy releases
    the backend's slot and logs in one step of its event loop, so an idle proxy has
    logged everything."""
    return [record for _, record in access_lines(proxy)]


def access_lines(proxy: Server) -> list[tuple[float, dict[str, Any]]]:
    """`access_records`, each with the wall-clock time its line was logged (the log
    format's asctime, set in proxy/cli.py)."""
    if proxy.proc.poll() is None:
        wait_for(lambda: _idle(proxy), timeout_s=15)
    out = []
    for line in proxy.output().splitlines():
        at = line.find('{"request_id"')
        if at >= 0:
            logged = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((logged, orjson.loads(line[at:])))
    return out


def _idle(proxy: Server) -> bool:
    try:
        return gauges(proxy).get("sluiceway_backend_in_flight", 0.0) == 0
    except httpx.HTTPError:
        return False


def wait_for(predicate: Callable[[], object], timeout_s: float = 5.0) -> float:
    """Poll until true; return how long it took; fail the test past the timeout."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


def sdk(target: Server | str, timeout: float = 30) -> OpenAI:
    """The official client on a server (or base URL), with no retries of its own."""
    url = target if isinstance(target, str) else target.url
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
