"""The one boundary with the upstream network.

Owns the data plane's HTTP/1.1 client (proxy/h1.py: keep-alive connections per backend)
and turns every failure on the wire into a `ProxyError`: connection problems become
retryable 502s, timeouts 504s. Code above this module never sees a wire exception.

Timeouts: `connect_s` to open a connection; `first_byte_s` from sending the request until
the first body bytes (headers and prefill); `idle_s` between two body reads afterwards;
`head_s` (off unless set) from sending a streamed request until its response head, which
llama.cpp and vLLM send before they prefill: a short one tells a hung backend from a long
prefill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import orjson

from backends.outlier import Fault
from backends.state import BackendState
from proxy.errors import ProxyError, upstream_failed, upstream_overloaded, upstream_timeout
from proxy.h1 import (
    Abandoned,
    BadHeader,
    ConnectFailed,
    Dropped,
    H1Client,
    NoHead,
    Response,
    Stalled,
    Target,
    WireError,
    parse_url,
)
from proxy.settings import TimeoutSettings


def make_client(timeouts: TimeoutSettings, pool: Iterable[BackendState] = ()) -> H1Client:
    """The data-plane client. Per-backend concurrency is bounded by admission, so the pool
    itself is unbounded; idle connections are kept for reuse. https backends get their own
    trust settings (backends/tls.py)."""
    tls = {parse_url(s.config.base_url).origin: s.tls for s in pool if s.tls is not None}
    return H1Client(connect_timeout_s=timeouts.connect_s, keepalive_s=60.0, tls=tls)


class UpstreamResponse:
    """An upstream response whose headers have arrived; the body is read through here."""

    __slots__ = ("_client", "_deadline_s", "_idle_s", "_resp", "backend")

    def __init__(self, client: H1Client, resp: Response, backend: str, deadline_s: float,
                 idle_s: float) -> None:
        self._client = client
        self._resp = resp
        self._deadline_s = deadline_s  # loop time by which the first body bytes must come
        self._idle_s = idle_s
        self.backend = backend

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def content_type(self) -> str:
        return self._resp.headers.get("content-type", "application/json")

    @property
    def retry_after(self) -> str | None:
        return self._resp.headers.get("retry-after")

    async def read(self) -> bytes:
        """The whole body, within the first-byte deadline plus idle time."""
        try:
            async with asyncio.timeout_at(self._deadline_s + self._idle_s):
                return await self._resp.read()
        except TimeoutError:
            raise upstream_timeout(f"backend {self.backend} did not finish its reply",
                                   retryable=True) from None
        except WireError as exc:
            raise _wire_error(self.backend, exc) from None

    def first_chunk(self) -> bytes:
        """The first body bytes, which `Upstream.post` waited for (b"" for an empty body)."""
        return self._resp.take()

    @property
    def complete(self) -> bool:
        """The whole body has arrived."""
        return self._resp.complete

    async def relay(self, sink: Callable[[bytes], None]) -> bytes:
        """Hand the rest of the body to `sink` as it arrives, from the socket's callback;
        `idle_s` without data fails it. Returns the bytes that came with the end of the
        body, which are not given to `sink`."""
        resp = self._resp
        resp.watch_idle(self._idle_s)
        try:
            return await resp.relay(sink)
        except Stalled:
            raise upstream_timeout(
                f"backend {self.backend} stalled for {self._idle_s:g} s mid-stream"
            ) from None
        except WireError as exc:
            raise _wire_error(self.backend, exc) from None

    def pause_reading(self) -> None:
        """Stop reading the body until `resume_reading` (the client is not keeping up)."""
        self._resp.pause()

    def resume_reading(self) -> None:
        self._resp.resume()

    def close(self) -> None:
        """Drop the connection (used when the client left or the reply is abandoned)."""
        self._client.discard(self._resp)

    def release(self) -> None:
        """Return a fully read connection to the pool."""
        self._client.release(self._resp)


class Upstream:
    def __init__(self, client: H1Client, timeouts: TimeoutSettings) -> None:
        self._client = client
        self._timeouts = timeouts
        self._targets: dict[str, Target] = {}  # parsed once: backends x endpoints, a few dozen

    def configure(self, timeouts: TimeoutSettings) -> None:
        """New timeouts for requests sent from now on (a reload)."""
        self._timeouts = timeouts
        self._client.connect_timeout_s = timeouts.connect_s

    def abandon(self, state: BackendState, reason: str) -> int:
        """Give up the requests to `state` still waiting for their first body bytes (it
        was ejected: they fail as retryable and go to another backend). Returns how many."""
        origin = parse_url(state.config.base_url).origin
        return self._client.abandon(origin, f"backend {state.name} was ejected ({reason})")

    def trust(self, state: BackendState) -> None:
        """Use the backend's own TLS settings for its origin (a backend added or changed at
        run time; those known at start are given to `make_client`)."""
        self._client.trust(parse_url(state.config.base_url).origin, state.tls)

    def _target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = parse_url(url)
        return target

    async def post(
        self, backend: str, url: str, body: bytes, headers: Mapping[str, str],
        stream: bool = False,
    ) -> UpstreamResponse:
        """Send the request and wait for the response's first body bytes (the headers and
        the prefill), by the first-byte deadline; for a stream, its head by `head_s`."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self._timeouts.first_byte_s
        head_s = self._timeouts.head_s
        head_by = now + head_s if stream and head_s else None
        target = self._target(url)
        for last_try in (False, True):
            try:
                async with asyncio.timeout_at(deadline):
                    # the retry of a dropped pooled connection goes out on a new one: the
                    # other pooled connections to that server are as old, and as likely
                    # to have been closed with it
                    resp = await self._client.request(target, body, headers, fresh=last_try,
                                                      head_by=head_by)
                return UpstreamResponse(self._client, resp, backend, deadline,
                                        self._timeouts.idle_s)
            except TimeoutError:  # hung, or far too slow: nothing was sent on, so try another
                raise upstream_timeout(
                    f"backend {backend} sent no data within {self._timeouts.first_byte_s:g} s",
                    retryable=True,
                ) from None
            except WireError as exc:
                if last_try or not _dropped_connection(exc):
                    raise _wire_error(backend, exc) from None
        raise AssertionError("unreachable")


