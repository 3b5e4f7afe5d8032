from __future__ import annotations

import math
import random

import pytest

from backends.curve import BUCKETS, CurveLearner, bucket_of


@pytest.mark.parametrize(("concurrency", "bucket"), [
    (0.3, 1), (1, 1), (1.4, 1), (1.5, 2), (5.1, 6), (7.3, 8), (100, 96), (120, 128),
    (5000, 1024),
])
def test_bucket_of(concurrency: float, bucket: int) -> None:
    assert BUCKETS[bucket_of(concurrency)] == bucket


def test_learns_aggregate_curve_from_per_stream_samples() -> None:
    curve = CurveLearner()
    for _ in range(30):
        curve.observe(1.0, 114.0, 0.1)
        curve.observe(8.0, 30.5, 0.7)  # 8 streams at 30.5 tok/s each = 244 tok/s
    points = dict(curve.throughput_points())
    assert points[1] == pytest.approx(114, rel=0.02)
    assert points[8] == pytest.approx(244, rel=0.02)
    assert dict(curve.ttft_points())[8] == pytest.approx(0.7)


def test_a_slowdown_seen_at_one_load_moves_the_whole_curve() -> None:
    curve = CurveLearner()
    for _ in range(20):
        curve.observe(1, 100.0, None)
        curve.observe(32, 50.0, None)
    before = dict(curve.throughput_points())[32]
    for _ in range(40):  # the backend halves its speed; only single streams observe it
        curve.observe(1, 50.0, None)
    after = dict(curve.throughput_points())
    assert after[1] == pytest.approx(50, rel=0.05)
    assert after[32] < 0.75 * before  # followed, without a sample at 32


def test_noisy_samples_do_not_sink_the_buckets_they_do_not_hit() -> None:
    """Per-request rates of a fast upstream are very noisy. Each sample moves the other
    buckets; that must not add up to a drift (it once sank a bucket to 0.0 in a few
    thousand requests, and the next sample there divided by it)."""
    rng = random.Random(7)
    curve = CurveLearner()
    for _ in range(10):
        curve.observe(48, 40.0, None)
        curve.observe(64, 35.0, None)
    start = dict(curve.throughput_points())
    for _ in range(20_000):
        curve.observe(64, 35.0 * rng.lognormvariate(0, 1.5), None)
    curve.observe(48, 40.0, None)  # divided by the bucket's estimate: must not fail
    end = dict(curve.throughput_points())
    mean_64 = 35.0 * math.exp(1.5**2 / 2)  # where bucket 64's estimate settles
    ratio = (end[48] / end[64]) / (start[48] / start[64])
    assert 0.5 < ratio < 2.0
    assert end[64] / 64 == pytest.approx(mean_64, rel=0.5)


def test_infinite_or_zero_rates_are_ignored() -> None:
    curve = CurveLearner()
    curve.observe(4, 50.0, None)
    curve.observe(4, math.inf, None)
    curve.observe(4, 0.0, None)
    assert dict(curve.throughput_points()) == {4: 200.0}
