"""The proxy's HTTP/1.1 server: asyncio protocols and the llhttp parser (httptools).

Why not an ASGI server: under ASGI every piece of a streamed reply is an awaited message,
so relaying an upstream stream costs a task switch per socket read, the response head
leaves in a write of its own, and a client's disconnect is only seen through a pending
`receive()`, which takes a watcher task per request. Here a handler gets the `Request`
(head and whole body) and a `Reply` it writes to synchronously: the head goes out with the
first body bytes in one write, a relay can write from the upstream socket's own callback,
and a client that disconnects cancels its handler at once (`Reply.gone` tells why).

The connection handles keep-alive and pipelining (requests on one connection are answered
in order, reading pauses while too many wait), HTTP/1.0 (a streamed reply is then
delimited by closing), `Expect: 100-continue`, a body limit (the handler is called at once
with `Request.oversized` set, and the connection closes after its answer), a header limit
(431), malformed requests (400, then close; RFC 9112's Host rule included), a timeout for
idle connections and slow requests (a shorter one for a request's head, against slowloris:
408, then close), a limit on open connections (past it an idle keep-alive connection is
closed to make room, else the newcomer gets 503 and a close), write backpressure
(`Reply.paused`, `Reply.on_resume`), and graceful shutdown. Ambiguous framing (a
Content-Length beside Transfer-Encoding, two lengths, a transfer coding other than a
final `chunked`) is refused by llhttp itself; tests/test_http_corpus.py holds the corpus.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

import httptools

from proxy.errors import (
    ProxyError,
    bad_request,
    headers_too_large,
    internal_error,
    request_timeout,
    too_many_connections,
    unsupported_transfer_encoding,
)

log = logging.getLogger("sluiceway.server")

Headers = Sequence[tuple[bytes, bytes]]
MAX_HEADER_BYTES = 64 * 1024  # names and values of one request's headers together
MAX_PIPELINED = 16  # requests read ahead on one connection before reading pauses


@dataclass(slots=True)
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased, in the order sent
    body: bytes
    keep_alive: bool = True  # the client allows another request on the connection
    http_10: bool = False
    oversized: bool = False  # the body exceeded the server's limit and was not kept

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


Handler = Callable[[Request, "Reply"], Awaitable[None]]


class Reply:
    """The response to one request. `start` + `write`* + `end` for a stream of unknown
    length (chunked; close-delimited for HTTP/1.0 clients), or one `respond`."""

    __slots__ = ("_chunked", "_conn", "_head", "_head_only", "_http_10", "_on_resume",
                 "ended", "keep_alive", "started")

    def __init__(self, conn: _Connection, keep_alive: bool, head_only: bool,
                 http_10: bool) -> None:
        self._conn = conn
        self._head = b""  # held back until the first body bytes, to leave in one write
        self._head_only = head_only
        self._http_10 = http_10
        self._chunked = False
        self._on_resume: Callable[[], None] | None = None
        self.keep_alive = keep_alive
        self.started = False
        self.ended = False

    @property
    def gone(self) -> bool:
        """The client has disconnected."""
        return self._conn.closed

    @property
    def paused(self) -> bool:
        """The client is not reading fast enough: the socket's write buffer is full."""
        return self._conn.write_paused

    def on_resume(self, callback: Callable[[], None] | None) -> None:
        """Called when a paused client has drained its write buffer."""
        self._on_resume = callback

    def start(self, status: int, headers: Headers) -> None:
        self._begin()
        if self._http_10:
            self.keep_alive = False  # no chunked encoding in 1.0: the close ends the body
            framing = b""
        else:
            self._chunked = True
            framing = b"transfer-encoding: chunked\r\n"
        self._head = _head(status, headers, framing, self.keep_alive, self._conn.date())

    def write(self, data: bytes) -> None:
        if data and not self._head_only:
            self._conn.write(self._framed(data))

    def end(self, data: bytes = b"") -> None:
        """The last bytes and the end of the body (and the head, if still held): one write."""
        if self.ended:
            return
        self.ended = True
        body = self._framed(data) if data and not self._head_only else b""
        tail = b"0\r\n\r\n" if self._chunked and not self._head_only else b""
        out, self._head = self._head + body + tail, b""
        if out:
            self._conn.write(out)

    def _framed(self, data: bytes) -> bytes:
        """`data` as it goes on the wire: chunk-framed, after the head if not yet sent."""
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        return data

    def respond(self, status: int, body: bytes, headers: Headers) -> None:
        self._begin()
        head = _head(status, headers, b"content-length: %d\r\n" % len(body), self.keep_alive,
                     self._conn.date())
        self._conn.write(head if self._head_only else head + body)
        self.ended = True

    def _begin(self) -> None:
        if self.started:
            raise RuntimeError("the response has already started")
        self.started = True
        if self._conn.closing:  # shutting down, or the client half-closed: say so
            self.keep_alive = False


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and runs the handler for each, in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._oversized = False
        self._in_message = False  # between a request's first byte and its end
        self._queue: collections.deque[Request | ProxyError] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._stop_reading = False  # after a refusal or an oversized body: nothing more
        self._read_paused = False
        self.closing = False  # answer what is in progress, then close
        self.closed = False
        self.write_paused = False
        self.reply: Reply | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self._server.admit(self):
            self._transport.write(_whole_error(too_many_connections(), self._server.date()))
            self._transport.close()
            self.closed = True
            return
        self._arm_timer(self._server.head_timeout_s)  # its first request's head, in time

    def data_received(self, data: bytes) -> None:
        if self._stop_reading:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop_after_this()  # a protocol switch we do not speak: answer, then close
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Refused):
                raise  # a bug in a callback: the loop logs it and drops the connection
            self._refuse(exc.__context__.error)
        except httptools.HttpParserError as exc:
            self._refuse(bad_request(f"Malformed HTTP request: {exc}."))

    def eof_received(self) -> bool:
        """The client closed its side. A half-close that still waits for the answer looks
        just the same, but HTTP clients do not do that, and a client that has gone must
        free its backend slot at once (not when the next write fails): treat it as gone."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self.closed = True
        self._server.connections.discard(self)
        self._cancel_timer()
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()  # the handler sees Reply.gone

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        reply = self.reply
        if reply is not None and reply._on_resume is not None:
            reply._on_resume()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_size = 0
        self._oversized = False
        self._arm_timer(self._server.head_timeout_s)  # the head, within its timeout

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refused(headers_too_large(MAX_HEADER_BYTES))
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._arm_timer()  # the body, within the request timeout
        _check_framing(self._headers, self._parser.get_http_version())
        limit = self._server.max_body
        declared = _content_length(self._headers)
        if declared is not None and declared > limit:
            self._dispatch_oversized()
        elif self._expects_continue() and self._task is None and not self._queue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._oversized:
            return
        self._body_size += len(body)
        if self._body_size > self._server.max_body:
            self._dispatch_oversized()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._arm_timer()
        if not self._parser.should_keep_alive():
            # the client said this was its last request: anything after it is ignored (not
            # parsed and refused, nor answered); reading goes on, to see a disconnect
            self._stop_reading = self.closing = True
        if self._oversized:  # answered already; the rest of its body was read and dropped
            if self.idle():
                self.close()
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._enqueue(self._request(body, oversized=False))

    # requests and replies
    def _request(self, body: bytes, oversized: bool) -> Request:
        url = self._url
        if not url.startswith(b"/"):  # absolute form (a client that thinks we are a proxy)
            parsed = httptools.parse_url(url)
            path, query = parsed.path or b"/", parsed.query or b""
        else:
            path, _, query = url.partition(b"?")
        text = path.decode("latin-1")
        if "%" in text:
            text = unquote(text)
        parser = self._parser
        return Request(parser.get_method().decode("ascii"), text, query.decode("latin-1"),
                       self._headers, body, keep_alive=parser.should_keep_alive(),
                       http_10=parser.get_http_version() == "1.0", oversized=oversized)

    def _dispatch_oversized(self) -> None:
        """Answer now (the handler refuses it with 413), then close once the rest of the
        body has been read and dropped: closing with unread bytes would reset the
        connection, and the client might never see the answer."""
        self._oversized = True
        self.closing = True
        self._enqueue(self._request(b"", oversized=True))

    def _expects_continue(self) -> bool:
        for name, value in self._headers:
            if name == b"expect":
                return value.lower() == b"100-continue"
        return False

    def _refuse(self, error: ProxyError) -> None:
        if self._stop_reading:
            return  # bytes past the last request, or past one refused already
        self._enqueue(error)
        self._stop_after_this()

    def _stop_after_this(self) -> None:
        self._stop_reading = True
        self.closing = True
        if self._transport is not None and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()

    def _enqueue(self, item: Request | ProxyError) -> None:
        self._queue.append(item)
        if (len(self._queue) > MAX_PIPELINED and not self._read_paused
                and self._transport is not None):
            self._read_paused = True
            self._transport.pause_reading()
        self._next()

    def _next(self) -> None:
        if self._task is not None or self.closed:
            return
        if not self._queue:
            if self.closing:
                self.close()
            return
        item = self._queue.popleft()
        if (self._read_paused and not self._stop_reading and len(self._queue) <= 1
                and self._transport is not None):
            self._read_paused = False
            self._transport.resume_reading()
        if isinstance(item, ProxyError):
            reply = Reply(self, keep_alive=False, head_only=False, http_10=False)
            reply.respond(item.status, item.body(), _JSON)
            self.close()
            return
        self._task = self._loop.create_task(self._handle(item))

    async def _handle(self, request: Request) -> None:
        keep_alive = (request.keep_alive and not self.closing and not request.oversized
                      and not self._server.stopping)
        reply = Reply(self, keep_alive, head_only=request.method == "HEAD",
                      http_10=request.http_10)
        self.reply = reply
        try:
            await self._server.handler(request, reply)
        except asyncio.CancelledError:
            if not self.closed:
                raise  # not the client's disconnect (server shutdown): let it propagate
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if not reply.started and not self.closed:
                reply.respond(500, internal_error().body(), _JSON)
        finally:
            self._task = None
            self.reply = None
            self._done(reply)

    def _done(self, reply: Reply) -> None:
        if self.closed:
            return
        if not reply.ended or not reply.keep_alive:
            if not reply.started:
                reply.keep_alive = False
                reply.respond(500, internal_error().body(), _JSON)
            self.closing = True
        if self.closing and not self._queue:
            if not self._in_message:  # else on_message_complete or the timer closes it
                self.close()
            return
        self._arm_timer()
        self._next()

    # the socket
    def date(self) -> bytes:
        return self._server.date()

    def write(self, data: bytes) -> None:
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if not self.closed and self._transport is not None:
            self._transport.close()  # flushes what was written, then connection_lost

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def idle(self) -> bool:
        return self._task is None and not self._queue

    @property
    def in_message(self) -> bool:
        """Part of a request has arrived."""
        return self._in_message

    def busy(self) -> bool:
        return self._task is not None

    def _arm_timer(self, seconds: float | None = None) -> None:
        """Move the deadline (`seconds` from now, the server's timeout by default). The one
        timer never sleeps past the head timeout, so no deadline set here can be earlier
        than it: it is re-armed only when it fires early, and a request costs no timer
        operations (three reschedules otherwise)."""
        self._deadline = self._loop.time() + (seconds or self._server.timeout_s)
        if self._timer is None:
            self._timer = self._loop.call_at(self._next_tick(), self._timed_out)

    def _next_tick(self) -> float:
        return min(self._deadline, self._loop.time() + self._server.head_timeout_s)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self._loop.time()
        if self._task is not None:  # a handler's time is its own: look again later
            self._deadline = now + self._server.timeout_s
        if now < self._deadline:
            self._timer = self._loop.call_at(self._next_tick(), self._timed_out)
        elif self._in_message and self.idle():  # a request that did not arrive in time
            self._stop_reading = True
            self.write(_whole_error(request_timeout(), self.date()))
            self.close()
        else:  # idle between requests
            self.close()


class _Refused(Exception):
    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


class HttpServer:
    """Listens, runs `handler` for every request, and shuts down gracefully."""

    def __init__(self, handler: Handler, *, max_body: int, timeout_s: float = 75.0,
                 head_timeout_s: float = 10.0, max_connections: int = 4096) -> None:
        self.handler = handler
        self.max_body = max_body
        self.timeout_s = timeout_s  # idle keep-alive, and the time to send one request
        self.head_timeout_s = min(head_timeout_s, timeout_s)  # a request's head
        self.max_connections = max_connections
        self.refused_connections = 0  # turned away at the limit
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._date_second = 0
        self._date = b""

    def admit(self, conn: _Connection) -> bool:
        """Take a new connection if there is room, making room by closing an idle
        keep-alive connection at the limit (the oldest such is as good as any)."""
        if len(self.connections) >= self.max_connections:
            idle = next((c for c in self.connections if c.idle() and not c.in_message), None)
            if idle is None:
                self.refused_connections += 1
                return False
            idle.close()
            self.connections.discard(idle)
        self.connections.add(conn)
        return True

    async def listen(self, host: str, port: int, backlog: int = 2048) -> None:
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True)

    @property
    def ports(self) -> list[int]:
        assert self._server is not None
        return [s.getsockname()[1] for s in self._server.sockets]

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; close idle connections; let requests in progress finish for up
        to `grace_s` seconds, then drop their connections."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        deadline = self.loop.time() + grace_s
        while True:
            for conn in list(self.connections):
                conn.closing = True
                if conn.idle():
                    conn.close()
            if not self.connections or self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()  # their handlers are cancelled and see Reply.gone
        for _ in range(20):
            if not any(conn.busy() for conn in self.connections):
                break
            await asyncio.sleep(0.05)

    def date(self) -> bytes:
        """The Date header's value, formatted at most once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, formatdate(now, usegmt=True).encode()
        return self._date


_JSON: Headers = ((b"content-type", b"application/json"),)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _whole_error(error: ProxyError, date: bytes) -> bytes:
    """An error answered outside any handler (a refused connection, a request that did not
    arrive in time), in one write, with the connection to close after it."""
    body = error.body()
    return _head(error.status, (*_JSON, *error.headers()),
                 b"content-length: %d\r\n" % len(body), False, date) + body


def _head(status: int, headers: Headers, framing: bytes, keep_alive: bool,
          date: bytes) -> bytes:
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"date: ", date, b"\r\n", framing)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _check_framing(headers: list[tuple[bytes, bytes]], version: str) -> None:
    """What llhttp lets through and RFC 9112 does not: a missing or repeated Host (3.2), a
    transfer coding other than `chunked` (6.1: 501), Transfer-Encoding in HTTP/1.0 (6.1:
    faulty framing). llhttp itself refuses a Content-Length beside Transfer-Encoding,
    repeated lengths, and codings after `chunked`."""
    hosts = 0
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"transfer-encoding":
            if version != "1.1":
                raise _Refused(bad_request("Transfer-Encoding is not allowed in HTTP/1.0."))
            if value.strip().lower() != b"chunked":
                raise _Refused(unsupported_transfer_encoding(value.decode("latin-1")))
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        raise _Refused(bad_request("An HTTP/1.1 request needs exactly one Host header."))


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # llhttp already refuses a malformed one
    return None
