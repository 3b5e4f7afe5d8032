"""A closed-loop mixed load that classifies how every request ended (chaos and soak runs).

Each client sends, one after another, a random mix of streamed and whole, chat and
completions requests, and records one `Result` per request:

- `ok`: a 200 whose stream reached `[DONE]` with no error event, or a whole JSON reply;
- `in_band_error`: a stream that started and ended with an error event (the proxy's way to
  report a failure after the first byte);
- `failed`: an error status with a body (`status` says which);
- `left`: the client itself disconnected mid-stream (the disconnect storm);
- `lost`: anything else: no status (a reset or close before the head), a stream that ended
  without `[DONE]` and without an error event, a body that is not the API's JSON. A
  gateway must never lose a request: the count must be 0.

What the clients do comes from a `Behaviour` the schedule changes while they run: a share
of clients that disconnect mid-stream, and a number that read their streams slowly.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

PROMPT = "Write a short list of words about rivers, locks and sluices."


@dataclass
class Behaviour:
    disconnect_share: float = 0.0  # of streams, the client leaves after a few events
    slow_readers: int = 0  # clients 0..N-1 read their streams slowly
    slow_read_s: float = 0.05  # pause between two reads for a slow reader


@dataclass(frozen=True)
class Result:
    window: str  # the schedule's window when it ended
    client: int
    kind: str  # chat-stream, chat, completions-stream, completions
    started: float  # monotonic
    ended: float
    outcome: str  # ok | in_band_error | failed | left | lost
    status: int  # 0 when none came
    backend: str = ""
    detail: str = ""


@dataclass
class Load:
    url: str
    model: str
    clients: int
    max_tokens: int = 32
    timeout_s: float = 120
    seed: int = 0
    behaviour: Behaviour = field(default_factory=Behaviour)
    window: str = "start"  # the schedule's current window: each result is filed under it
    results: list[Result] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Run the clients until `stop()`; each finishes its request in progress."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, session: aiohttp.ClientSession, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self._stop.is_set():
            kind = rng.choice(("chat-stream", "chat", "completions-stream", "completions"))
            leave = kind.endswith("stream") and rng.random() < self.behaviour.disconnect_share
            slow = index < self.behaviour.slow_readers
            self.results.append(await self._one(session, index, kind, leave, slow))

    async def _one(self, session: aiohttp.ClientSession, index: int, kind: str, leave: bool,
                   slow: bool) -> Result:
        started = time.monotonic()
        chat, stream = kind.startswith("chat"), kind.endswith("stream")
        body: dict[str, object] = {"model": self.model, "max_tokens": self.max_tokens,
                                   "stream": stream, "ignore_eos": True}
        if chat:
            body["messages"] = [{"role": "user", "content": PROMPT}]
        else:
            body["prompt"] = PROMPT
        path = "/v1/chat/completions" if chat else "/v1/completions"

        def result(outcome: str, status: int, backend: str = "", detail: str = "") -> Result:
            # filed under the window it ends in: a request cut by a fault ends in its window
            return Result(self.window, index, kind, started, time.monotonic(), outcome,
                          status, backend, detail[:200])

        try:
            async with session.post(self.url + path, data=orjson.dumps(body),
                                    headers={"content-type": "application/json"}) as resp:
                backend = resp.headers.get("x-sluiceway-backend", "")
                if resp.status != 200:
                    text = await resp.read()
                    shaped = _error_shaped(text)
                    return result("failed" if shaped else "lost", resp.status, backend,
                                  text.decode(errors="replace"))
                if not stream:
                    reply = await resp.read()
                    fine = _whole_reply(reply)
                    return result("ok" if fine else "lost", 200, backend,
                                  "" if fine else reply.decode(errors="replace"))
                return await self._read_stream(resp, leave, slow, result, backend)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            return result("lost", 0, "", f"{type(exc).__name__}: {exc}")

    async def _read_stream(self, resp: aiohttp.ClientResponse, leave: bool, slow: bool,
                           result: Callable[..., Result], backend: str) -> Result:
        events, tail = 0, b""
        async for line in resp.content:
            if line.startswith(b"data:"):
                events += 1
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return result("ok", 200, backend)
                if b'"error"' in payload and _error_shaped(payload):
                    return result("in_band_error", 200, backend,
                                  payload.decode(errors="replace"))
                tail = payload
            if leave and events >= 3:
                resp.close()  # the client goes away mid-stream
                return result("left", 200, backend)
            if slow:
                await asyncio.sleep(self.behaviour.slow_read_s)
        return result("lost", 200, backend, "stream ended without [DONE] or an error: "
                      + tail.decode(errors="replace"))


def _error_shaped(body: bytes) -> bool:
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _whole_reply(body: bytes) -> bool:
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(reply, dict) and bool(reply.get("choices"))
