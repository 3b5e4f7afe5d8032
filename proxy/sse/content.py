"""Which stream events carry generated output, per API.

A stream without usage is counted by its content events (llama.cpp and vLLM send one token
per event), and first content is when the first of them passed. A byte pattern decides in
the common case; it can only miss a key written with `\\u` escapes, so an event holding
any such escape is decided on its parsed JSON instead. Generated text cannot match a
pattern by accident: inside a JSON string every quote is escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.sse.usage import has_escape


@dataclass(frozen=True, slots=True)
class ContentRule:
    """Keys whose non-empty string value (or, for `lists`, a non-empty list of objects)
    marks an event as generated output, wherever in the event they appear."""

    name: str
    texts: tuple[str, ...]
    lists: tuple[str, ...] = ()
    last: tuple[bytes, ...] = ()  # the `type` of the stream's last event, where it has one
    pattern: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    compact: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _pattern(self.texts, self.lists))
        # `"content":"` as compact JSON writes it: a substring search finds the usual
        # event's text four times faster than the pattern, which every spelling needs
        object.__setattr__(self, "compact", tuple(f'"{k}":"'.encode() for k in self.texts))

    def carries(self, data: bytes, escaped: bool | None = None) -> bool:
        """`escaped`: whether `data` holds a `\\u` escape, when the caller knows."""
        for key in self.compact:
            at = data.find(key)
            if at > 0 and data[at - 1] != _BACKSLASH:
                after = at + len(key)
                if data[after:after + 1] != b'"':
                    return True
        match = self.pattern.search(data)
        while match is not None:
            at = match.start()
            # a quote after a backslash is inside a string (in valid JSON a closing quote
            # is never followed by a key's letters): `{"a\"text": "x"}` has no key `text`
            if at == 0 or data[at - 1] != _BACKSLASH:
                return True
            match = self.pattern.search(data, at + 1)
        if not (has_escape(data) if escaped is None else escaped):
            return False
        try:
            return self.found(orjson.loads(data))
        except orjson.JSONDecodeError:
            return False

    def ends(self, data: bytes) -> bool:
        """The stream's last event: `[DONE]` (chat, completions) or one whose `type` is
        in `last` (Responses, Messages)."""
        if not self.last:
            return data == b"[DONE]" or (len(data) < 16 and data.strip() == b"[DONE]")
        return any(marker in data for marker in self.last) and _type_of(data) in self.last

    def found(self, value: Any) -> bool:
        """The same decision on a parsed event."""
        if isinstance(value, list):
            return any(self.found(v) for v in value)
        if not isinstance(value, dict):
            return False
        for key, inner in value.items():
            if key in self.texts and isinstance(inner, str) and inner:
                return True
            if key in self.lists and isinstance(inner, list) and inner \
                    and isinstance(inner[0], dict):
                return True
            if self.found(inner):
                return True
        return False


_BACKSLASH = ord("\\")


def _type_of(data: bytes) -> bytes | None:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    kind = event.get("type") if isinstance(event, dict) else None
    return f'"{kind}"'.encode() if isinstance(kind, str) else None


def _pattern(texts: tuple[str, ...], lists: tuple[str, ...]) -> re.Pattern[bytes]:
    alternatives = [rb'"(?:' + b"|".join(k.encode() for k in texts) + rb')"\s*:\s*"[^"]']
    if lists:
        alternatives.append(
            rb'"(?:' + b"|".join(k.encode() for k in lists) + rb')"\s*:\s*\[\s*\{')
    return re.compile(b"|".join(alternatives))


# chat (content, reasoning, tool calls) and completions (text)
CHAT = ContentRule("chat", ("content", "text", "reasoning_content", "reasoning"),
                   ("tool_calls",))
# Responses: every `*.delta` event has a string `delta`; the `*.done` events repeat the
# whole text under `text`, which must not count again
RESPONSES = ContentRule("responses", ("delta",), last=(
    b'"response.completed"', b'"response.incomplete"', b'"response.failed"'))
# Anthropic Messages: content_block_delta's text_delta / input_json_delta / thinking_delta
MESSAGES = ContentRule("messages", ("text", "partial_json", "thinking"),
                       last=(b'"message_stop"',))


_FINISH_VALUE = re.compile(rb'\s*:\s*"')  # after the key


def finishes(data: bytes | None) -> bool:
    """A chat or completions event with a `finish_reason` that is a string (vLLM sends
    `null` in every other chunk): the choice is complete."""
    if data is None:
        return False
    at = data.find(b'"finish_reason"')
    return at >= 0 and _FINISH_VALUE.match(data, at + 15) is not None
