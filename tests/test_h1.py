"""The data plane's HTTP/1.1 client against real loopback servers (on uvloop, as served)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from loadgen.local import free_port
from proxy.h1 import (
    HIGH_WATER,
    BadHeader,
    BadResponse,
    ConnectFailed,
    Dropped,
    H1Client,
    Stalled,
    parse_url,
)


def run(main: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(main, 20))


class Server:
    """A raw loopback server that counts connections and reads each request whole."""

    def __init__(self, reply: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()  # handlers still running are cancelled when the loop ends

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1/chat"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.reply(self, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()


def paced(*pieces: bytes, head: bytes = b"transfer-encoding: chunked",
          pause_s: float = 0.05, then_s: float = 1.0
          ) -> Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A reply: a 200 head with `head`, then each piece after a pause, then the connection
    held open for `then_s`."""
    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n")
        await writer.drain()
        for piece in pieces:
            await asyncio.sleep(pause_s)
            writer.write(piece)
            await writer.drain()
        await asyncio.sleep(then_s)
    return reply


class Bulk:
    """A reply of `total` bytes in 64 KiB pieces, as fast as the client takes them, framed by
    Content-Length or chunked; `written` counts the body bytes the socket has accepted."""

    def __init__(self, total: int, chunked: bool) -> None:
        self.total = total
        self.chunked = chunked
        self.written = 0

    async def __call__(self, server: Server, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        framing = b"transfer-encoding: chunked" if self.chunked \
            else b"content-length: %d" % self.total
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n")
        piece = b"x" * 65536
        while self.written < self.total:
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece) if self.chunked else piece)
            await writer.drain()
            self.written += len(piece)
        if self.chunked:
            writer.write(b"0\r\n\r\n")


async def keep_alive_ok(server: Server, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    while await server.read_request(reader) is not None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 11\r\n\r\n{\"ok\":true}")
        await writer.drain()


def test_requests_reuse_one_keep_alive_connection() -> None:
    async def main() -> None:
        async with Server(keep_alive_ok) as server:
            client = H1Client(connect_timeout_s=2)
            target = parse_url(server.url)
            for _ in range(5):
                response = await client.request(target, b'{"a":1}', {"x-request-id": "r1"})
                assert (response.status, await response.read()) == (200, b'{"ok":true}')
                assert response.headers["content-type"] == "application/json"
                client.release(response)
            assert server.connections == 1
            assert client.idle_count() == 1
            first = server.requests[0]
            assert first.startswith(b"POST /v1/chat HTTP/1.1\r\n")
            assert f"host: 127.0.0.1:{target.port}\r\n".encode() in first
            assert b"x-request-id: r1\r\ncontent-length: 7\r\n\r\n{\"a\":1}" in first
            await client.close()
    run(main())


def test_chunked_body_reaches_the_reader_piece_by_piece() -> None:
    go_on = asyncio.Event()

    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"9\r\ndata: one\r\n")
        await go_on.wait()
        writer.write(b"9\r\ndata: two\r\n0\r\n\r\n")
        await writer.drain()
        await server.read_request(reader)

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            assert await response.readany() == b"data: one"  # before the rest was sent
            assert not response.complete
            go_on.set()
            assert await response.read() == b"data: two"
            assert response.complete
            client.release(response)
            assert client.idle_count() == 1
            await client.close()
    run(main())


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",  # length from the connection's end
    b"HTTP/1.0 200 OK\r\ncontent-length: 11\r\n\r\n",  # HTTP/1.0 without keep-alive
    b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\n",
])
def test_a_connection_the_server_will_close_is_not_reused(head: bytes) -> None:
    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(head + b"hello world")
        await writer.drain()

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            for _ in range(2):
                response = await client.request(parse_url(server.url), b"{}", {})
                assert await response.read() == b"hello world"
                client.release(response)
            assert server.connections == 2
            assert client.idle_count() == 0
            await client.close()
    run(main())


