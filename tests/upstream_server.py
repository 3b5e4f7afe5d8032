"""A small OpenAI-compatible server for the gateway's integration tests.

Run as `python -m tests.upstream_server --port N [...]`. It answers each generation API in
the shape vLLM gives it (tests/api_shapes.py: chat and completions chunks with the optional
usage chunk and [DONE]; Responses and Anthropic Messages events; embeddings and
count_tokens bodies), keeps
counts of what it saw under GET /_stats, and takes faults through POST /_control.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from typing import Any

import orjson
import uvicorn

from tests.api_shapes import Shape
from tests.sse_styles import Style, dump


class Upstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.active = 0
        self.max_active = 0
        self.requests = 0
        self.disconnects: list[float] = []
        self.events_sent = 0  # stream events handed to the server, over all requests
        # per finished stream, by the server's own clock: so timing tests compare a client's
        # figures with what really happened, not with the nominal delays (a sleep of 10 ms
        # takes 10.3 ms on a busy machine)
        self.timings: list[dict[str, Any]] = []
        self.last_body: dict[str, Any] = {}
        self.last_headers: dict[str, str] = {}
        self.fail_status = 0
        self.fail_count = 0
        self.die_after_chunks = -1
        self.garbage_count = 0
        self.piece = "tok{i} "  # each generated token's text; {i} is its index
        self.style = Style()  # how its JSON and events are written (tests/sse_styles.py)
        self.linger_s = 0.0  # pause between the last event and the end of the body
        self.token_delay_s = args.token_delay_ms / 1000
        self.first_delay_s = args.first_delay_ms / 1000

    def loading(self) -> bool:
        return time.monotonic() - self.started < self.args.loading_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if self.loading() and not path.startswith("/_"):
            return await _json(send, 503, {"error": {"message": "Loading model",
                                                     "type": "unavailable_error", "code": 503}})
        if path == "/health":
            return await _json(send, 200, {"status": "ok"})
        if path == "/v1/models":
            return await _json(send, 200, {"object": "list", "data": [
                {"id": self.args.model, "object": "model", "max_model_len": 4096}]})
        if path == "/props" and self.args.slots:
            return await _json(send, 200, {"total_slots": self.args.slots})
        if path == "/metrics" and self.args.kv_metric:  # as vLLM publishes its load
            text = (f"vllm:num_requests_running{{engine=\"0\"}} {self.active}\n"
                    f"vllm:num_requests_waiting{{engine=\"0\"}} 0\n"
                    f"{self.args.kv_metric}{{engine=\"0\"}} 0.25\n"
                    f"{self.args.kv_metric}{{engine=\"1\"}} 0.125\n")
            return await _send(send, 200, text.encode(), b"text/plain; version=0.0.4")
        if path == "/metrics" and self.args.slots:
            text = (f"llamacpp:requests_processing {self.active}\n"
                    "llamacpp:requests_deferred 0\n")
            return await _send(send, 200, text.encode(), b"text/plain; version=0.0.4")
        if path == "/_stats":
            return await _json(send, 200, {
                "active": self.active, "max_active": self.max_active, "requests": self.requests,
                "disconnects": self.disconnects, "events_sent": self.events_sent,
                "last_body": self.last_body,
                "last_headers": self.last_headers, "now": time.time(),
                "timings": self.timings,
            })
        if path == "/_control":
            self._control(orjson.loads(body))
            return await _json(send, 200, {"ok": True})
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                    "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"):
            await self._generate(scope, receive, send, path, orjson.loads(body))
            return None
        return await _json(send, 404, {"error": {"message": "not found", "type": "not_found"}})

    def _control(self, control: dict[str, Any]) -> None:
        self.fail_status = control.get("fail_status", self.fail_status)
        self.fail_count = control.get("fail_count", self.fail_count)
        self.die_after_chunks = control.get("die_after_chunks", self.die_after_chunks)
        self.garbage_count = control.get("garbage_count", self.garbage_count)
        self.piece = control.get("piece", self.piece)
        if "linger_ms" in control:
            self.linger_s = control["linger_ms"] / 1000
        if "style" in control:
            self.style = Style.named(control["style"])
        if "token_delay_ms" in control:
            self.token_delay_s = control["token_delay_ms"] / 1000
        if "first_delay_ms" in control:
            self.first_delay_s = control["first_delay_ms"] / 1000
        if control.get("reset"):
            self.max_active, self.requests, self.disconnects = self.active, 0, []
            self.timings = []

    async def _generate(self, scope: Any, receive: Any, send: Any, path: str,
                        req: dict[str, Any]) -> None:
        self.requests += 1
        self.last_body = req
        self.last_headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        unexpected = set(req) & set(self.args.reject_fields)
        if unexpected:  # as transformers serve answers fields it does not know
            await _json(send, 422, {"detail": f"Unexpected fields in the request: "
                                              f"{sorted(unexpected)}"})
            return
        if self.fail_count:
            self.fail_count -= 1
            await _json(send, self.fail_status, {"error": {
                "message": f"injected {self.fail_status}", "type": "server_error",
                "code": self.fail_status}}, [(b"retry-after", b"1")])
            return
        if self.garbage_count:  # 200, but nothing a client can use
            self.garbage_count -= 1
            await _send(send, 200, b'data: {"oops": 1}\n\ndata: [DONE]\n\n',
                        b"text/event-stream")
            return
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._answer(receive, send, path, req,
                               self.last_headers.get("x-request-id", ""))
        finally:
            self.active -= 1

    async def _answer(self, receive: Any, send: Any, path: str, req: dict[str, Any],
                      request_id: str) -> None:
        arrival = time.perf_counter()
        n = int(req.get("max_tokens") or req.get("max_completion_tokens")
                or req.get("max_output_tokens") or 8)
        prompt = req.get("messages") or req.get("input") or req.get("prompt") or ""
        prompt_tokens = len(orjson.dumps(prompt)) // 4
        shape = Shape(path, req, prompt_tokens, [self.piece.format(i=i) for i in range(n)],
                      self.style)
        await asyncio.sleep(self.first_delay_s)
        if path == "/v1/embeddings":
            await _json(send, 200, {"object": "list", "model": req["model"], "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
            return
        if path == "/v1/messages/count_tokens":
            await _json(send, 200, {"input_tokens": prompt_tokens})
            return
        if not req.get("stream"):
            await asyncio.sleep(self.token_delay_s * n)
            await _send(send, 200, dump(shape.whole(self.args.name), self.style).encode(),
                        b"application/json")
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnects.append(time.time())
            disconnected.set()

        watcher = asyncio.create_task(watch())
        sent: list[float] = []
        try:
            for event in shape.opening():
                await _body(send, event)
            for i in range(shape.n):
                if disconnected.is_set():
                    return
                if i == self.die_after_chunks:
                    raise ConnectionAbortedError("injected death mid-stream")
                sent.append(time.perf_counter())  # before the write: see _record
                await _body(send, shape.token(i))
                self.events_sent += 1
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
            closing = shape.closing()
            for event in closing[:-1]:
                await _body(send, event)
            if self.linger_s:  # the last event, then a pause before the end of the body
                await _body(send, closing[-1])
                await asyncio.sleep(self.linger_s)
                end = time.perf_counter()
                await send({"type": "http.response.body", "body": b""})
            else:
                end = time.perf_counter()
                await send({"type": "http.response.body", "body": closing[-1]})
            if sent:
                self._record(arrival, sent, end, request_id)
        finally:
            watcher.cancel()

    def _record(self, arrival: float, sent: list[float], end: float, request_id: str) -> None:
        """One finished stream's timing, in seconds on this process's perf_counter. Each
        time is taken just before its write (a token's, the body's last): once the bytes
        are out, the client may read them and finish before this process runs again (a
        soak run saw the bench's whole-run span 1 ms shorter than the server's with the
        end taken after the last write), so a client's times can only be later."""
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        self.timings.append({
            "arrival": arrival, "end": end, "ttft": sent[0] - arrival,
            "tpot": (sent[-1] - sent[0]) / len(gaps) if gaps else 0.0,
            "e2el": sent[-1] - arrival, "median_itl": statistics.median(gaps) if gaps else 0.0,
            "request_id": request_id,
        })
        del self.timings[:-1000]


async def _body(send: Any, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _send(send: Any, status: int, body: bytes, ctype: bytes,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Any, status: int, data: Any,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, orjson.dumps(data), b"application/json", extra)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--slots", type=int, default=0, help="publish /props total_slots")
    parser.add_argument("--token-delay-ms", type=float, default=0)
    parser.add_argument("--first-delay-ms", type=float, default=0)
    parser.add_argument("--loading-s", type=float, default=0)
    parser.add_argument("--kv-metric", help="publish vLLM's gauges, the KV cache's under this "
                        "name (vllm:kv_cache_usage_perc, or vllm:gpu_cache_usage_perc before V1)")
    parser.add_argument("--reject-fields", nargs="*", default=[], metavar="FIELD",
                        help="answer 422 to a generation request carrying any of these")
    parser.add_argument("--ssl-certfile", help="serve https with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile")
    args = parser.parse_args()
    uvicorn.run(Upstream(args), host="127.0.0.1", port=args.port, log_level="warning",
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                lifespan="on")


if __name__ == "__main__":
    main()
