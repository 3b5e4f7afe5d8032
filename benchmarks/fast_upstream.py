"""A fast OpenAI-compatible streaming upstream for benchmarks.

`python -m benchmarks.fast_upstream --port N [--tokens 64] [--token-delay-ms 0]`
Every chat or completions request streams `max_tokens` (default --tokens) chunks, with an
optional sleep between them; chunk bytes are prebuilt so the server spends its CPU on I/O.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
import uvicorn

_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _chunk(i: int) -> bytes:
    delta = {"role": "assistant", "content": f" t{i}"} if i == 0 else {"content": f" t{i}"}
    event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": "bench",
             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


class FastUpstream:
    def __init__(self, tokens: int, token_delay_s: float) -> None:
        self.tokens = tokens
        self.delay = token_delay_s
        self.chunks = [_chunk(i) for i in range(4096)]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await receive()
                await send({"type": "lifespan.startup.complete"})
                await receive()
                await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] in ("/health", "/v1/models"):
            payload = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": payload})
            return
        request = orjson.loads(body) if body else {}
        n = min(int(request.get("max_tokens") or self.tokens), len(self.chunks))
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        for i in range(n):
            if self.delay:
                await asyncio.sleep(self.delay)
            await send({"type": "http.response.body", "body": self.chunks[i], "more_body": True})
        usage = b'data: {"id":"chatcmpl-bench","choices":[],"usage":{"prompt_tokens":8,' \
                b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 8)
        options = request.get("stream_options") or {}
        tail = (usage if options.get("include_usage") else b"") + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(FastUpstream(args.tokens, args.token_delay_ms / 1000), host="127.0.0.1",
                port=args.port, log_level="warning", access_log=False, loop="uvloop",
                http="httptools", backlog=4096)


if __name__ == "__main__":
    main()
