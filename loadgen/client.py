"""Sending one streamed request and timing it, without decoding every event.

The stream is framed into events as the SSE spec says (`proxy.sse.framing`). Each event is
classified by byte patterns: a `choices` array that is not empty marks a choices message
(TTFT, ITL, E2EL), generated text marks a content event, and only events that may carry
`usage` or `error` are parsed as JSON (an event with a `\\u` escape is parsed too: a key
may be spelled with escapes). That keeps the client cheap enough to measure fast servers
(see docs/benchmarks.md for its measured ceiling).

Output tokens come from the server's `usage`. A stream without usage is counted, and
marked `estimated`: by its text through a tokenizer when one is given, else as one token
per content event (what llama.cpp and vLLM send). Never a silent default.
"""

from __future__ import annotations

import asyncio
import re
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from loadgen.record import Failure, RequestRecord
from loadgen.tokens import TokenCounter
from proxy.sse import CHAT, Framer, finishes, has_escape, might_hold_usage, usage_in

_NON_EMPTY_ARRAY = re.compile(rb'\s*:\s*\[\s*[^\]\s]')  # after a key


_BACKSLASH = ord("\\")
_STALE_RETRIES = 2


class StreamTally:
    """What one response stream told about its request, fed read by read."""

    __slots__ = ("_content_events", "_done", "_finished", "_framer", "_text", "_usage",
                 "counter", "record")

    def __init__(self, record: RequestRecord, counter: TokenCounter | None = None) -> None:
        self.record = record
        self.counter = counter
        self._framer = Framer()
        self._done = False
        self._finished = False  # a choice ended with a finish_reason
        self._usage: dict[str, Any] | None = None
        self._content_events = 0
        self._text: list[str] | None = [] if (counter or record.text is not None) else None

    def feed(self, raw: bytes, now: float) -> bool:
        """Take one read; False once an error event ended the stream."""
        record = self.record
        if record.first_byte is None:
            record.first_byte = now
        for event in self._framer.feed(raw):
            data = event.data
            if data is None:
                continue
            if data.strip() == b"[DONE]":
                self._done = True
                continue
            if b'"error"' in data and _is_error(data, record):
                return False
            escaped = has_escape(data)
            if might_hold_usage(data, escaped):
                self._usage = _usage(data) or self._usage
            if not _has_choices(data, escaped):
                continue
            if finishes(data):
                self._finished = True
            if record.first_choice is None:
                record.first_choice = now
            else:
                record.itl.append(now - record.last_choice)  # type: ignore[operator]
            record.last_choice = now
            if CHAT.carries(data, escaped):
                self._content_events += 1
                if record.first_content is None:
                    record.first_content = now
                if self._text is not None:
                    self._text.append(_delta_text(data))
        return True

    def finish(self) -> None:
        """At the end of the stream: its failure, or its token counts."""
        record = self.record
        if record.error is not None:
            return
        if record.first_choice is None:
            record.error = Failure.PAYLOAD
            record.detail = "Never received a valid chunk to calculate TTFT."
            return
        if not (self._done or self._finished):  # transformers serve sends no [DONE]: a
            # body that ended cleanly after a finish_reason is complete, as vllm bench
            # serve counts it; one that ended before any is cut
            record.error, record.detail = Failure.CUT, "stream ended without [DONE]"
            return
        if self._text is not None and record.text is not None:
            record.text.extend(self._text)
        usage = self._usage or {}
        record.prompt_tokens = _int(usage.get("prompt_tokens"))
        record.output_tokens = _int(usage.get("completion_tokens"))
        if not record.output_tokens:
            record.estimated = True
            if self.counter is not None and self._text is not None:
                record.output_tokens = self.counter.count("".join(self._text))
            else:
                record.output_tokens = self._content_events


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    record: RequestRecord,
    timeout_s: float,
    counter: TokenCounter | None = None,
) -> None:
    """Run one request, filling `record`. Never raises for a failed request.

    A pooled keep-alive connection the server has already closed fails before anything was
    received: llama-server announces keep-alive and closes after each stream, and aiohttp
    may reuse the socket before it has seen the FIN. Such a request never reached the
    server, so it is sent again and counted in `record.resent`; t0 is taken again for it.
    Every pooled socket may be stale at once (on the H200, 4 streams ending together left
    4, and two resends lost 5 requests of 100), and each failed one is discarded: so it is
    resent up to the pool's size, which then must reach a new connection."""
    limit = session.connector.limit if session.connector is not None else 0
    for tries_left in range(max(_STALE_RETRIES, limit), -1, -1):
        try:
            await _send_once(session, url, body, headers, record, timeout_s, counter)
            return
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            stale = record.status == 0 and not isinstance(exc, aiohttp.ClientConnectorError)
            if not (stale and tries_left):
                record.error, record.detail = Failure.CONNECT, f"{type(exc).__name__}: {exc}"
                return
            record.resent += 1


async def _send_once(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
    record: RequestRecord, timeout_s: float, counter: TokenCounter | None,
) -> None:
    """One try; raises only for a connection that failed before any response (a status
    line) arrived, which the caller may try again."""
    record.t0 = perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, data=body, headers=headers) as resp:
                record.status = resp.status
                record.backend = resp.headers.get("x-sluiceway-backend")
                if resp.status != 200:
                    record.error = Failure.HTTP
                    record.detail = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return
                tally = StreamTally(record, counter)
                async for raw in resp.content.iter_any():
                    if not tally.feed(raw, perf_counter()):
                        break
                tally.finish()
    except TimeoutError:
        first = record.first_choice is None
        record.error = Failure.TIMEOUT_FIRST if first else Failure.TIMEOUT_STREAM
        record.detail = f"no {'first token' if first else 'end'} within {timeout_s:g} s"
    except aiohttp.ClientConnectorError as exc:
        record.error, record.detail = Failure.CONNECT, str(exc)[:200]
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        if record.status == 0:
            raise  # nothing came back: maybe a stale pooled connection (see send)
        record.error, record.detail = Failure.CUT, "connection lost mid-stream"
    except (aiohttp.ClientError, OSError) as exc:
        started = record.first_byte is not None
        record.error = Failure.CUT if started else Failure.CONNECT
        record.detail = f"{type(exc).__name__}: {exc}"[:200]


def _has_choices(data: bytes, escaped: bool) -> bool:
    """A non-empty `choices` array (vLLM's test for a token-bearing message)."""
    at = data.find(b'"choices"')
    if at > 0 and data[at - 1] != _BACKSLASH and _NON_EMPTY_ARRAY.match(data, at + 9):
        return True
    if not escaped:
        return False
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and isinstance(event.get("choices"), list) \
        and bool(event["choices"])


def _is_error(data: bytes, record: RequestRecord) -> bool:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if isinstance(event, dict) and "error" in event and "choices" not in event:
        record.error = Failure.CUT
        error = event["error"]
        record.detail = str(error.get("message") if isinstance(error, dict) else error)[:200]
        return True
    return False


def _usage(data: bytes) -> dict[str, Any] | None:
    usage = usage_in(data)
    return usage if usage and "completion_tokens" in usage else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _delta_text(data: bytes) -> str:
    try:
        choice = orjson.loads(data)["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""
    delta = choice.get("delta") or {}
    parts = (delta.get("reasoning_content"), delta.get("reasoning"), delta.get("content"),
             choice.get("text"))
    return "".join(p for p in parts if isinstance(p, str))
