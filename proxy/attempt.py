"""What happened during one try of a request on one backend."""

from __future__ import annotations

from time import perf_counter

from backends.outlier import Fault
from backends.stats import RequestResult
from proxy.sse import StreamObserver, token_counts

MIN_PREFILL_TOKENS = 64  # below this, TTFT is mostly fixed cost, not prefill


class Attempt:
    __slots__ = (
        "answered",
        "backend",
        "backlog",
        "cached_tokens",
        "concurrency",
        "ended_at",
        "estimated",
        "fault",
        "first_content_at",
        "load_area_at_start",
        "outcome",
        "output_tokens",
        "prompt_chars",
        "prompt_tokens",
        "sent_at",
        "started",
        "status",
        "whole",
    )

    def __init__(self, backend: str, load_area: float, prompt_chars: int = 0,
                 backlog: float = 0.0) -> None:
        self.backend = backend
        self.prompt_chars = prompt_chars  # size of the request body
        self.backlog = backlog  # its part of the backend's prefill backlog, until answered
        self.sent_at = perf_counter()
        self.load_area_at_start = load_area  # the backend's in-flight integral right now
        self.concurrency: float | None = None  # its mean over this attempt, at the end
        self.first_content_at: float | None = None
        self.ended_at: float | None = None
        self.started = False  # some byte of the response reached the client
        self.status = 0  # what the client was (or will be) answered
        self.outcome = "upstream_error"
        self.fault = Fault.NONE  # how the backend failed this try, if it did
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0  # of the prompt, served from the backend's prefix cache
        self.whole = False  # answered in one body (not streamed): no first-token time
        self.estimated = False  # output_tokens counted from content events: no usage came
        self.answered = False  # the client has had the stream's last event

    def tokens(self, prompt: int, output: int, cached: int) -> None:
        self.prompt_tokens, self.output_tokens, self.cached_tokens = prompt, output, cached

    def read_stream(self, observer: StreamObserver) -> None:
        """What a relayed stream told: first content, tokens, whether it reached its end."""
        self.first_content_at = observer.first_content_at
        prompt, output, cached = token_counts(observer.usage())
        if not output and observer.content_events:  # no usage: one token per content event
            output, self.estimated = observer.content_events, True
        self.tokens(prompt, output, cached)
        # a chat stream whose choice finished has said everything, [DONE] or not
        # (transformers serve sends none; the openai SDK and Codex close on either)
        self.answered = observer.ended or observer.finished

    def end(self, outcome: str, fault: Fault = Fault.NONE) -> None:
        """How the try ended, and how the backend failed it, if it did."""
        self.outcome, self.fault = outcome, fault
        self.ended_at = perf_counter()

    def settle(self, load_area_now: float) -> None:
        """Set the mean in-flight count over the attempt, from the backend's in-flight
        integral now (read once it has ended, before its slot is freed)."""
        elapsed = self.duration_s
        if elapsed > 0:
            self.concurrency = (load_area_now - self.load_area_at_start) / elapsed

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_content_at is None else self.first_content_at - self.sent_at

    @property
    def duration_s(self) -> float:
        return (self.ended_at or perf_counter()) - self.sent_at

    @property
    def decode_s(self) -> float | None:
        if self.first_content_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.first_content_at

    @property
    def prefilled_chars(self) -> float | None:
        """The part of the body the backend had to prefill (not cached), in body bytes;
        None when too little was prefilled for its time to say much."""
        if self.prompt_tokens - self.cached_tokens < MIN_PREFILL_TOKENS:
            return None  # also when no token counts came (prompt_tokens 0)
        return self.uncached_chars

    @property
    def uncached_chars(self) -> float:
        """The part of the body not served from the backend's cache, in body bytes (all of
        it when the reply reported no token counts)."""
        if self.prompt_tokens <= 0:
            return float(self.prompt_chars)
        return self.prompt_chars * (self.prompt_tokens - self.cached_tokens) / self.prompt_tokens

    def result(self) -> RequestResult:
        return RequestResult(
            outcome=self.outcome,
            fault=self.fault,
            ttft_s=self.ttft_s,
            output_tokens=self.output_tokens,
            decode_s=self.decode_s,
            concurrency=self.concurrency,
            prefilled_chars=self.prefilled_chars,
            uncached_chars=self.uncached_chars,
            whole_s=self.duration_s if self.whole and self.ended_at is not None else None,
            prompt_tokens=self.prompt_tokens,
            body_bytes=self.prompt_chars,
        )
