"""Reading a Chat Completions stream, for the translations: whole JSON chunks out of raw
reads (framed per the SSE spec), the `[DONE]` marker and unparseable events skipped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from proxy.sse.framing import Framer


def chunks(framer: Framer, read: bytes) -> Iterator[dict[str, Any]]:
    for event in framer.feed(read):
        if event.data is None or event.data == b"[DONE]":
            continue
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            yield data
