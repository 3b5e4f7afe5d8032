"""What one finished attempt teaches a backend's moving estimates."""

from __future__ import annotations

import pytest

from backends.stats import BackendStats, RequestResult
from proxy.attempt import MIN_PREFILL_TOKENS, Attempt


def finished(prompt_chars: int, prompt: int, cached: int) -> Attempt:
    attempt = Attempt("b", 0.0, prompt_chars)
    attempt.tokens(prompt, 10, cached)
    return attempt


def test_prefilled_bytes_are_the_uncached_share_of_the_body() -> None:
    assert finished(8000, 2000, 1500).prefilled_chars == pytest.approx(2000.0)
    assert finished(8000, 2000, 0).prefilled_chars == pytest.approx(8000.0)
    # almost all cached, or no usage: the TTFT says nothing about prefill speed
    assert finished(8000, 2000, 2000 - MIN_PREFILL_TOKENS + 1).prefilled_chars is None
    assert finished(8000, 0, 0).prefilled_chars is None


def test_prefill_speed_is_learned_only_from_requests_that_prefilled() -> None:
    stats = BackendStats(alpha=0.5)
    stats.record(RequestResult("ok", ttft_s=0.5, output_tokens=10, prefilled_chars=None))
    assert stats.prefill_chars_per_s.value is None
    stats.record(RequestResult("ok", ttft_s=0.5, output_tokens=10, prefilled_chars=4000.0))
    assert stats.prefill_chars_per_s.value == pytest.approx(8000.0)
    stats.record(RequestResult("ok", ttft_s=1.0, output_tokens=10, prefilled_chars=4000.0))
    assert stats.prefill_chars_per_s.value == pytest.approx(6000.0)  # EWMA, alpha 0.5
