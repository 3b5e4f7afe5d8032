"""Writing JSON and server-sent events in every valid style, for the counting tests.

Servers differ in how they write the same events: compact or spaced or pretty JSON, keys
in any order, non-ASCII text escaped or not (even keys can be spelled with `\\u` escapes),
LF, CRLF or CR line ends, `data:` with or without a space, long data split over several
`data:` lines, `event:` lines, comments. `Style` names one such choice; the test upstream
answers in a style set through /_control, and the property tests draw them at random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Style:
    json: str = "compact"  # compact | spaced | pretty
    ascii: bool = False  # non-ASCII characters as \\u escapes (Python's json.dumps default)
    escape_keys: bool = False  # every key's letters as \\u escapes
    reverse_keys: bool = False  # keys in reverse order
    line_end: str = "\n"  # "\n" | "\r\n" | "\r"
    data_space: bool = True  # "data: x" or "data:x"
    comments: bool = False  # ": ping" lines before each event and between its data lines
    split_data: bool = False  # compact JSON over several data: lines, cut between tokens
    usage: bool = True  # send usage (False: a server that never reports it)
    done: bool = True  # end chat streams with [DONE]; False: as transformers serve does,
    # the last chunk carries finish_reason (and usage) and the body ends there

    @classmethod
    def named(cls, name: str) -> Style:
        return STYLES[name]


STYLES = {
    "compact": Style(),
    "spaced": Style(json="spaced"),  # json.dumps' default separators
    "python": Style(json="spaced", ascii=True),  # json.dumps with all its defaults
    "pretty": Style(json="pretty", line_end="\r\n", comments=True),
    "cr": Style(line_end="\r", data_space=False, reverse_keys=True),
    "escaped": Style(escape_keys=True, ascii=True, split_data=True, comments=True),
    "no_usage": Style(json="spaced", usage=False),
    "transformers": Style(done=False),
}


def dump(value: Any, style: Style, indent: int = 0) -> str:
    """`value` as JSON in `style` (pretty: two-space indentation)."""
    pretty = style.json == "pretty"
    colon = ": " if style.json != "compact" else ":"
    comma = "," if pretty or style.json == "compact" else ", "
    pad = "\n" + "  " * (indent + 1) if pretty else ""
    close = "\n" + "  " * indent if pretty else ""
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = list(value.items())
        if style.reverse_keys:
            items.reverse()
        parts = [_key(k, style) + colon + dump(v, style, indent + 1) for k, v in items]
        return "{" + pad + (comma + pad).join(parts) + close + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        parts = [dump(v, style, indent + 1) for v in value]
        return "[" + pad + (comma + pad).join(parts) + close + "]"
    return json.dumps(value, ensure_ascii=style.ascii)


def _key(key: str, style: Style) -> str:
    if style.escape_keys:
        return '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'
    return json.dumps(key, ensure_ascii=style.ascii)


def event(data: Any, style: Style, name: str | None = None) -> bytes:
    """One SSE event: `data` (a JSON value, or raw text such as [DONE]) in `style`."""
    text = data if isinstance(data, str) else dump(data, style)
    lines = text.split("\n")
    if style.split_data and len(lines) == 1 and not isinstance(data, str):
        lines = _cut_between_tokens(text)
    end = style.line_end
    out = []
    if style.comments:
        out.append(": ping" + end)
    if name:
        out.append("event: " + name + end)
    prefix = "data: " if style.data_space else "data:"
    for i, line in enumerate(lines):
        if style.comments and i:
            out.append(": keep-alive" + end)
        out.append(prefix + line + end)
    out.append(end)
    return "".join(out).encode()


def _cut_between_tokens(text: str) -> list[str]:
    """Compact JSON cut after each comma that is outside a string: joined again with LF
    (as the SSE spec joins data lines), it is the same JSON with whitespace added."""
    lines, start, in_string, escaped = [], 0, False, False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            in_string = not in_string
        elif c == "," and not in_string:
            lines.append(text[start:i + 1])
            start = i + 1
    return [*lines, text[start:]]
