"""Sending one streamed request and timing it, without decoding every event.

Each `data:` line is classified by byte patterns: a `choices` array that is not empty
marks a choices message (TTFT, ITL, E2EL), generated text marks first content, and only
lines carrying `usage` or `error` are parsed as JSON. That keeps the client cheap enough to
measure fast servers (see docs/benchmarks.md for its measured ceiling).
"""

from __future__ import annotations

import asyncio
import re
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from loadgen.record import Failure, RequestRecord

_EMPTY_CHOICES = re.compile(rb'"choices":\s*\[\s*\]')
_CHOICES = re.compile(rb'"choices":\s*\[')
_CONTENT = re.compile(rb'"(?:content|text|reasoning_content)":\s*"[^"]')


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    record: RequestRecord,
    timeout_s: float,
) -> None:
    """Run one request, filling `record`. Never raises for a failed request."""
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
                await _read_stream(resp, record)
    except TimeoutError:
        first = record.first_choice is None
        record.error = Failure.TIMEOUT_FIRST if first else Failure.TIMEOUT_STREAM
        record.detail = f"no {'first token' if first else 'end'} within {timeout_s:g} s"
    except aiohttp.ClientConnectorError as exc:
        record.error, record.detail = Failure.CONNECT, str(exc)[:200]
    except (aiohttp.ClientError, OSError) as exc:
        started = record.first_byte is not None
        record.error = Failure.CUT if started else Failure.CONNECT
        record.detail = f"{type(exc).__name__}: {exc}"[:200]


async def _read_stream(resp: aiohttp.ClientResponse, record: RequestRecord) -> None:
    done = False
    usage: dict[str, Any] | None = None
    buffer = b""
    async for raw in resp.content.iter_any():
        now = perf_counter()
        if record.first_byte is None:
            record.first_byte = now
        buffer = buffer + raw if buffer else raw
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            if b'"error"' in payload and _is_error(payload, record):
                return
            if b'"usage":{' in payload:
                usage = _usage(payload) or usage
            if _CHOICES.search(payload) and not _EMPTY_CHOICES.search(payload):
                if record.first_choice is None:
                    record.first_choice = now
                else:
                    record.itl.append(now - record.last_choice)  # type: ignore[operator]
                record.last_choice = now
                if record.first_content is None and _CONTENT.search(payload):
                    record.first_content = now
                if record.text is not None:
                    record.text.append(_delta_text(payload))
    if record.first_choice is None:
        record.error = Failure.PAYLOAD
        record.detail = "Never received a valid chunk to calculate TTFT."
        return
    if not done:
        record.error, record.detail = Failure.CUT, "stream ended without [DONE]"
        return
    if usage:
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    if not record.output_tokens:
        record.output_tokens = 1  # vLLM's fallback with no usage and no tokenizer


def _is_error(payload: bytes, record: RequestRecord) -> bool:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    if isinstance(event, dict) and "error" in event and "choices" not in event:
        record.error = Failure.CUT
        error = event["error"]
        record.detail = str(error.get("message") if isinstance(error, dict) else error)[:200]
        return True
    return False


def _usage(payload: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    usage = event.get("usage") if isinstance(event, dict) else None
    return usage if isinstance(usage, dict) else None


def _delta_text(payload: bytes) -> str:
    try:
        choice = orjson.loads(payload)["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""
    delta = choice.get("delta") or {}
    return str(delta.get("content") or choice.get("text") or "")