@pytest.mark.parametrize("body", [b"data: first\n\n", b""])
def test_request_returns_with_the_first_body_bytes_not_the_bare_head(body: bytes) -> None:
    """A streaming server sends its head at once and the first bytes after the prefill:
    the requester is woken once, when both are in (or when an empty body has ended)."""
    reply = paced(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body), pause_s=0.3) if body \
        else paced(head=b"content-length: 0")

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            requesting = asyncio.create_task(
                client.request(parse_url(server.url), b"{}", {}))
            await asyncio.sleep(0.15)  # the head has had time to arrive, the body not
            assert requesting.done() is not bool(body)
            response = await requesting
            assert response.take() == body
            assert await response.read() == b""
            client.release(response)
            assert client.idle_count() == 1
            await client.close()
    run(main())


def test_informational_response_is_skipped() -> None:
    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n"
                     b"retry-after: 3\r\n\r\nok")
        await writer.drain()

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            assert (response.status, response.headers, await response.read()) == (
                201, {"content-length": "2", "retry-after": "3"}, b"ok")
            await client.close()
    run(main())


def test_refused_connection_is_connect_failed() -> None:
    async def main() -> None:
        client = H1Client(connect_timeout_s=2)
        with pytest.raises(ConnectFailed):
            await client.request(parse_url(f"http://127.0.0.1:{free_port()}/v1"), b"{}", {})
    run(main())


