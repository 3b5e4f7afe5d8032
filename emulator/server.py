"""What both emulated servers share: the ASGI plumbing, request parsing, the generation
loop that turns engine tokens into SSE events or a whole reply, and the fault flags.

Engine-specific wire formats (chunks, errors, health, metrics) live in `llamacpp.py` and
`vllm.py`, which subclass `EmulatedServer`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import orjson

from emulator import tokens
from emulator.engine import Engine, Sequence
from emulator.profile import Profile

Scope = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class Options:
    profile: Profile
    model: str
    max_running: int  # llama.cpp slots or vLLM max_num_seqs
    speed: float = 1.0
    step_tokens: int | None = None  # llama.cpp n_batch or vLLM max_num_batched_tokens
    ctx: int = 32768  # context limit per request, prompt + reply
    fail_rate: float = 0.0
    die_after_tokens: int | None = None
    hang_after_tokens: int | None = None
    startup_delay_s: float = 0.0
    seed: int = 0
    fault_control: bool = False  # POST /_faults changes the faults below while it runs


@dataclass
class Faults:
    """The injected faults in force: from the flags, then from `POST /_faults`."""

    fail_rate: float = 0.0  # share of requests answered 500
    die_after_tokens: int | None = None  # drop the connection after N tokens of a stream
    hang_after_tokens: int | None = None  # go silent after N tokens of a stream

    def update(self, changes: Any) -> None:
        if not isinstance(changes, dict) or not set(changes) <= {
                "fail_rate", "die_after_tokens", "hang_after_tokens"}:
            raise HttpError(400, "POST /_faults takes fail_rate, die_after_tokens and "
                            "hang_after_tokens", "invalid_request_error")
        for name, value in changes.items():
            setattr(self, name, value)


@dataclass
class Job:
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    seq: Sequence
    seed: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def text(self, start: int, end: int) -> str:
        return "".join(" " + tokens.word(self.seed, i) for i in range(start, end))

    @property
    def finish_reason(self) -> str:
        return "length" if self.seq.produced >= self.seq.limit else "stop"


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class _Died(Exception):
    """Raised inside the ASGI app to make the server drop the connection mid-stream."""


class EmulatedServer(ABC):
    def __init__(self, options: Options) -> None:
        self.options = options
        self.profile = options.profile
        self.engine = Engine(options.profile, options.max_running, options.speed,
                             on_admit=self.on_admit, on_finish=self.on_finish,
                             step_tokens=options.step_tokens,
                             admit_within_budget=self.admits_within_budget)
        self.started_at = time.monotonic()
        self.created = int(time.time())
        self._rng = random.Random(options.seed)
        self.faults = Faults(options.fail_rate, options.die_after_tokens,
                             options.hang_after_tokens)

    # ---- engine-specific parts -------------------------------------------------------

    @abstractmethod
    def on_admit(self, seq: Sequence) -> None: ...

    @abstractmethod
    def on_finish(self, seq: Sequence) -> None: ...

    @abstractmethod
    def error_body(self, error: HttpError) -> bytes: ...

    @abstractmethod
    def check_model(self, model: str | None) -> None:
        """Raise HttpError when the engine would refuse this model name."""

    @abstractmethod
    async def get(self, path: str, query: str) -> tuple[int, bytes, bytes]:
        """A GET route: (status, body, content type)."""

    @abstractmethod
    def first_events(self, job: Job) -> list[bytes]:
        """Events before the first token (vLLM's role-only chunk), or none."""

    @abstractmethod
    def token_event(self, job: Job, index: int, last: bool) -> bytes: ...

    @abstractmethod
    def final_events(self, job: Job) -> list[bytes]:
        """Events after the last token: finish, usage, [DONE]."""

    @abstractmethod
    def whole(self, job: Job) -> dict[str, Any]: ...

    @property
    @abstractmethod
    def headers_before_first_token(self) -> bool: ...

    @property
    @abstractmethod
    def admits_within_budget(self) -> bool:
        """Whether a waiting request starts only in a step with tokens to spare (vLLM's
        scheduler) rather than as soon as it has a slot (llama-server)."""

    def ready(self) -> bool:
        return time.monotonic() - self.started_at >= self.options.startup_delay_s

    # ---- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._http(scope, receive, send)
        except HttpError as error:
            await respond(send, error.status, self.error_body(error))

    async def _lifespan(self, receive: Any, send: Any) -> None:
        await receive()
        self.engine.start()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await self.engine.stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path, method = scope["path"], scope["method"]
        if path == "/_emulator/load":  # its own peak concurrency (benchmarks, tests)
            engine = self.engine
            load = {"in_flight": len(engine.waiting) + len(engine.running),
                    "peak": engine.peak}
            if method == "POST":
                engine.peak = load["in_flight"]  # reset
            await respond(send, 200, orjson.dumps(load), b"application/json")
            return
        if method == "GET":
            status, payload, ctype = await self.get(path, scope.get("query_string", b"").decode())
            await respond(send, status, payload, ctype)
            return
        if method == "POST" and path == "/_faults" and self.options.fault_control:
            self.faults.update(orjson.loads(body) if body else {})
            await respond(send, 200, orjson.dumps(vars(self.faults)), b"application/json")
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions",
                                            "/chat/completions", "/completions"):
            raise HttpError(404, "File Not Found", "not_found_error")
        job = self.parse(body, chat=path.endswith("chat/completions"))
        if self.faults.fail_rate and self._rng.random() < self.faults.fail_rate:
            raise HttpError(500, "injected failure (--fail-rate)", "server_error")
        await self._generate(job, receive, send)

    def parse(self, body: bytes, chat: bool) -> Job:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, f"invalid JSON: {exc}", "invalid_request_error") from None
        if not isinstance(req, dict):
            raise HttpError(400, "body must be a JSON object", "invalid_request_error")
        self.check_model(req.get("model"))
        if chat:
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HttpError(400, "'messages' must be a non-empty array",
                                "invalid_request_error", "messages")
            prompt = tokens.chat_prompt(messages)
        else:
            if "prompt" not in req:
                raise HttpError(400, "'prompt' is required", "invalid_request_error", "prompt")
            prompt = tokens.completion_prompt(req["prompt"])
        limit = req.get("max_completion_tokens", req.get("max_tokens"))
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise HttpError(400, "max_tokens must be a positive integer",
                            "invalid_request_error", "max_tokens")
        seed = tokens.seed_of(prompt)
        room = self.options.ctx - len(prompt)
        if room < 1:
            raise HttpError(400, f"the prompt ({len(prompt)} tokens) exceeds the context "
                            f"size ({self.options.ctx})", "exceed_context_size_error")
        wanted = limit if limit is not None else room
        natural = wanted if req.get("ignore_eos") else tokens.natural_length(seed)
        seq = Sequence(prompt, max_tokens=min(wanted, natural, room), limit=min(wanted, room))
        options = req.get("stream_options")
        return Job(chat=chat, model=str(req.get("model") or self.options.model),
                   stream=req.get("stream") is True,
                   include_usage=isinstance(options, dict) and options.get("include_usage") is True,
                   seq=seq, seed=seed)

    async def _generate(self, job: Job, receive: Any, send: Any) -> None:
        seq = job.seq
        self.engine.submit(seq)
        watcher = asyncio.create_task(self._watch(receive, seq))
        try:
            if job.stream:
                await self._stream(job, send)
            else:
                while not seq.done:
                    await seq.changed.wait()
                    seq.changed.clear()
                if not seq.cancelled:
                    await respond(send, 200, orjson.dumps(self.whole(job)))
        finally:
            watcher.cancel()
            self.engine.cancel(seq)  # no-op when it finished

    async def _watch(self, receive: Any, seq: Sequence) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(seq)
        seq.changed.set()

    async def _stream(self, job: Job, send: Any) -> None:
        seq, opts = job.seq, self.faults
        started = False
        if self.headers_before_first_token:
            await start_sse(send)
            started = True
        sent = 0
        while True:
            await seq.changed.wait()
            seq.changed.clear()
            if seq.cancelled:
                return
            parts: list[bytes] = []
            if not started:
                await start_sse(send)
                started = True
            if sent == 0:
                parts += self.first_events(job)
            produced = seq.produced
            for i in range(sent, produced):
                if i == opts.die_after_tokens:
                    await body(send, b"".join(parts))
                    raise _Died("--die-after-tokens")
                if i == opts.hang_after_tokens:
                    await body(send, b"".join(parts))
                    self.engine.cancel(seq)
                    await asyncio.Event().wait()  # until the client gives up
                parts.append(self.token_event(job, i, last=seq.done and i == produced - 1))
            sent = produced
            if seq.done:
                parts += self.final_events(job)
                await send({"type": "http.response.body", "body": b"".join(parts)})
                return
            await body(send, b"".join(parts))


async def start_sse(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no")]})


async def body(send: Any, data: bytes) -> None:
    if data:
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def respond(send: Any, status: int, payload: bytes,
                  ctype: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype)]})
    await send({"type": "http.response.body", "body": payload})


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def reply_tokens(seq: Sequence) -> list[str]:
    """The tokens a sequence generated (what a prompt cache keeps after the prompt)."""
    seed = tokens.seed_of(seq.prompt)
    return [tokens.word(seed, i) for i in range(seq.produced)]
