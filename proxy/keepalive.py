"""Early headers with protocol keep-alives, for deployments behind an ingress that times
out a response that stays silent (`server.stream_keepalive_s`, off by default).

Normally a streamed response is held until the backend's first bytes, so that a backend
that fails before them can be retried on another. With keep-alives on, a stream still
silent after N seconds is committed (200, `text/event-stream`) and gets one keep-alive
event every N seconds until the first upstream byte, in the client's API:

- Messages: `event: ping` (the Anthropic SDKs skip it; Claude Code's idle watchdog
  counts it);
- Chat, Completions and Responses: an SSE comment. Clients and ingresses see bytes; the
  openai SDK ignores it. Codex's own idle timer (`stream_idle_timeout_ms`, 300 s by
  default) is not reset by comments, and no data-bearing Responses event can come before
  the backend's `response.created` without breaking the openai SDK's stream helper (it
  checks the response's identity), so none is sent.

Once headers are out, a failure (the backend down, a 5xx, a 4xx) can no longer be
retried or answered with a status: it ends the stream with an in-band error event in the
client's API, as a failure after the first byte does.
"""

from __future__ import annotations

import orjson

from proxy.errors import ProxyError

_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
_COMMENT = b": keep-alive\n\n"


def keepalive_event(api: str) -> bytes:
    return _PING if api == "messages" else _COMMENT


def error_event(api: str, error: ProxyError) -> bytes:
    """The in-band error that ends a committed stream, in the client's API."""
    if api == "messages":
        return b"event: error\ndata: " + error.body(anthropic=True) + b"\n\n"
    if api == "responses":
        return b"event: error\ndata: " + orjson.dumps({
            "type": "error", "code": error.code, "message": error.message,
            "param": None}) + b"\n\n"
    return b"data: " + error.body() + b"\n\n"
