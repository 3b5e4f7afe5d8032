"""`sluiceway serve` as a real process on SIGTERM: a stream in flight finishes within the
grace and the process exits 0; past the grace the stream is cut, logged as 499, and the
exit is still clean. Also: a configured cap below the discovered slots holds under load."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import Launcher, backend
from tests.probes import access_records, wait_for
from tests.processes import Server


def stream_after_sigterm(proxy: Server, tokens: int) -> tuple[list[bytes], BaseException | None]:
    """Start a stream, send the proxy SIGTERM once its first event is in, read the rest."""
    lines: list[bytes] = []
    error: BaseException | None = None
    body = {"model": "m", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hi"}]}
    try:
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body,
                          timeout=20) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    lines.append(line.encode())
                    if len(lines) == 1:
                        proxy.proc.send_signal(signal.SIGTERM)
    except httpx.HTTPError as exc:  # the cut of a stream past the grace
        error = exc
    return lines, error


def test_sigterm_lets_a_stream_finish_and_exits_0(launch: Launcher) -> None:
    up = launch.upstream("up", token_delay_ms=40)  # 25 tokens: a 1 s stream
    proxy = launch.proxy([backend("up", up, models=["m"])], server={"shutdown_grace_s": 10})
    lines, error = stream_after_sigterm(proxy, 25)
    assert error is None
    assert len(lines) == 26 and lines[-1] == b"data: [DONE]"  # every token, then the end
    assert proxy.proc.wait(10) == 0
    (record,) = access_records(proxy)
    assert record["status"] == 200 and record["outcome"] == "ok"
    assert record["output_tokens"] == 25


def test_past_the_grace_the_stream_is_cut_logged_499_and_the_exit_is_clean(
        launch: Launcher) -> None:
    up = launch.upstream("up", token_delay_ms=100)  # 40 tokens: a 4 s stream
    proxy = launch.proxy([backend("up", up, models=["m"])], server={"shutdown_grace_s": 0.5})
    lines, _ = stream_after_sigterm(proxy, 40)
    assert 1 <= len(lines) < 20 and b"[DONE]" not in lines[-1]
    assert proxy.proc.wait(10) == 0
    (record,) = access_records(proxy)
    assert record["status"] == 499 and record["outcome"] == "client_closed"
    # and the upstream request was closed, not left generating
    wait_for(lambda: up.get("/_stats")["active"] == 0, timeout_s=3)


def test_a_configured_cap_below_the_discovered_slots_holds_under_load(
        launch: Launcher) -> None:
    llama = launch.upstream("llama", slots=8, token_delay_ms=10)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp", models=["m"],
                                  max_concurrency=3)])
    barrier = threading.Barrier(12)

    def one(_: int) -> int:
        barrier.wait(10)
        reply = httpx.post(proxy.url + "/v1/chat/completions", timeout=30, json={
            "model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]})
        return reply.status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(one, range(12)))
    assert statuses == [200] * 12
    stats = llama.get("/_stats")
    assert stats["requests"] == 12 and stats["max_active"] == 3  # never 4, though 8 slots
