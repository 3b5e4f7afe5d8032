"""Server-sent events framed as the WHATWG spec says, incrementally, from raw reads.

Lines end in CRLF, LF or a lone CR; a blank line ends an event; `data:` fields (with or
without one space after the colon) join with LF into the event's data; `event:` names it;
comment lines (`: ping`) and unknown fields are ignored; a read may end anywhere, even
between the CR and LF of one line end. Each blank line is reported with the offset, in the
read that held it, just past it, so a relay can cut the stream there; a block without
`data:` (comments only, say) comes out with `data` None, which the spec does not dispatch.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_SPACE = ord(" ")
_CR = ord("\r")  # an int: membership of one byte is a memchr, 10 times cheaper


class Event:
    """One block of lines up to a blank line (made once per token: a plain slotted class,
    three times cheaper to make than a frozen dataclass)."""

    __slots__ = ("data", "end", "name")

    def __init__(self, data: bytes | None, name: bytes = b"", end: int = 0) -> None:
        self.data = data  # None: a block with no data field (not an event by the spec)
        self.name = name
        self.end = end  # offset just past the block's blank line in the read that ended it


class Framer:
    """Feed reads, get whole events. One framer per stream."""

    __slots__ = ("_data", "_line", "_name", "_skip_lf")

    def __init__(self) -> None:
        self._line = b""  # the current line's start, when a read ended inside it
        self._data: list[bytes] = []
        self._name = b""
        self._skip_lf = False  # the last read ended in CR: an LF next is the same line end

    def feed(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
        if not (self._line or self._data or self._name or self._skip_lf) \
                and chunk.startswith(b"data:") \
                and chunk.endswith(b"\n\n") and _CR not in chunk:
            if chunk.find(b"\n") == len(chunk) - 2:  # one event of one line: most reads
                return [Event(chunk[6:-2] if chunk[5] == _SPACE else chunk[5:-2], b"",
                              len(chunk))]
            fast = _plain_events(chunk)
            if fast is not None:
                return fast
        start = 0
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                start = 1
        events: list[Event] = []
        if _CR in chunk:
            ends = [(m.start(), m.end()) for m in _LINE_END.finditer(chunk, start)]
            if ends and chunk.endswith(b"\r"):
                self._skip_lf = True
        else:
            ends = []
            at = chunk.find(b"\n", start)
            while at >= 0:
                ends.append((at, at + 1))
                at = chunk.find(b"\n", at + 1)
        for stop, after in ends:
            line = chunk[start:stop]
            if self._line:
                line, self._line = self._line + line, b""
            start = after
            if line:
                self._field(line)
            else:
                data = b"\n".join(self._data) if self._data else None
                events.append(Event(data, self._name, after))
                self._data, self._name = [], b""
        if start < len(chunk):
            self._line += chunk[start:]
        return events

    @property
    def inside_event(self) -> bool:
        """Part of an event (a field: its name counts) has been read but not its blank
        line."""
        return bool(self._line or self._data or self._name)

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            return  # a comment
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._name = value


def _plain_events(chunk: bytes) -> list[Event] | None:
    """The common read, framed quickly: whole events of one `data:` line each, LF ends
    (what llama.cpp and vLLM send). None when the read is anything else."""
    parts = chunk.split(b"\n\n")
    events = []
    end = 0
    for part in parts[:-1]:
        if not part.startswith(b"data:") or b"\n" in part:
            return None
        end += len(part) + 2
        events.append(Event(part[6:] if part[5:6] == b" " else part[5:], b"", end))
    return events
