"""Driving load: closed loop at a concurrency, open loop at a Poisson rate, agent sessions.

Closed loop: `concurrency` workers each send requests back to back until the level's
request budget (or duration) is spent, like `vllm bench serve --request-rate inf
--max-concurrency N`. Warm-up requests go first and are not counted. Duration runs from
the first dispatch until every request has finished (drain tail included, as in vLLM).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp

from loadgen.client import send
from loadgen.record import RequestRecord
from loadgen.tokens import TokenCounter
from loadgen.workload import RUN_NONCE, Conversation, Span, Workload, words


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str | None = None


@dataclass
class LevelResult:
    target: Target
    workload: Workload
    concurrency: int | None  # closed loop; None for open loop
    rate: float | None  # open loop requests/s
    records: list[RequestRecord]
    duration: float
    started: float
    extra: dict[str, Any] = field(default_factory=dict)


class Progress:
    """A one-line live display on a terminal; silent otherwise."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total = label, total
        self.done = self.failed = 0
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()

    def add(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += 0 if record.ok else 1

    def line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        return (f"\r{self.label}: {self.done}{total} done, {self.failed} failed, "
                f"{time.monotonic() - self.started:5.1f} s")

    async def show(self) -> None:
        while self.enabled:
            sys.stderr.write(self.line())
            sys.stderr.flush()
            await asyncio.sleep(0.25)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(self.line() + "\n")


def _session(limit: int) -> aiohttp.ClientSession:
    # aiohttp's default 64 KiB read buffer throttles long streams (vLLM #39963): raise it.
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    return aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20,
                                 timeout=aiohttp.ClientTimeout(total=None))


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json", **(extra or {})}


async def _with_progress(progress: Progress, work: Awaitable[object]) -> None:
    shower = asyncio.create_task(progress.show())
    try:
        await work
    finally:
        shower.cancel()
        progress.close()


async def closed_loop(
    target: Target, workload: Workload, concurrency: int, *, requests: int | None,
    duration_s: float | None, warmup: int, timeout_s: float, seed: int = 0,
    show_progress: bool = True,
) -> LevelResult:
    rng = random.Random(seed * 7919 + concurrency)
    url = target.url + workload.path
    counter = TokenCounter.load(workload.tokenizer)
    records: list[RequestRecord] = []
    progress = Progress(f"{target.name} c={concurrency}", requests, show_progress)
    async with _session(concurrency) as session:
        warm = [RequestRecord(arrival=perf_counter()) for _ in range(warmup)]
        await asyncio.gather(*(send(session, url, workload.body(rng), _headers(), r, timeout_s,
                                    counter)
                               for r in warm))
        budget = requests
        started = perf_counter()
        deadline = started + duration_s if duration_s else None

        async def worker() -> None:
            nonlocal budget
            while True:
                if budget is not None:
                    if budget <= 0:
                        return
                    budget -= 1
                elif deadline is not None and perf_counter() >= deadline:
                    return
                record = RequestRecord(arrival=perf_counter())
                await send(session, url, workload.body(rng), _headers(), record, timeout_s,
                           counter)
                records.append(record)
                progress.add(record)

        await _with_progress(progress, asyncio.gather(*(worker() for _ in range(concurrency))))
        duration = perf_counter() - started
    return LevelResult(target, workload, concurrency, None, records, duration, started)


async def open_loop(
    target: Target, workload: Workload, rate: float, *, requests: int | None,
    duration_s: float | None, warmup: int, timeout_s: float, seed: int = 0,
    show_progress: bool = True,
) -> LevelResult:
    """Poisson arrivals at `rate` requests/s, whatever the server's state."""
    rng = random.Random(seed)
    url = target.url + workload.path
    counter = TokenCounter.load(workload.tokenizer)
    records: list[RequestRecord] = []
    progress = Progress(f"{target.name} rate={rate:g}/s", requests, show_progress)
    async with _session(0) as session:
        warm = [RequestRecord(arrival=perf_counter()) for _ in range(warmup)]
        await asyncio.gather(*(send(session, url, workload.body(rng), _headers(), r, timeout_s,
                                    counter)
                               for r in warm))
        started = perf_counter()
        tasks: list[asyncio.Task[None]] = []

        async def one(record: RequestRecord) -> None:
            await send(session, url, workload.body(rng), _headers(), record, timeout_s,
                           counter)
            records.append(record)
            progress.add(record)

        async def dispatch() -> None:
            due = started
            sent = 0
            while (requests is None or sent < requests) and (
                    duration_s is None or due - started < duration_s):
                await asyncio.sleep(max(0.0, due - perf_counter()))
                tasks.append(asyncio.create_task(one(RequestRecord(arrival=due))))
                sent += 1
                due += rng.expovariate(rate)
            await asyncio.gather(*tasks)

        await _with_progress(progress, dispatch())
        duration = perf_counter() - started
    return LevelResult(target, workload, None, rate, records, duration, started)