def _dropped_connection(exc: WireError) -> bool:
    """An established connection failed before any reply: typically a pooled keep-alive
    connection the server closed just as the request went out (seen against llama-server
    in the real-server tests, once when the retry took a second stale pooled connection).
    Worth one more try on a new connection to the same backend; a refused or timed-out
    connect is not this (the backend is down)."""
    return isinstance(exc, Dropped) and exc.before_reply


def _wire_error(backend: str, exc: WireError) -> ProxyError:
    if isinstance(exc, NoHead):  # hung: a working engine sends a stream's head at once
        return upstream_timeout(f"backend {backend} sent no response head in time "
                                "(timeouts.head_s)", retryable=True)
    if isinstance(exc, ConnectFailed):
        return upstream_failed(f"backend {backend} could not be reached: {exc}", Fault.DOWN,
                               backend_down=True)
    if isinstance(exc, BadHeader):  # ours, not the backend's
        return upstream_failed(f"request for backend {backend} not sent: {exc}", Fault.NONE)
    if isinstance(exc, Abandoned):  # given up by us: the ejection counted already
        return upstream_failed(f"{exc}; the request had not started", Fault.NONE)
    # a server that closes mid-reply is alive (its probes tell): an error, not down
    down = (isinstance(exc, Dropped) and exc.before_reply) or isinstance(exc, Stalled)
    fault = Fault.DOWN if down else Fault.ERROR
    return upstream_failed(f"backend {backend} failed: {exc}", fault)


def status_error(backend: str, status: int, body: bytes, retry_after: str | None) -> ProxyError:
    """A 5xx or 429 answer, as a retryable error that keeps the upstream's message."""
    detail = _message_of(body)
    if status in (429, 503):  # a 429 is load, not a fault; a 503 is a server error
        return upstream_overloaded(
            f"backend {backend} is overloaded (HTTP {status}){detail}", _seconds(retry_after),
            Fault.ERROR if status == 503 else Fault.NONE,
        )
    return upstream_failed(f"backend {backend} failed with HTTP {status}{detail}", Fault.ERROR)


def _message_of(body: bytes) -> str:
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    message = error.get("message") if isinstance(error, dict) else error
    return f": {message}" if isinstance(message, str) and message else ""


def _seconds(retry_after: str | None) -> int | None:
    try:
        return max(1, min(60, round(float(retry_after)))) if retry_after else None
    except ValueError:
        return None
