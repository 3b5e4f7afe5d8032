"""The data plane's HTTP/1.1 client: keep-alive connections on asyncio protocols.

sluiceway sends one kind of request upstream (a POST with a small JSON body) and relays
what comes back, often thousands of small SSE chunks a second. A general client spends most
of its time per request on machinery this does not need (middleware, cookie and redirect
handling, per-request objects and timers, stream readers layered on stream readers), so the
hot path has its own: one `transport.write` per request, the llhttp parser (httptools)
calling straight into the connection, and the body bytes of each socket read handed to the
reader together, as they arrive.

- `H1Client` keeps idle connections per origin (scheme, host, port), reused most-recent
  first; one idle for longer than `keepalive_s` (or closed by the server) is discarded.
- `Response` buffers the body between the socket and its reader; past `HIGH_WATER` bytes
  the socket stops being read until the reader catches up, so a slow client cannot make
  the proxy buffer a whole reply.
- A body read can be watched for idleness (`Response.watch_idle`): one timer per response,
  re-armed only when it fires before the idle time has passed since the last bytes, so the
  per-chunk path schedules no timers (rescheduling a deadline on every chunk cost two heap
  operations per SSE event).
- Failures are this module's own exceptions (`ConnectFailed`, `Dropped`, `Stalled`,
  `BadResponse`, `BadHeader`, `Abandoned`, `NoHead`);
  proxy/upstream.py, the one boundary with the upstream network, translates them.

Other timeouts are the caller's: it wraps `request` and the first read in its own
deadlines. The monitor's probes keep using aiohttp (few, slow, and not on the hot path).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 20  # body bytes buffered for a reader before the socket is paused
LOW_WATER = HIGH_WATER // 4  # reading resumes once the reader has taken the buffer below


class WireError(Exception):
    """Anything that went wrong on an upstream connection."""


class ConnectFailed(WireError):
    """No connection could be made (refused, unreachable, timed out): the backend is down."""


class Dropped(WireError):
    """An established connection closed or reset before the response was complete.
    `before_reply` is true when not even the status line had arrived."""

    def __init__(self, message: str, before_reply: bool) -> None:
        super().__init__(message)
        self.before_reply = before_reply


class Abandoned(WireError):
    """The caller gave up waiting for this response (its backend was ejected)."""


class BadResponse(WireError):
    """The upstream sent something that is not HTTP/1.x."""


class NoHead(WireError):
    """The response's status line and headers did not arrive in time."""


class Stalled(WireError):
    """No body bytes arrived for the response's idle timeout."""


class BadHeader(WireError):
    """A header to send has a line break or a character outside latin-1 (a configured
    key, say; headers from clients were already checked by the server's parser)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed request URL: where to connect and what to send on the request line."""

    scheme: str
    host: str
    port: int
    path: bytes  # path and query, as sent
    host_header: bytes

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, path.encode("ascii"), host_header.encode("idna"))