@pytest.mark.parametrize(("sent", "before_reply"), [
    (b"", True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial", False),
])
def test_connection_lost_early_is_dropped(sent: bytes, before_reply: bool) -> None:
    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(sent)
        await writer.drain()

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            with pytest.raises(Dropped) as caught:
                response = await client.request(parse_url(server.url), b"{}", {})
                assert await response.readany() == b"partial"
                await response.readany()
            assert caught.value.before_reply is before_reply
            assert client.idle_count() == 0
            await client.close()
    run(main())


def test_garbage_is_a_bad_response() -> None:
    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            with pytest.raises(BadResponse):
                await client.request(parse_url(server.url), b"{}", {})
            await client.close()
    run(main())


@pytest.mark.parametrize("headers", [{"authorization": "Bearer a\r\nx-evil: 1"},
                                     {"x-key": "caf\u00e9\u2603"}])
def test_a_header_that_cannot_be_sent_is_refused_before_connecting(
        headers: dict[str, str]) -> None:
    async def main() -> None:
        async with Server(keep_alive_ok) as server:
            client = H1Client(connect_timeout_s=2)
            with pytest.raises(BadHeader):
                await client.request(parse_url(server.url), b"{}", headers)
            assert server.connections == 0
    run(main())


def test_idle_connections_expire_and_server_closed_ones_are_forgotten() -> None:
    async def close_after_one(server: Server, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)  # then the server drops the idle connection

    async def main() -> None:
        async with Server(keep_alive_ok) as server:
            client = H1Client(connect_timeout_s=2, keepalive_s=0.05)
            for _ in range(2):
                response = await client.request(parse_url(server.url), b"{}", {})
                await response.read()
                client.release(response)
                await asyncio.sleep(0.1)
            assert server.connections == 2  # the first was idle past keep-alive
            await client.close()
        async with Server(close_after_one) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            await response.read()
            client.release(response)
            assert client.idle_count() == 1
            for _ in range(100):
                if client.idle_count() == 0:
                    break
                await asyncio.sleep(0.01)
            assert client.idle_count() == 0
            await client.close()
    run(main())


def test_a_reader_that_falls_behind_stops_the_socket_being_read() -> None:
    total = 64 * HIGH_WATER
    bulk = Bulk(total, chunked=False)

    async def main() -> None:
        async with Server(bulk) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            await asyncio.sleep(0.5)  # the reader takes nothing meanwhile
            stalled_at = bulk.written
            assert stalled_at < total / 2, stalled_at  # held back by the paused socket
            received = 0
            while chunk := await response.readany():
                received += len(chunk)
            assert (received, bulk.written) == (total, total)
            client.release(response)
            assert client.idle_count() == 1
            await client.close()
    run(main())


def test_discarding_a_response_closes_its_connection_at_once() -> None:
    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nping\r\n")
        await writer.drain()
        assert await reader.read() == b""  # the client went away
        server.closed_by_peer.set()

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            assert await response.readany() == b"ping"
            client.discard(response)
            await asyncio.wait_for(server.closed_by_peer.wait(), 2)
            assert client.idle_count() == 0
            await client.close()
    run(main())


def test_parse_url() -> None:
    target = parse_url("http://localhost:8080/v1/chat/completions?x=1")
    assert (target.scheme, target.host, target.port, target.path, target.host_header) == (
        "http", "localhost", 8080, b"/v1/chat/completions?x=1", b"localhost:8080")
    assert parse_url("https://api.example.com/v1").host_header == b"api.example.com"
    assert parse_url("http://[::1]:9000").host_header == b"[::1]:9000"
    with pytest.raises(ValueError):
        parse_url("ftp://example.com/")


def test_idle_watch_fails_a_stalled_body_but_not_a_slow_steady_one() -> None:
    async def reply(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(10):  # 10 chunks 50 ms apart: never idle for 150 ms
            writer.write(b"4\r\ntick\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        await asyncio.sleep(5)  # then silence

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            response.watch_idle(0.15)
            loop = asyncio.get_running_loop()
            received, started = b"", loop.time()
            with pytest.raises(Stalled):
                while chunk := await response.readany():
                    received += chunk
            assert received == b"tick" * 10
            assert 0.45 + 0.15 <= loop.time() - started < 2.0
            client.discard(response)
            await client.close()
    run(main())


def test_relay_hands_reads_to_the_sink_which_can_pause_and_resume_the_socket() -> None:
    total = 64 * HIGH_WATER
    bulk = Bulk(total, chunked=True)

    async def main() -> None:
        async with Server(bulk) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            response.watch_idle(0.2)  # a paused relay is a slow client, not a stalled upstream
            received: list[int] = []
            holding = True

            def sink(data: bytes) -> None:
                received.append(len(data))
                if holding and sum(received) >= HIGH_WATER:
                    response.pause()  # as the proxy does when its client's socket is full

            relaying = asyncio.create_task(response.relay(sink))
            await asyncio.sleep(0.6)
            assert not relaying.done()
            assert bulk.written < total / 2 and sum(received) < total / 2
            holding = False
            response.resume()
            last = await relaying  # what came with the end of the body, not sunk
            assert sum(received) + len(last) == total and bulk.written == total
            client.release(response)
            assert client.idle_count() == 1
            await client.close()
    run(main())


def test_relay_returns_the_bytes_that_came_with_the_end_of_the_body() -> None:
    """So the proxy can write them together with the end of its own reply."""
    reply = paced(b"5\r\nfirst\r\n", b"4\r\nlast\r\n0\r\n\r\n")  # the last data + the end

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            sunk: list[bytes] = []
            assert await response.relay(sunk.append) == b"last"
            assert sunk == [b"first"]
            client.release(response)
            assert client.idle_count() == 1
            await client.close()
    run(main())


def test_an_error_in_the_sink_reaches_the_relaying_task() -> None:
    reply = paced(b"4\r\nboom\r\n", then_s=5)

    def sink(data: bytes) -> None:
        raise ValueError(data)

    async def main() -> None:
        async with Server(reply) as server:
            client = H1Client(connect_timeout_s=2)
            response = await client.request(parse_url(server.url), b"{}", {})
            with pytest.raises(ValueError, match="boom"):
                await response.relay(sink)
            client.discard(response)
            await client.close()
    run(main())
