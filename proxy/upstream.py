"""The one boundary with the upstream network.

Owns the shared aiohttp session (keep-alive pool) and turns every foreign failure into a
`ProxyError`: connection problems become retryable 502s, timeouts 504s. Code above this
module never sees an aiohttp exception.

Timeouts: `connect_s` to open a connection; `first_byte_s` from sending the request until
the first body bytes (headers and prefill); `idle_s` between two body reads afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
import orjson
from yarl import URL

from proxy.errors import ProxyError, upstream_failed, upstream_overloaded, upstream_timeout
from proxy.settings import TimeoutSettings

_WIRE_ERRORS = (aiohttp.ClientError, OSError)


def make_session(timeouts: TimeoutSettings) -> aiohttp.ClientSession:
    """The data-plane session. Per-backend concurrency is bounded by admission, so the
    connector itself is unbounded; idle connections are kept for reuse."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies of its own
        timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect_s, sock_read=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


class UpstreamResponse:
    """An upstream response whose headers have arrived; the body is read through here."""

    __slots__ = ("_deadline_s", "_idle_s", "_resp", "backend")

    def __init__(
        self, resp: aiohttp.ClientResponse, backend: str, deadline_s: float, idle_s: float
    ) -> None:
        self._resp = resp
        self._deadline_s = deadline_s  # loop time by which the first body bytes must come
        self._idle_s = idle_s
        self.backend = backend

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def content_type(self) -> str:
        return self._resp.headers.get("Content-Type", "application/json")

    @property
    def retry_after(self) -> str | None:
        return self._resp.headers.get("Retry-After")

    async def read(self) -> bytes:
        """The whole body, within the first-byte deadline plus idle time."""
        try:
            async with asyncio.timeout_at(self._deadline_s + self._idle_s):
                return await self._resp.read()
        except TimeoutError:
            raise upstream_timeout(f"backend {self.backend} did not finish its reply") from None
        except _WIRE_ERRORS as exc:
            raise _wire_error(self.backend, exc) from None

    async def first_chunk(self) -> bytes:
        """The first body bytes (b"" if the body is empty), by the first-byte deadline."""
        try:
            async with asyncio.timeout_at(self._deadline_s):
                return await self._resp.content.readany()
        except TimeoutError:
            raise upstream_timeout(
                f"backend {self.backend} sent no data in time"
            ) from None
        except _WIRE_ERRORS as exc:
            raise _wire_error(self.backend, exc) from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The rest of the body as it arrives, each read bounded by the idle timeout."""
        loop = asyncio.get_running_loop()
        content = self._resp.content
        try:
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(loop.time() + self._idle_s)
                    chunk = await content.readany()
                    deadline.reschedule(None)
                    if not chunk:
                        return
                    yield chunk
        except TimeoutError:
            raise upstream_timeout(
                f"backend {self.backend} stalled for {self._idle_s:g} s mid-stream"
            ) from None
        except _WIRE_ERRORS as exc:
            raise _wire_error(self.backend, exc) from None

    def close(self) -> None:
        """Drop the connection (used when the client left or the reply is abandoned)."""
        self._resp.close()

    def release(self) -> None:
        """Return a fully read connection to the pool."""
        self._resp.release()


class Upstream:
    def __init__(self, session: aiohttp.ClientSession, timeouts: TimeoutSettings) -> None:
        self._session = session
        self._timeouts = timeouts
        self._urls: dict[str, URL] = {}  # parsed once: backends x endpoints, a few dozen

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = URL(url)
        return parsed

    async def post(
        self, backend: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamResponse:
        """Send the request and wait for the response headers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeouts.first_byte_s
        for last_try in (False, True):
            try:
                async with asyncio.timeout_at(deadline):
                    resp = await self._session.post(self._url(url), data=body, headers=headers)
                return UpstreamResponse(resp, backend, deadline, self._timeouts.idle_s)
            except aiohttp.ServerTimeoutError as exc:  # the connect timeout; before TimeoutError
                raise _wire_error(backend, exc) from None
            except TimeoutError:
                raise upstream_timeout(f"backend {backend} did not answer in time") from None
            except _WIRE_ERRORS as exc:
                if last_try or not _dropped_connection(exc):
                    raise _wire_error(backend, exc) from None
        raise AssertionError("unreachable")


def _dropped_connection(exc: BaseException) -> bool:
    """An established connection failed before any reply: typically a pooled keep-alive
    connection the server closed just as the request went out (seen once against
    llama-server in the real-server tests). Worth one more try on a fresh connection to
    the same backend; a refused or timed-out connect is not this (the backend is down)."""
    return isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)) and not (
        isinstance(exc, aiohttp.ClientConnectorError)
    )


def _wire_error(backend: str, exc: BaseException) -> ProxyError:
    if isinstance(exc, aiohttp.ServerTimeoutError):  # connect timeout
        return upstream_failed(f"backend {backend} could not be reached: connect timeout",
                               backend_down=True)
    down = isinstance(exc, aiohttp.ClientConnectorError)
    what = "could not be reached" if down else "failed"
    return upstream_failed(f"backend {backend} {what}: {type(exc).__name__}", backend_down=down)


def status_error(backend: str, status: int, body: bytes, retry_after: str | None) -> ProxyError:
    """A 5xx or 429 answer, as a retryable error that keeps the upstream's message."""
    detail = _message_of(body)
    if status in (429, 503):
        return upstream_overloaded(
            f"backend {backend} is overloaded (HTTP {status}){detail}", _seconds(retry_after)
        )
    return upstream_failed(f"backend {backend} failed with HTTP {status}{detail}")


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
