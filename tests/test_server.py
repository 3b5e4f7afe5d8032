"""The proxy's HTTP/1.1 server against raw loopback clients (on uvloop, as served)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
import pytest
import uvloop

from proxy.server import HttpServer, Reply, Request

Handler = Callable[[Request, Reply], Awaitable[None]]


def run(main: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(main, 20))


async def start(handler: Handler, max_body: int = 1 << 20, timeout_s: float = 75.0
                ) -> tuple[HttpServer, int]:
    server = HttpServer(handler, max_body=max_body, timeout_s=timeout_s)
    await server.listen("127.0.0.1", 0)
    return server, server.ports[0]


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One response: status, headers (lower-cased), and the body by its framing."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                   (line.partition(b":") for line in lines[1:] if line))
    if b"content-length" in headers:
        return status, headers, await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, bytes(body)
            body += data[:-2]
    return status, headers, await reader.read()


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%b\r\n%b"
            % (path, len(body), extra, body))


async def echo(request: Request, reply: Reply) -> None:
    reply.respond(200, orjson.dumps({"path": request.path, "query": request.query,
                                     "body": request.body.decode(),
                                     "oversized": request.oversized}),
                  ((b"content-type", b"application/json"),))


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def main() -> None:
        server, port = await start(echo)
        reader, writer = await connect(port)
        for i in range(3):
            writer.write(post(b"/v1/a%20b?x=1", b"hello %d" % i))
            status, headers, body = await read_response(reader)
            assert status == 200 and b"date" in headers and b"connection" not in headers
            assert orjson.loads(body) == {"path": "/v1/a b", "query": "x=1",
                                          "body": f"hello {i}", "oversized": False}
        writer.close()
        await server.shutdown(1)

    run(main())


def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow_first(request: Request, reply: Reply) -> None:
        await asyncio.sleep(0.2 if request.body == b"0" else 0)
        await echo(request, reply)

    async def main() -> None:
        server, port = await start(slow_first)
        reader, writer = await connect(port)
        writer.write(b"".join(post(b"/p", b"%d" % i) for i in range(5)))
        bodies = [orjson.loads((await read_response(reader))[2])["body"] for _ in range(5)]
        assert bodies == ["0", "1", "2", "3", "4"]
        writer.close()
        await server.shutdown(1)

    run(main())


async def streamer(request: Request, reply: Reply) -> None:
    reply.start(200, ((b"content-type", b"text/event-stream"),))
    for i in range(3):
        reply.write(b"data: %d\n\n" % i)
        await asyncio.sleep(0.01)
    reply.end(b"data: [DONE]\n\n")


def test_a_stream_is_chunked_and_the_connection_kept() -> None:
    async def main() -> None:
        server, port = await start(streamer)
        reader, writer = await connect(port)
        for _ in range(2):
            writer.write(post(b"/s", b"{}"))
            status, headers, body = await read_response(reader)
            assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
            assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        writer.close()
        await server.shutdown(1)

    run(main())


def test_a_stream_to_an_http_10_client_ends_with_the_connection() -> None:
    async def main() -> None:
        server, port = await start(streamer)
        reader, writer = await connect(port)
        writer.write(b"POST /s HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}")
        status, headers, body = await read_response(reader)
        assert status == 200 and headers[b"connection"] == b"close"
        assert b"transfer-encoding" not in headers
        assert body.endswith(b"data: [DONE]\n\n")  # read to EOF: the server closed
        await server.shutdown(1)

    run(main())


def test_head_gets_the_length_but_no_body() -> None:
    async def main() -> None:
        server, port = await start(echo)
        reader, writer = await connect(port)
        writer.write(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nGET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length: " in head
        status, _, body = await read_response(reader)  # the next response follows at once
        assert status == 200 and orjson.loads(body)["path"] == "/next"
        writer.close()
        await server.shutdown(1)

    run(main())


def test_an_oversized_body_is_answered_early_and_the_rest_read_before_closing() -> None:
    seen: list[Request] = []

    async def refuse(request: Request, reply: Reply) -> None:
        seen.append(request)
        reply.respond(413, b'{"error":"too big"}', ())

    async def main() -> None:
        server, port = await start(refuse, max_body=1000)
        for framing in (b"content-length: 500000\r\n", b"transfer-encoding: chunked\r\n"):
            reader, writer = await connect(port)
            writer.write(b"POST /big HTTP/1.1\r\nhost: x\r\n" + framing + b"\r\n")
            chunked = b"chunked" in framing
            for _ in range(50):  # 500 kB, sent after the answer may already be there
                piece = b"x" * 10_000
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert status == 413 and headers[b"connection"] == b"close"
            assert body == b'{"error":"too big"}'
            assert await reader.read() == b""  # then closed cleanly, not reset
            writer.close()
        assert [r.oversized for r in seen] == [True, True] and seen[0].body == b""
        await server.shutdown(1)

    run(main())


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
    (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431,
     "headers_too_large"),
])
def test_unparseable_requests_get_an_openai_error_and_a_close(
    raw: bytes, status: int, code: str
) -> None:
    async def main() -> None:
        server, port = await start(echo)
        reader, writer = await connect(port)
        writer.write(raw)
        got, headers, body = await read_response(reader)
        assert got == status and headers[b"connection"] == b"close"
        assert orjson.loads(body)["error"]["code"] == code
        assert await reader.read() == b""
        writer.close()
        await server.shutdown(1)

    run(main())


def test_expect_100_continue_gets_the_interim_answer() -> None:
    async def main() -> None:
        server, port = await start(echo)
        reader, writer = await connect(port)
        writer.write(b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                     b"expect: 100-continue\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        status, _, body = await read_response(reader)
        assert status == 200 and orjson.loads(body)["body"] == "{}"
        writer.close()
        await server.shutdown(1)

    run(main())


def test_a_disconnect_cancels_the_handler_which_sees_the_client_gone() -> None:
    outcome: list[bool] = []

    async def forever(request: Request, reply: Reply) -> None:
        reply.start(200, ())
        reply.write(b"first")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append(reply.gone)
            raise

    async def main() -> None:
        server, port = await start(forever)
        reader, writer = await connect(port)
        writer.write(post(b"/f", b""))
        await reader.readuntil(b"first")
        writer.transport.abort()
        for _ in range(100):
            if outcome:
                break
            await asyncio.sleep(0.01)
        assert outcome == [True]
        assert not server.connections
        await server.shutdown(1)

    run(main())


def test_handler_errors_become_500_and_the_connection_lives_on() -> None:
    async def broken(request: Request, reply: Reply) -> None:
        if request.path == "/raise":
            raise ValueError("bug")
        if request.path == "/silent":
            return  # never answered
        await echo(request, reply)

    async def main() -> None:
        server, port = await start(broken)
        reader, writer = await connect(port)
        writer.write(post(b"/raise", b""))
        status, _, body = await read_response(reader)
        assert status == 500 and orjson.loads(body)["error"]["code"] == "internal_error"
        writer.write(post(b"/ok", b"x"))
        assert (await read_response(reader))[0] == 200
        writer.write(post(b"/silent", b""))
        status, headers, _ = await read_response(reader)
        assert status == 500 and headers[b"connection"] == b"close"
        assert await reader.read() == b""
        await server.shutdown(1)

    run(main())


def test_idle_connections_and_slow_requests_time_out() -> None:
    async def main() -> None:
        server, port = await start(echo, timeout_s=0.2)
        reader, writer = await connect(port)
        writer.write(post(b"/x", b""))
        assert (await read_response(reader))[0] == 200
        assert await asyncio.wait_for(reader.read(), 2) == b""  # idle: closed
        reader, writer = await connect(port)
        writer.write(b"POST /x HTTP/1.1\r\nhost: h\r\ncontent-length: 10\r\n\r\nabc")  # unfinished
        late = await asyncio.wait_for(reader.read(), 2)  # then closed
        assert late.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in late
        await server.shutdown(1)

    run(main())


def test_write_backpressure_pauses_and_resumes() -> None:
    written: list[int] = []

    async def firehose(request: Request, reply: Reply) -> None:
        """Writes while the client keeps up, like the relay does with an upstream."""
        resumed = asyncio.Event()
        reply.on_resume(resumed.set)
        reply.start(200, ())
        piece = b"x" * 65536
        for _ in range(1024):  # 64 MiB if nothing stopped it
            reply.write(piece)
            written.append(len(piece))
            if reply.paused:
                resumed.clear()
                await resumed.wait()
        reply.end()

    async def main() -> None:
        server, port = await start(firehose)
        reader, writer = await connect(port)
        writer.write(post(b"/f", b""))
        await asyncio.sleep(0.5)  # the client reads nothing for a while
        assert sum(written) < 16 << 20  # held back, not buffered whole
        status, _, body = await read_response(reader)
        assert status == 200 and len(body) == 64 << 20
        writer.close()
        await server.shutdown(1)

    run(main())


def test_shutdown_lets_requests_in_progress_finish_and_refuses_new_ones() -> None:
    async def slow(request: Request, reply: Reply) -> None:
        await asyncio.sleep(0.3)
        await echo(request, reply)

    async def main() -> None:
        server, port = await start(slow)
        busy_r, busy_w = await connect(port)
        idle_r, _ = await connect(port)
        busy_w.write(post(b"/slow", b"x"))
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(server.shutdown(5))
        status, headers, _ = await read_response(busy_r)
        assert status == 200 and headers[b"connection"] == b"close"
        assert await idle_r.read() == b""
        await stopping
        with pytest.raises(OSError):
            await connect(port)

    run(main())


def test_reading_pauses_past_max_pipelined_and_resumes() -> None:
    """A client that pipelines faster than its requests are served is not read without
    bound: past MAX_PIPELINED waiting requests the socket is left unread (the kernel's
    buffers push back on the client), and reading resumes as the queue drains."""
    from proxy.server import MAX_PIPELINED

    gate = asyncio.Event()

    async def gated(request: Request, reply: Reply) -> None:
        await gate.wait()
        await echo(request, reply)

    async def main() -> None:
        server, port = await start(gated)
        reader, writer = await connect(port)
        total = MAX_PIPELINED * 3
        for i in range(total):  # one segment each, so the server reads them one by one
            writer.write(post(b"/p", b"%d" % i))
            await writer.drain()
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.1)
        (conn,) = server.connections
        assert conn._read_paused
        assert len(conn._queue) <= MAX_PIPELINED + 1  # the rest is still in the socket
        gate.set()
        bodies = [orjson.loads((await read_response(reader))[2])["body"]
                  for _ in range(total)]
        assert bodies == [str(i) for i in range(total)]
        assert not conn._read_paused
        writer.close()
        await server.shutdown(1)

    run(main())
