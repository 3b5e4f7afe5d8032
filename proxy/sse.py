"""Watching a server-sent-event stream on its way through, without re-encoding it.

Chunks go to the client as they arrived. The observer only
- notes when the first generated content passed (a byte pattern search, stopped once found),
- keeps references to the last few chunks so `usage` can be parsed once, at the end,
- and, when sluiceway itself asked the upstream for usage, removes that extra usage event.
  Only in that mode is forwarding aligned to event boundaries (a partial trailing event is
  held back until its end arrives). llama.cpp moves `timings` from the finish chunk to the
  usage chunk when usage is asked for, so the finish chunk is held until the next event
  and gets the `timings` back: the client sees what it would have seen without sluiceway.
  The usage chunk is by the API's definition the last before `data: [DONE]`, so only the
  last three events of each read are looked at (the finish event, the usage event, the
  end): the cost per read does not grow with the number of events in it.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import orjson

# Generated output in any of the streamed shapes: chat (content, reasoning, tool calls),
# completions (text), Responses (delta), Anthropic (text_delta / partial_json).
_CONTENT = re.compile(
    rb'"(?:content|text|reasoning_content|reasoning|delta|partial_json)":\s*"[^"]'
    rb'|"tool_calls":\s*\[\s*\{'
)
_USAGE_ONLY_EVENT = re.compile(rb'"choices":\s*\[\s*\]')
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')  # a pre-filter: only says "maybe"
_MESSAGE_START = b'"message_start"'  # Anthropic: the prompt's usage comes first
_TAIL_CHUNKS = 8


def event_end(data: bytes) -> int:
    """Index just past the last complete SSE event in `data`, or 0 if there is none."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def event_separator(data: bytes) -> bytes | None:
    """The blank line that ends this stream's events, once one event has ended in `data`.
    (CRLF streams never contain two LFs in a row: JSON escapes the line breaks it carries.)"""
    if b"\n\n" in data:
        return b"\n\n"
    return b"\r\n\r\n" if b"\r\n\r\n" in data else None


def last_events_start(data: bytes, count: int, separator: bytes) -> int:
    """Where the last `count` events of event-aligned `data` begin (0 if it has fewer)."""
    end = len(data) - len(separator)
    for _ in range(count):
        at = data.rfind(separator, 0, end)
        if at < 0:
            return 0
        end = at
    return end + len(separator)


