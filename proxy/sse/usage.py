"""Token usage in what a backend sent: OpenAI, Responses and Anthropic shapes.

`might_hold_usage` is the cheap pre-filter (it can only say "maybe"); `usage_in` then
parses. The pre-filter lets through any event with a `usage` key however it is spaced, and
any event holding a `\\u` escape, since a key may be spelled with escapes too.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_BACKSLASH = ord("\\")


def has_escape(data: bytes) -> bool:
    """A `\\u` escape somewhere (a single-byte membership test first: it is 30 times
    cheaper, and most events hold no backslash at all)."""
    return _BACKSLASH in data and b"\\u" in data


def might_hold_usage(data: bytes, escaped: bool | None = None) -> bool:
    if escaped is None:
        escaped = has_escape(data)
    return escaped or (b'"usage"' in data and _USAGE_KEY.search(data) is not None)


def usage_in(data: bytes) -> dict[str, Any] | None:
    """`usage` of one event's (or one whole reply's) JSON: at the top level, or inside
    `response` (Responses) or `message` (Anthropic message_start)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
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
