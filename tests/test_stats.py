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


def test_two_probes_give_the_prefill_slope_and_the_overhead_besides_it() -> None:
    stats = BackendStats(alpha=0.5)
    # 1,500 bytes in 7 ms, 30,000 in 35 ms: 28,500 more bytes in 28 ms more; what a
    # TTFT holds besides prefill is the intercept, 7 ms - 1,500 / rate
    assert stats.calibrate_prefill((1500, 0.007), (30000, 0.035))
    rate = 28500 / 0.028
    assert stats.prefill_chars_per_s.value == pytest.approx(rate)
    assert stats.prefill_overhead_s == pytest.approx(0.007 - 1500 / rate)
    # (bytes / TTFT of the short probe alone, 214,286 bytes/s, is under a quarter of it)
    # later requests count only the TTFT beyond the overhead as prefill
    stats.record(RequestResult("ok", ttft_s=0.0055 + stats.prefill_overhead_s,
                               output_tokens=10, prefilled_chars=rate * 0.0055))
    assert stats.prefill_chars_per_s.value == pytest.approx(rate)
    # a TTFT at or under the overhead (noise, a cached prompt) counts a quarter of it
    stats.prefill_chars_per_s.value = 1000.0
    stats.record(RequestResult("ok", ttft_s=0.004, output_tokens=10, prefilled_chars=4.0))
    assert stats.prefill_chars_per_s.value == pytest.approx((1000.0 + 4.0 / 0.001) / 2)


def test_probes_that_did_not_scale_change_nothing_and_the_overhead_travels() -> None:
    stats = BackendStats()
    stats.record(RequestResult("ok", ttft_s=0.01, output_tokens=10, prefilled_chars=1500.0))
    assert not stats.calibrate_prefill((1500, 0.010), (30000, 0.010))  # no longer: noise
    assert not stats.calibrate_prefill((1500, 0.010), (1500, 0.020))
    assert stats.prefill_chars_per_s.value == pytest.approx(150000.0)
    assert stats.prefill_overhead_s is None
    assert stats.calibrate_prefill((1500, 0.010), (30000, 0.020))
    other = BackendStats()
    other.load(stats.state())  # another replica takes it over (cluster/learning.py)
    assert other.prefill_overhead_s == pytest.approx(stats.prefill_overhead_s)
    older = stats.state()
    del older["prefill_overhead_s"]  # a replica from before the overhead was kept
    other.load(older)
    assert other.prefill_overhead_s is None
    assert other.prefill_chars_per_s.value == pytest.approx(stats.prefill_chars_per_s.value)