class Response:
    """One response: status and headers once `H1Client.request` returns, then the body."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_idle_s",
        "_last_data",
        "_sink",
        "_sink_error",
        "_waiter",
        "_watchdog",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-cased names; a repeated header's last value
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False  # the whole body has arrived
        self._error: WireError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._idle_s = 0.0
        self._last_data = 0.0  # loop time of the last body bytes (or of arming the watchdog)
        self._watchdog: asyncio.TimerHandle | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._sink_error: Exception | None = None

    @property
    def complete(self) -> bool:
        return self._done

    def watch_idle(self, idle_s: float) -> None:
        """Fail the body with `Stalled` if no bytes arrive for `idle_s` seconds. One timer,
        re-armed only when it fires early, so a busy stream schedules nothing per chunk."""
        loop = self._conn.loop
        self._idle_s = idle_s
        self._last_data = loop.time()
        if self._watchdog is None and not self._done:
            self._watchdog = loop.call_at(self._last_data + idle_s, self._check_idle)

    def _check_idle(self) -> None:
        self._watchdog = None
        if self._done or self._error is not None:
            return
        due = self._last_data + self._idle_s
        loop = self._conn.loop
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._check_idle)
        elif self._chunks or self._conn.paused:  # the reader is slow, not the upstream
            self._last_data = loop.time()
            self._watchdog = loop.call_at(self._last_data + self._idle_s, self._check_idle)
        else:
            self._fail(Stalled(f"no data for {self._idle_s:g} s"))

    def _unwatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def take(self) -> bytes:
        """The body bytes that have arrived, without waiting (b"" if none have)."""
        return self._take() if self._chunks else b""

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some), or b"" at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    async def relay(self, sink: Callable[[bytes], None]) -> bytes:
        """Hand the body to `sink` as it arrives, from the connection's `data_received`:
        one call per socket read and no task switch in between. At the end of the body,
        returns the bytes that arrived with the end (not given to `sink`, so the caller can
        send them together with the end of its own reply, in one write). Raises WireError,
        or what `sink` raised. `pause` and `resume` are the sink's way to stop the flow."""
        if self._chunks and not self._done:
            sink(self._take())
        self._sink = sink
        try:
            while not self._done and self._error is None and self._sink_error is None:
                self._waiter = self._conn.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self._sink = None
        if self._sink_error is not None:
            raise self._sink_error
        if self._error is not None:
            raise self._error
        return self._take() if self._chunks else b""

    def pause(self) -> None:
        """Stop reading from the upstream until `resume`."""
        self._conn.pause()

    def resume(self) -> None:
        self._conn.resume()

    def _take(self) -> bytes:
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered > LOW_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    # called by the connection, on the event loop
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)  # the reader is woken once per socket read, not per chunk
        self._buffered += len(data)

    def _fed(self) -> None:
        """After a socket read: hand the bytes to the sink, or wake the reader (and stop
        reading if it is far behind)."""
        if self._chunks:
            if self._watchdog is not None:
                self._last_data = self._conn.loop.time()
            if self._sink is not None:
                if self._done:  # these bytes came with the end: relay() returns them
                    self._wake()
                    return
                try:
                    self._sink(self._take())
                except Exception as exc:  # handed to the relaying task, not the event loop
                    self._sink, self._sink_error = None, exc
                    self._wake()
                return
            if self._buffered > HIGH_WATER:
                self._conn.pause()
            self._wake()

    def _finish(self) -> None:
        self._done = True
        self._unwatch()
        self._wake()

    def _fail(self, error: WireError) -> None:
        if not self._done:
            self._error = error
            self._unwatch()
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time."""

    def __init__(self, client: H1Client, origin: tuple[str, str, int]) -> None:
        self.loop = asyncio.get_running_loop()
        self.origin = origin
        self.idle_since = 0.0
        self._client = client
        self._transport: asyncio.Transport | None = None
        # The parser calls on_body once per HTTP chunk, and an upstream streaming SSE sends
        # one chunk per event, often dozens in one socket read: a list's own append takes
        # them without a Python frame each, and the read's body goes to the response whole.
        self._body: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self._body.append
        self._parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None
        self._ready: asyncio.Future[None] | None = None  # set by the first body bytes
        self._head: asyncio.Future[None] | None = None  # set by the headers, when watched
        self._keep_alive = False
        self._until_eof = False  # a body without a length ends when the connection does
        self._informational = False  # skipping a 1xx response
        self.paused = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._response is None:  # nothing was asked: not a connection to keep
            self.close()
            return
        response = self._response
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._abandon(BadResponse(f"unparseable response: {exc}"))
            return
        body = self._body
        if body:
            response._feed(body[0] if len(body) == 1 else b"".join(body))
            body.clear()
        response._fed()
        if self._ready is not None:
            self._signal_ready()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost finishes or fails the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client._forget(self)
        response = self._response
        if response is None:
            return
        if self._until_eof:  # set only once the headers have arrived
            response._finish()
            self._signal_ready()
        else:
            reason = type(exc).__name__ if exc is not None else "closed by the server"
            self._abandon(Dropped(f"connection lost ({reason})",
                                  before_reply=not response.status))

    # httptools callbacks (on_body is the list's append, set in __init__)
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        self._response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # informational: the real response follows
            self._informational = True
            response.headers.clear()
            return
        response.status = status
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        headers = response.headers
        self._until_eof = (
            "content-length" not in headers and "chunked" not in
            headers.get("transfer-encoding", "").lower() and status not in (204, 304)
        )

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        assert self._response is not None
        self._keep_alive = self._parser.should_keep_alive()
        self._response._finish()

    # used by the client and the response
    def send(self, data: bytes, watch_head: bool = False
             ) -> tuple[Response, asyncio.Future[None]]:
        assert self._transport is not None
        self._response = Response(self)
        self._ready = self.loop.create_future()
        self._head = self.loop.create_future() if watch_head else None
        self._keep_alive = False
        self._until_eof = False
        self._transport.write(data)
        return self._response, self._ready

    @property
    def awaiting_first_bytes(self) -> bool:
        ready = self._ready
        return ready is not None and not ready.done()

    def reusable(self) -> bool:
        response = self._response
        return (not self.closed and self._keep_alive and response is not None
                and response.complete and not self.paused)

    def detach(self) -> None:
        """The response is done with; the connection may carry the next one."""
        self._response = None
        self._ready = None

    def pause(self) -> None:
        if not self.paused and self._transport is not None:
            self.paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self._transport is not None and not self.closed:
            self.paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()  # nothing of ours is left to flush; free the peer now

    def _signal_ready(self) -> None:
        """Wake the requester once the first body bytes (or the end of the body) are in:
        one wake-up per request, whether the head and the body came in one read or two."""
        ready, response = self._ready, self._response
        if ready is None or response is None or not (response._chunks or response._done):
            return
        if not ready.done():
            ready.set_result(None)
        self._ready = None  # the requester has its answer; later reads need not look

    def _abandon(self, error: WireError) -> None:
        self._body.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved by the caller, or by nobody
        if self._response is not None:
            self._response._fail(error)
        self.close()


class H1Client:
    """Keep-alive HTTP/1.1 connections to upstreams, pooled per origin."""

    def __init__(self, connect_timeout_s: float, keepalive_s: float = 60.0,
                 tls: Mapping[tuple[str, str, int], ssl.SSLContext] | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._tls_by_origin = dict(tls or {})  # per-backend trust (backends/tls.py)
        self._tls: ssl.SSLContext | None = None  # the system's, for any other origin

    def trust(self, origin: tuple[str, str, int], context: ssl.SSLContext | None) -> None:
        """Use `context` for `origin` from now on (a backend added or changed at run time);
        None returns that origin to the system's trust store."""
        if context is None:
            self._tls_by_origin.pop(origin, None)
        else:
            self._tls_by_origin[origin] = context

    async def request(self, target: Target, body: bytes, headers: Mapping[str, str],
                      fresh: bool = False, head_by: float | None = None) -> Response:
        """POST `body` to `target` and wait for the response's status, headers and first
        body bytes (or the end of an empty body). `fresh`: on a new connection, not a
        pooled one. `head_by`: loop time by which the status and headers must have come
        (`NoHead` otherwise). Raises WireError."""
        head = _request_head(target, headers, len(body))
        conn = None if fresh else self._take_idle(target.origin)
        if conn is None:
            conn = await self._connect(target)
        try:
            response, ready = conn.send(head + body, watch_head=head_by is not None)
        except (OSError, RuntimeError) as exc:  # the transport closed under us
            conn.close()
            raise Dropped(f"connection lost ({type(exc).__name__})", before_reply=True) from None
        self._busy.add(conn)
        try:
            if head_by is not None:
                await _head_in_time(conn, ready, head_by)
            await ready
        except BaseException:
            self.discard(response)
            raise
        return response

    def release(self, response: Response) -> None:
        """Done with a response: keep its connection if the body was read to the end and
        the server allows keep-alive, else close it."""
        response._unwatch()
        conn = response._conn
        self._busy.discard(conn)
        if not conn.reusable():
            conn.close()
            return
        conn.detach()
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.origin, collections.deque()).append(conn)

    def discard(self, response: Response) -> None:
        """Close the response's connection now (the reader gave up on it)."""
        response._unwatch()
        conn = response._conn
        self._busy.discard(conn)
        conn.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        self._busy.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost

    def abandon(self, origin: tuple[str, str, int], reason: str) -> int:
        """Fail with `Abandoned` every request to `origin` still waiting for its first body
        bytes, closing its connection. Returns how many there were."""
        waiting = [c for c in self._busy if c.origin == origin and c.awaiting_first_bytes]
        for conn in waiting:
            self._busy.discard(conn)
            conn._abandon(Abandoned(reason))
        return len(waiting)

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _take_idle(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle and now - idle[0].idle_since > self._keepalive_s:
            idle.popleft().close()  # the oldest first: past keep-alive, not worth a try
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            if not conn.closed:
                return conn
        return None

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if target.scheme == "https":
            tls = self._tls_by_origin.get(target.origin)
            if tls is None:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = self._tls
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, target.origin), target.host, target.port,
                    ssl=tls, server_hostname=target.host if tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connect timeout ({self.connect_timeout_s:g} s)") from None
        except OSError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc.strerror or exc}") from None
        return conn


async def _head_in_time(conn: _Connection, ready: asyncio.Future[None], by: float) -> None:
    """Wait for the response head until loop time `by` (the first body bytes, or a
    failure, may come with it)."""
    head = conn._head
    assert head is not None
    try:
        async with asyncio.timeout_at(by):
            await asyncio.wait((head, ready), return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        raise NoHead("no response head in time") from None
    finally:
        conn._head = None


def _request_head(target: Target, headers: Mapping[str, str], length: int) -> bytes:
    text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise BadHeader("a header to send upstream contains a line break")
    try:
        encoded = text.encode("latin-1")
    except UnicodeEncodeError:
        raise BadHeader("a header to send upstream is not latin-1") from None
    return b"".join((b"POST ", target.path, b" HTTP/1.1\r\nhost: ", target.host_header,
                     b"\r\n", encoded, b"content-length: %d\r\n\r\n" % length))