class StreamObserver:
    __slots__ = ("_held", "_opening_usage", "_pending", "_separator", "_strip_usage", "_tail",
                 "first_content_at", "mid_event")

    def __init__(self, strip_usage: bool) -> None:
        self._strip_usage = strip_usage
        self._pending = b""
        self._held: bytes | None = None  # a finish event waiting for the usage event
        self._separator: bytes | None = None  # known once the first event has ended
        self._tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        self.first_content_at: float | None = None
        self.mid_event = False  # the client has seen part of an event but not its end
        self._opening_usage: dict[str, Any] | None = None  # Anthropic message_start's

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Take one upstream chunk; return the bytes to send on (possibly empty)."""
        if self.first_content_at is None:
            if self._opening_usage is None and _MESSAGE_START in chunk:
                self._opening_usage = _last_usage(chunk, _MESSAGE_START)
            if _CONTENT.search(chunk):
                self.first_content_at = now
        self._tail.append(chunk)
        if self._strip_usage:
            return self._strip(chunk)
        self.mid_event = not chunk.endswith(b"\n")
        return chunk

    def flush(self) -> bytes:
        """Whatever was held back, at the normal end of the stream."""
        rest = (self._held or b"") + self._pending
        self._held, self._pending = None, b""
        return rest

    def complete_events(self) -> bytes:
        """Held-back whole events, when the stream breaks (a partial event is dropped)."""
        held, self._held, self._pending = self._held or b"", None, b""
        return held

    def usage(self) -> dict[str, Any] | None:
        """The stream's usage: the last `usage` object in it, over what Anthropic's
        `message_start` said (its `message_delta` carries the output count only)."""
        final = _last_usage(b"".join(self._tail))
        if self._opening_usage is None:
            return final
        return {**self._opening_usage, **{k: v for k, v in (final or {}).items() if v}}

    def _strip(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        separator = self._separator
        if separator is None:
            separator = self._separator = event_separator(data)
            if separator is None:  # not one whole event yet
                self._pending = data
                return b""
        at = data.rfind(separator)
        cut = at + len(separator) if at >= 0 else 0
        complete, self._pending = data[:cut], data[cut:]
        if self._held is None:
            start = last_events_start(complete, 3, separator)
            tail = complete[start:]
            if _FINISH not in tail and b'"usage"' not in tail:
                return complete  # the common case: plain token events, passed as they are
            head, complete = complete[:start], tail
        else:
            head = b""
        out: list[bytes] = [head]
        for event in _events(complete):
            if _is_usage_only(event):
                if self._held is not None and b'"timings"' in event:
                    self._held = _move_timings(event, self._held)
                continue
            if self._held is not None:
                out.append(self._held)
                self._held = None
            if _FINISH in event:
                self._held = event
            else:
                out.append(event)
        return b"".join(out)


def _events(data: bytes) -> list[bytes]:
    """Whole events (each with its blank-line terminator) of event-aligned `data`."""
    if b"\r\n\r\n" in data:
        return [e for e in re.split(rb"(?<=\n\n)|(?<=\r\n\r\n)", data) if e]
    return [part + b"\n\n" for part in data.split(b"\n\n")[:-1]]


_FINISH = b'"finish_reason":"'


def _move_timings(source: bytes, target: bytes) -> bytes:
    """`target` event with the `timings` of `source` (both `data: {...}` events)."""
    try:
        timings = orjson.loads(source.split(b":", 1)[1])["timings"]
        event = orjson.loads(target.split(b":", 1)[1])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return target
    event["timings"] = timings
    return b"data: " + orjson.dumps(event) + target[len(target.rstrip(b"\r\n")):]


def _is_usage_only(event: bytes) -> bool:
    return b'"usage"' in event and _USAGE_ONLY_EVENT.search(event) is not None


def _last_usage(data: bytes, marker: bytes = b"") -> dict[str, Any] | None:
    """The usage of the last `data:` line of `data` that has one (and `marker`). Lines, not
    byte offsets: a JSON string cannot hold a raw line break, so a line that starts with
    `data:` is the start of an event's data even if generated text says "data:" too; a
    partial line cut by a read fails to parse and is passed over."""
    for line in reversed(data.splitlines()):
        if line.startswith(b"data:") and marker in line and _USAGE_KEY.search(line):
            try:
                found = _find_usage(orjson.loads(line[5:]))
            except orjson.JSONDecodeError:
                continue
            if found is not None:
                return found
    return None


def _find_usage(event: Any) -> dict[str, Any] | None:
    """`usage` at the top level, or inside `response` / `message` (Responses, Anthropic)."""
    if not isinstance(event, dict):
        return None
    for holder in (event, event.get("response"), event.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            usage: dict[str, Any] = holder["usage"]
            return usage
    return None


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, output, cached prompt) tokens from an OpenAI, Responses or Anthropic usage
    object; cached is 0 where the backend does not report it."""
    if not usage:
        return 0, 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    output = usage.get("completion_tokens", usage.get("output_tokens", 0))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    if "cache_read_input_tokens" in usage:  # Anthropic: input_tokens excludes the cache
        cached = _count(usage["cache_read_input_tokens"])
        prompt = _count(prompt) + cached + _count(usage.get("cache_creation_input_tokens"))
    return (_count(prompt), _count(output), _count(cached))


def _count(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def usage_of_body(body: bytes) -> dict[str, Any] | None:
    """`usage` of a whole (non-streamed) JSON reply."""
    try:
        return _find_usage(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None