async def agent_sessions(
    target: Target, workload: Workload, conversations: int, turns: int, *,
    prefix_tokens: int, timeout_s: float, seed: int = 0, show_progress: bool = True,
    session_header: bool = True, first_turn_tokens: int | Span | None = None,
    think_s: float = 0.0, turn_tokens: Span | None = None, reply_tokens: Span | None = None,
) -> LevelResult:
    """`conversations` agents at once, each `turns` requests long: a stable shared prefix
    (system prompt), then a user message and the model's reply appended per turn, with an
    `x-session-id` header, as coding agents do. Each user message has `turn_tokens` words
    (drawn per turn; default `workload.input_len / turns`: tool results, a follow-up), the
    first one `first_turn_tokens` if given (an agent's opening context: files, a task
    description). Each request asks for `reply_tokens` (drawn per turn; default
    `workload.output_len`). Between turns each agent waits a uniform random 0..`think_s`
    seconds (running its tools), so turns arrive in no fixed order; not after its last
    turn, so the run ends with its last reply. Each agent draws from its own generator
    (seeded by `seed` and its index), so every target is sent the same sessions, turn by
    turn, whatever order their replies come back in. Reports TTFT per turn."""
    # unique to this run, so a server's cache from an earlier run cannot serve it
    shared = f"session {RUN_NONCE}: " + words(prefix_tokens, random.Random(12345))
    url = target.url + workload.path
    counter = TokenCounter.load(workload.tokenizer)
    records: list[RequestRecord] = []
    progress = Progress(f"{target.name} agents={conversations}", conversations * turns,
                        show_progress)
    growth = turn_tokens or Span(*(2 * [max(1, workload.input_len // max(turns, 1))]))
    opening = (Span(first_turn_tokens, first_turn_tokens)
               if isinstance(first_turn_tokens, int) and first_turn_tokens else
               first_turn_tokens or None)
    async with _session(conversations) as session:
        started = perf_counter()

        async def run(index: int) -> None:
            rng = random.Random(f"{seed}:{index}")
            conv = Conversation.start(index, shared)
            headers = _headers({"x-session-id": conv.session_id} if session_header else None)
            for turn in range(turns):
                size = (opening if turn == 0 and opening else growth).draw(rng)
                messages = conv.ask(f"task {index}.{turn}: " + words(size, rng))
                reply = reply_tokens.draw(rng) if reply_tokens else None
                record = RequestRecord(arrival=perf_counter(), turn=turn, text=[])
                await send(session, url, workload.body_for(None, messages, reply), headers,
                           record, timeout_s, counter)
                records.append(record)
                progress.add(record)
                if not record.ok:
                    return
                conv.answered("".join(record.text or []))
                if think_s > 0 and turn < turns - 1:
                    await asyncio.sleep(rng.uniform(0.0, think_s))

        await _with_progress(progress, asyncio.gather(*(run(i) for i in range(conversations))))
        duration = perf_counter() - started
    return LevelResult(target, workload, conversations, None, records, duration, started,
                       extra={"turns": turns, "prefix_tokens": prefix_tokens,
                              "first_turn_tokens": str(opening) if opening else None,
                              "turn_tokens": str(growth),
                              "reply_tokens": str(reply_tokens or workload.output_len),
                              "think_s": think_s})


async def discover_model(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as resp:
        data = await resp.json()
        return str(data["data"][0]["id"])

