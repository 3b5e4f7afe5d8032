"""A continuous-batching engine on a virtual clock that follows a performance profile.

One task runs the step loop. A step admits waiting sequences while fewer than
`max_running` run, emits one token for every sequence already decoding, and prefills
prompts (which holds the step for `tokens / P`); it lasts
`Profile.step_seconds(decoding, prefill_tokens) / speed`. Steps are scheduled on absolute
times, so an event loop that wakes late catches up instead of drifting. A sequence gets
its first token at the end of the step that finishes its prompt, as in the real engines.

How much prompt a step takes is the engines' chunked prefill: a step holds at most
`step_tokens` tokens, one per decoding sequence first, then prompt chunks of the running
sequences in the order they were admitted, the first one's as much as fits (vLLM's
`max_num_batched_tokens`, which its V1 scheduler fills with running requests in order,
then waiting ones; llama-server's `n_batch`, filled with one token per generating slot,
then slots' prompts). Prompts that arrive together are therefore served first come,
first served: the first finishes after its own prefill, the last after all of them.
`step_tokens=None` takes every admitted prompt whole in one step. vLLM also admits a
waiting request only while the step has tokens left (`admit_within_budget`); llama-server
gives a request a free slot at once.

Time comes from a `Clock`: the wall clock when serving, a virtual one in the tests that
check the timing model itself (no scheduler jitter in what they measure).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Protocol

from emulator.profile import Profile


class Sequence:
    """One request inside the engine. The HTTP side waits on `changed` for tokens."""

    __slots__ = (
        "admitted_at",
        "arrived_at",
        "cached",
        "cancelled",
        "changed",
        "finished_at",
        "first_token_at",
        "limit",
        "max_tokens",
        "prefilled",
        "produced",
        "prompt",
        "slot",
    )

    def __init__(self, prompt: list[str], max_tokens: int, limit: int | None = None) -> None:
        self.prompt = prompt
        self.max_tokens = max_tokens  # what it will produce
        self.limit = max_tokens if limit is None else limit  # what the client allowed
        self.produced = 0
        self.cached = 0  # prompt tokens found in the prefix cache
        self.prefilled = 0  # prompt tokens computed so far (chunked prefill)
        self.cancelled = False
        self.slot: int | None = None
        self.arrived_at = monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.produced >= self.max_tokens or self.cancelled

    @property
    def prefill_tokens(self) -> int:
        return max(1, len(self.prompt) - self.cached)  # the last token is always computed

    @property
    def prefill_left(self) -> int:
        return self.prefill_tokens - self.prefilled if self.first_token_at is None else 0


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, at: float) -> None: ...


class WallClock:
    """Real time: `time.monotonic`, the clock the HTTP side stamps arrivals with."""

    def now(self) -> float:
        return monotonic()

    async def sleep_until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - monotonic()))


AdmitHook = Callable[[Sequence], None]
FinishHook = Callable[[Sequence], None]


class Engine:
    def __init__(
        self,
        profile: Profile,
        max_running: int,
        speed: float = 1.0,
        on_admit: AdmitHook | None = None,
        on_finish: FinishHook | None = None,
        clock: Clock | None = None,
        step_tokens: int | None = None,
        admit_within_budget: bool = False,
    ) -> None:
        if step_tokens is not None and step_tokens < 1:
            raise ValueError("step_tokens must be at least 1")
        self.profile = profile
        self.clock: Clock = clock or WallClock()
        self.max_running = max_running
        self.step_tokens = step_tokens
        self.admit_within_budget = admit_within_budget
        self.speed = speed
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.peak = 0
        self._on_admit = on_admit or (lambda seq: None)
        self._on_finish = on_finish or (lambda seq: None)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.tokens = 0  # output tokens emitted so far
        self.late_s = 0.0  # total time steps ended later than scheduled (lag)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        # the most requests it held at once (running or waiting): what a client sent it
        self.peak = max(self.peak, len(self.waiting) + len(self.running))
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence (client gone); its slot frees at once."""
        if seq.cancelled:
            return
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self._on_finish(seq)
        self._wake.set()

    async def _run(self) -> None:
        clock = self.clock
        next_at = clock.now()
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                next_at = clock.now()
            decoding = [s for s in self.running if s.first_token_at is not None]
            chunks = self._plan(len(decoding))
            prefill = sum(n for _, n in chunks)
            next_at += self.profile.step_seconds(len(decoding), prefill) / self.speed
            self.late_s += max(0.0, clock.now() - next_at)
            await clock.sleep_until(next_at)
            self._emit(chunks, decoding)

    def _plan(self, decoding: int) -> list[tuple[Sequence, int]]:
        """This step's prompt chunks: the running sequences' prompts in admission order,
        then those of the sequences admitted now, within what the step's token budget
        leaves after one token per decoding sequence."""
        room = math.inf if self.step_tokens is None else max(0, self.step_tokens - decoding)
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            room = _chunk(seq, room, chunks)
        while self.waiting and len(self.running) < self.max_running:
            if room == 0 and self.admit_within_budget:
                break
            room = _chunk(self._admit(), room, chunks)
        return chunks

    def _admit(self) -> Sequence:
        seq = self.waiting.popleft()
        seq.admitted_at = self.clock.now()
        self._on_admit(seq)  # sets the cached prefix (prompt cache lookup)
        self.running.append(seq)
        return seq

    def _emit(self, chunks: list[tuple[Sequence, int]], decoding: list[Sequence]) -> None:
        self.steps += 1
        now = self.clock.now()
        prefilled = []
        for seq, n in chunks:
            if seq.cancelled:
                continue
            seq.prefilled += n
            if seq.prefilled >= seq.prefill_tokens:
                seq.first_token_at = now
                prefilled.append(seq)
        for seq in (*prefilled, *decoding):
            if seq.cancelled:
                continue
            seq.produced += 1
            self.tokens += 1
            seq.changed.set()
            if seq.done:
                seq.finished_at = now
                self.running.remove(seq)
                self._on_finish(seq)


def _chunk(seq: Sequence, room: float, chunks: list[tuple[Sequence, int]]) -> float:
    """Give `seq` as much of its prompt as `room` holds; return the room left."""
    n = int(min(room, seq.prefill_left))
    if n:
        chunks.append((seq, n))
    return room - n
