"""The HTTP server under slowloris clients and connection floods: heads time out, the
connection limit holds, memory stays bounded, and normal clients keep being served."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from tests.conftest import Launcher, backend
from tests.processes import Server
from tests.test_failures import metric, rss_mb

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 70\r\n"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def limited(launch: Launcher, **server: float) -> Server:
    up = launch.upstream("up")
    return launch.proxy([backend("up", up, models=["m"])], server=server)


def served(proxy: Server) -> int:
    return httpx.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=10).status_code


@contextmanager
def slowloris(proxy: Server, count: int, byte_every_s: float) -> Iterator[list[bytes]]:
    """`count` connections that send a request head one byte every `byte_every_s` and
    never finish it; yields what each received, filled in as they are closed."""
    received = [b""] * count
    stop = threading.Event()

    def one(i: int, sock: socket.socket) -> None:
        sock.settimeout(byte_every_s)
        for byte in HEAD:
            if stop.is_set():
                return
            try:
                sock.sendall(bytes([byte]))
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            received[i] += data
            if not data:
                return
            # an answer came: read to the close
            while chunk := _recv(sock):
                received[i] += chunk
            return

    with ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection((
            "127.0.0.1", proxy.port), timeout=5)) for _ in range(count)]
        threads = [threading.Thread(target=one, args=(i, s), daemon=True)
                   for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        try:
            yield received
        finally:
            stop.set()
            for t in threads:
                t.join(10)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except OSError:
        return b""


def test_slowloris_heads_time_out_with_408_while_normal_clients_are_served(
        launch: Launcher) -> None:
    proxy = limited(launch, head_timeout_s=1, max_connections=256)
    with slowloris(proxy, 64, byte_every_s=0.25) as received:
        started = time.monotonic()
        latencies = []
        while time.monotonic() - started < 2.5:
            t0 = time.monotonic()
            assert served(proxy) == 200
            latencies.append(time.monotonic() - t0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(received):
            time.sleep(0.1)
    assert len(latencies) >= 5 and max(latencies) < 1.0
    # every slow client got its 408 within about the head timeout, and was closed
    assert all(r.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in r for r in received)
    assert metric(proxy.url, "sluiceway_client_connections ") <= 2


def test_a_silent_connection_is_closed_at_the_head_timeout(launch: Launcher) -> None:
    proxy = limited(launch, head_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed, with nothing to say: no request began
        assert 0.4 < time.monotonic() - started < 3


def test_the_connection_limit_turns_newcomers_away_and_recovers(launch: Launcher) -> None:
    proxy = limited(launch, head_timeout_s=2, max_connections=16)
    with slowloris(proxy, 16, byte_every_s=0.2):
        time.sleep(0.5)  # every one of them is mid-head: none can be reclaimed
        resp = httpx.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=10)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["code"] == "busy"
    # the slow heads time out and free their places
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if served(proxy) == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    assert served(proxy) == 200
    assert metric(proxy.url, "sluiceway_client_connections_refused_total") >= 1


def test_a_flood_of_idle_connections_is_reclaimed_and_memory_stays_bounded(
        launch: Launcher) -> None:
    proxy = limited(launch, head_timeout_s=30, max_connections=64)
    assert served(proxy) == 200
    before = rss_mb(proxy.proc.pid)
    for _ in range(5):
        with ExitStack() as stack:
            for _ in range(400):  # silent connections: reclaimed for newer ones
                stack.enter_context(socket.create_connection(("127.0.0.1", proxy.port),
                                                             timeout=5))
            assert served(proxy) == 200  # a real client still gets in
            assert metric(proxy.url, "sluiceway_client_connections ") <= 64
    grown = rss_mb(proxy.proc.pid) - before
    assert grown < 20, f"RSS grew {grown:.1f} MB over 2,000 connections"
