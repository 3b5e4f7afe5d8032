"""Moving estimates of a backend's speed, learned from the requests it served."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.curve import CurveLearner
from backends.outlier import Fault


class Ewma:
    """Exponentially weighted moving average; `None` until the first sample."""

    __slots__ = ("_alpha", "value")

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self._alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        if self.value is None:
            self.value = sample
        else:
            self.value += self._alpha * (sample - self.value)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What one finished request taught us about its backend."""

    outcome: str  # ok | upstream_error | timeout | client_closed | rejected | unmeasured
    fault: Fault = Fault.NONE  # how the backend failed it (ejection: backends/outlier.py)
    ttft_s: float | None = None
    output_tokens: int = 0
    decode_s: float | None = None  # first content to last chunk
    concurrency: float | None = None  # mean in flight on the backend during the request
    prefilled_chars: float | None = None  # body bytes the backend prefilled (not cached)
    uncached_chars: float | None = None  # the same for any prompt size (with a TTFT)
    whole_s: float | None = None  # a reply answered in one body: its duration (no TTFT)
    prompt_tokens: int = 0  # as the backend reported them
    body_bytes: int = 0  # the request body sent


class BackendStats:
    """TTFT and per-stream decode speed, plus plain counters for the admin view."""

    __slots__ = ("completed", "curve", "decode_tok_s", "failed", "output_tokens",
                 "prefill_chars_per_s", "prefill_overhead_s", "tokens_per_byte", "ttft_s",
                 "uncached_chars")

    def __init__(self, alpha: float = 0.2) -> None:
        self.ttft_s = Ewma(alpha)
        self.decode_tok_s = Ewma(alpha)
        self.output_tokens = Ewma(alpha)  # typical reply length, for requests without one
        # prompt tokens per request-body byte, from usage: sizes prompts (proxy/clamp.py)
        self.tokens_per_byte = Ewma(alpha)
        # prefill speed in request-body bytes per second of TTFT, less the part of a TTFT
        # that does not grow with the prompt (`prefill_overhead_s`) once calibration has
        # measured it; a TTFT also holds queueing, so this still errs low under load
        self.prefill_chars_per_s = Ewma(alpha)
        # what a TTFT holds besides prefill (HTTP, scheduling, one decode step): the
        # intercept of two calibration probes of different prompt sizes; None: unmeasured
        self.prefill_overhead_s: float | None = None
        # the typical uncached prompt behind the learned TTFTs: a request that brings more
        # (or less) to prefill waits longer (or shorter) than the TTFT curve says
        self.uncached_chars = Ewma(alpha)
        self.curve = CurveLearner()
        self.completed = 0
        self.failed = 0

    def record(self, result: RequestResult) -> None:
        """A request of this replica ended: count it and learn from it."""
        if result.outcome == "ok":
            self.completed += 1
        elif result.outcome in ("upstream_error", "timeout"):
            self.failed += 1
        self.learn(result)

    def learn(self, result: RequestResult) -> None:
        """Fold what a finished request says about the backend's speed into the estimates
        (this replica's requests, and other replicas' through cluster/learning.py)."""
        if result.ttft_s is not None:
            self.ttft_s.add(result.ttft_s)
        rate = None
        if result.decode_s and result.output_tokens > 1:
            rate = (result.output_tokens - 1) / result.decode_s
        elif result.whole_s and result.output_tokens > 1:
            rate = self._whole_rate(result.whole_s, result.output_tokens)
        if rate is not None:
            self.decode_tok_s.add(rate)
        if result.outcome == "ok" and result.output_tokens:
            self.output_tokens.add(result.output_tokens)
        if result.prefilled_chars and result.ttft_s:
            self.prefill_chars_per_s.add(result.prefilled_chars / self._prefill_s(result.ttft_s))
        if result.uncached_chars is not None and result.ttft_s is not None:
            self.uncached_chars.add(result.uncached_chars)
        if result.prompt_tokens > 0 and result.body_bytes > 0:
            self.tokens_per_byte.add(result.prompt_tokens / result.body_bytes)
        if result.concurrency is not None and result.outcome == "ok":
            self.curve.observe(result.concurrency, rate, result.ttft_s)

    def calibrate_prefill(self, short: tuple[float, float], long: tuple[float, float]) -> bool:
        """Two probes of (body bytes, TTFT) on an idle backend, the second with a longer
        prompt: the prefill speed is the slope between them and the overhead their
        intercept. From one short probe alone, bytes / TTFT is mostly overhead on a fast
        prefiller (vLLM's ~300-token probe prefills in ~2 ms of a ~8 ms TTFT at --speed 4),
        which made vLLM look 1.3-3.9x as fast as llama.cpp where it is 7.2x, and sent agent
        openings to llama.cpp too soon. False (nothing changed) when the longer prompt did
        not take longer."""
        (chars_a, ttft_a), (chars_b, ttft_b) = short, long
        if chars_b <= chars_a or ttft_b <= ttft_a:
            return False
        rate = (chars_b - chars_a) / (ttft_b - ttft_a)
        self.prefill_chars_per_s.value = rate
        self.prefill_overhead_s = max(0.0, ttft_a - chars_a / rate)
        return True

    def _prefill_s(self, ttft_s: float) -> float:
        """The part of a TTFT spent prefilling: less the calibrated overhead, never under a
        quarter of it (a TTFT near the overhead is mostly noise, or a cached prompt)."""
        overhead = self.prefill_overhead_s or 0.0
        return max(ttft_s - overhead, ttft_s / 4)

    _EWMAS = ("ttft_s", "decode_tok_s", "output_tokens", "tokens_per_byte",
              "prefill_chars_per_s", "uncached_chars")

    def state(self) -> dict[str, Any]:
        """What was learned (not the counters), as plain JSON-able data (cluster/)."""
        return {"ewma": {name: getattr(self, name).value for name in self._EWMAS},
                "curve": self.curve.state(), "prefill_overhead_s": self.prefill_overhead_s}

    def load(self, state: dict[str, Any]) -> None:
        """Take over what another replica learned; raises ValueError, KeyError or
        TypeError for a state of another shape (nothing is changed then)."""
        values = {name: state["ewma"][name] for name in self._EWMAS}
        curve = CurveLearner()
        curve.load(state["curve"])
        raw = state.get("prefill_overhead_s")  # absent from a replica before it
        overhead = None if raw is None else float(raw)
        for name, value in values.items():
            getattr(self, name).value = None if value is None else float(value)
        self.curve = curve
        self.prefill_overhead_s = overhead

    def _whole_rate(self, duration_s: float, output_tokens: int) -> float:
        """A non-streamed reply shows no first token: its decode time is the duration less
        the TTFT learned from streams (none known: the whole duration, which errs low by
        the prefill's share), never less than half the duration."""
        decode_s = max(duration_s - (self.ttft_s.value or 0.0), duration_s / 2)
        return (output_tokens - 1) / decode_s
