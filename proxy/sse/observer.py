"""Watching a server-sent-event stream on its way through, without re-encoding it.

Chunks go to the client as they arrived. The observer frames them into events (see
`framing`) and only
- notes when the first generated content passed and counts the events that carried some
  (`content`): the output count of a stream that reports no usage,
- keeps the last few events that may hold `usage`, to parse once, at the end (and
  Anthropic's `message_start`, whose usage has the prompt's count),
- and, when sluiceway itself asked the upstream for usage, removes that extra usage event.
  Only in that mode is forwarding aligned to event boundaries (a partial trailing event is
  held back until its end arrives). llama.cpp moves `timings` from the finish chunk to the
  usage chunk when usage is asked for, so the finish chunk is held until the next event
  and gets the `timings` back: the client sees what it would have seen without sluiceway.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import orjson

from proxy.sse.content import CHAT, ContentRule, finishes
from proxy.sse.framing import Event, Framer
from proxy.sse.usage import has_escape, might_hold_usage, usage_in

_USAGE_ONLY_EVENT = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_MESSAGE_START = b'"message_start"'  # Anthropic: the prompt's usage comes first
_USAGE_EVENTS_KEPT = 4


class StreamObserver:
    __slots__ = ("_framer", "_held", "_held_raw", "_opening", "_pending", "_rule",
                 "_strip_usage", "_usage_events", "content_events", "ended",
                 "finished", "first_content_at")

    def __init__(self, strip_usage: bool, content: ContentRule = CHAT) -> None:
        self._strip_usage = strip_usage
        self._rule = content
        self._framer = Framer()
        self._pending = b""  # strip mode: bytes of the event not yet ended
        self._held: Event | None = None  # strip mode: a finish event awaiting the usage one
        self._held_raw = b""
        self._usage_events: deque[bytes] = deque(maxlen=_USAGE_EVENTS_KEPT)
        self._opening: bytes | None = None  # Anthropic message_start's data
        self.first_content_at: float | None = None
        self.content_events = 0
        self.ended = False  # the stream's last event has passed (and was handed on)
        self.finished = False  # chat/completions: a choice ended (a finish_reason passed)

    @property
    def mid_event(self) -> bool:
        """The client has seen part of an event but not its end."""
        return not self._strip_usage and self._framer.inside_event

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Take one upstream chunk; return the bytes to send on (possibly empty)."""
        events = self._framer.feed(chunk)
        dropped: list[Event] = []  # strip mode: the usage-only events
        finishing: list[Event] = []  # strip mode: events whose choice finished
        for event in events:
            data = event.data
            if data is None:
                continue
            escaped = has_escape(data)
            if self._rule.carries(data, escaped):
                self.content_events += 1
                if self.first_content_at is None:
                    self.first_content_at = now
            fin = (self._strip_usage or not self._rule.last) and finishes(data)
            if fin and self._strip_usage:
                finishing.append(event)
            if self._rule.ends(data):
                self.ended = True
            elif fin and not self._rule.last:
                self.finished = True
            if might_hold_usage(data, escaped):
                if self._opening is None and _MESSAGE_START in data:
                    self._opening = data
                else:
                    self._usage_events.append(data)
                if self._strip_usage and _is_usage_only(data, escaped):
                    dropped.append(event)
        if self._strip_usage:
            return self._strip(chunk, events, dropped, finishing)
        return chunk

    def flush(self) -> bytes:
        """Whatever was held back, at the normal end of the stream."""
        rest = self._held_raw + self._pending
        self._held, self._held_raw, self._pending = None, b"", b""
        return rest

    def complete_events(self) -> bytes:
        """Held-back whole events, when the stream breaks (a partial event is dropped)."""
        held = self._held_raw
        self._held, self._held_raw, self._pending = None, b"", b""
        return held

    def usage(self) -> dict[str, Any] | None:
        """The stream's usage: the last `usage` object in it, over what Anthropic's
        `message_start` said (its `message_delta` carries the output count only)."""
        final = None
        for data in reversed(self._usage_events):
            final = usage_in(data)
            if final is not None:
                break
        opening = usage_in(self._opening) if self._opening is not None else None
        if opening is None:
            return final
        return {**opening, **{k: v for k, v in (final or {}).items() if v}}

    def _strip(self, chunk: bytes, events: list[Event], dropped: list[Event],
               finishing: list[Event]) -> bytes:
        """Strip mode's output for one read: the usage-only events dropped, and an event
        whose choice finished held back until the next (its usage may follow). `dropped`
        and `finishing` are what `feed` found among `events`."""
        if not events:
            self._pending += chunk
            return b""
        if len(events) == 1 and not (dropped or finishing or self._pending or self._held) \
                and events[0].end == len(chunk):
            return chunk  # the common read: one whole token event, passed as it is
        out: list[bytes] = []
        start = 0
        for event in events:
            raw = chunk[start:event.end]
            if self._pending:
                raw, self._pending = self._pending + raw, b""
            start = event.end
            data = event.data
            if data is not None and event in dropped:
                if self._held is not None and b'"timings"' in data:
                    self._held_raw = _move_timings(data, self._held, self._held_raw)
                continue
            if self._held is not None:
                out.append(self._held_raw)
                self._held, self._held_raw = None, b""
            if any(event is f for f in finishing):
                self._held, self._held_raw = event, raw
            else:
                out.append(raw)
        self._pending = chunk[start:]
        return b"".join(out)


def _move_timings(source: bytes, target: Event, raw: bytes) -> bytes:
    """The `target` event, re-encoded with the `timings` of the `source` event's data."""
    try:
        timings = orjson.loads(source)["timings"]
        event = orjson.loads(target.data or b"")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw
    if not isinstance(event, dict):
        return raw
    event["timings"] = timings
    return b"data: " + orjson.dumps(event) + raw[len(raw.rstrip(b"\r\n")):]


def _is_usage_only(data: bytes, escaped: bool) -> bool:
    """The chunk that carries only usage (`"choices": []`), however its JSON is written
    (called for events that may hold usage)."""
    if not escaped and _USAGE_ONLY_EVENT.search(data) is None:
        return False
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and event.get("choices") == [] \
        and isinstance(event.get("usage"), dict)
