"""Predictions from a backend's learned curves (pure functions over a snapshot).

- `aggregate_tok_s(b, n)`: output tokens/s summed over n concurrent streams. Between
  learned points it is linear in n; below the first point the first point's per-stream rate
  holds. Past the last learned point (n_last, T_last) the slope s of the last segment
  (from the origin when there is one point) carries on, fading as sqrt(n_last / n):
  T = T_last + 2 s sqrt(n_last) (sqrt(n) - sqrt(n_last)). More streams are assumed to add
  throughput with diminishing returns, as batching does, at first as much as they did last,
  so a backend still scaling is explored past its frontier rather than judged flat there
  (a plain T_last * sqrt(n / n_last) made vLLM FP8 at 26 of 32 streams look no better than
  a sixth llama.cpp stream, so it was never measured at 32), and a curve that has gone flat
  stays flat. explore_limit keeps the guess from being trusted far; learned points
  replace it as requests finish. A backend with no samples gets
  `prior_stream_tok_s` per stream. The learned points are read as a non-decreasing curve
  (a running maximum): a noisy low sample taken during a burst of prefills must not make a
  backend look as if more load would lower its throughput.
- `explore_limit(b)`: how far past its highest learned concurrency a backend may be
  loaded before a sample from there comes back: twice that concurrency, at least two more;
  one request for a backend not measured at all.
- `ttft_s(b, n)`: linear between learned points, flat outside them; `prior_ttft_s` when
  nothing is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

from backends.snapshot import BackendSnapshot

DEFAULT_STREAM_TOK_S = 50.0
DEFAULT_OUTPUT_TOKENS = 256


def _interpolate(points: Sequence[tuple[int, float]], n: float) -> float:
    for (b0, v0), (b1, v1) in pairwise(points):
        if b0 <= n <= b1:
            return v0 + (v1 - v0) * (n - b0) / (b1 - b0)
    raise ValueError("n outside the points")  # callers handle the ends


def aggregate_tok_s(b: BackendSnapshot, n: float, prior_stream_tok_s: float) -> float:
    if n <= 0:
        return 0.0
    points = monotone(b.throughput_curve)
    if not points:
        return prior_stream_tok_s * n
    first_n, first_t = points[0]
    if n <= first_n:
        return first_t / first_n * n
    last_n, last_t = points[-1]
    if n <= last_n:
        return _interpolate(points, n)
    # past the last point the last segment's slope goes on, fading as 1/sqrt(n)
    prev_n, prev_t = points[-2] if len(points) > 1 else (0, 0.0)
    slope = (last_t - prev_t) / (last_n - prev_n)
    return last_t + 2 * slope * math.sqrt(last_n) * (math.sqrt(n) - math.sqrt(last_n))


def monotone(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for n, t in points:
        out.append((n, max(t, out[-1][1]) if out else t))
    return out


def explore_limit(b: BackendSnapshot) -> float:
    if not b.throughput_curve:
        return 1
    highest = b.throughput_curve[-1][0]
    return max(2 * highest, highest + 2)


def ttft_s(b: BackendSnapshot, n: float, prior_ttft_s: float) -> float:
    points = b.ttft_curve
    if not points:
        return prior_ttft_s
    if n <= points[0][0]:
        return points[0][1]
    if n >= points[-1][0]:
        return points[-1][1]
    return _interpolate(points, n)


def prior_stream_tok_s(backends: Sequence[BackendSnapshot]) -> float:
    """For a backend never observed: the best single-stream rate seen anywhere in the pool
    (optimistic, so it gets tried), or a default."""
    rates = [pts[0][1] / pts[0][0] for pts in (b.throughput_curve for b in backends) if pts]
    return max(rates, default=DEFAULT_STREAM_TOK_S)


def prior_ttft_s(backends: Sequence[BackendSnapshot]) -> float:
    values = [b.ttft_curve[0][1] for b in backends if b.ttft_curve]
    return min(values, default=0.0)


def output_tokens(b: BackendSnapshot, max_tokens: int | None) -> float:
    if max_tokens:
        return float(max_tokens)
    return b.mean_output_tokens or DEFAULT_OUTPUT_TOKENS
