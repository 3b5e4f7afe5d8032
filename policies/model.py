"""Predictions from a backend's learned curves (pure functions over a snapshot).

- `aggregate_tok_s(b, n)`: output tokens/s summed over n concurrent streams. Between
  learned points it is linear in n; outside them the engine kind's shape g
  (policies/priors.py) carries the nearest learned point on: T = T_last g(n) / g(n_last)
  past the last one, T_first g(n) / g(n_first) below the first. A backend with no samples
  gets `prior_stream_tok_s` g(n). So a vLLM measured at 24 streams is expected to gain
  from a 32nd (it is explored there rather than judged flat), a llama.cpp measured at one
  stream is not expected to double at two (an earlier extrapolation from the last slope
  did expect that, and walked llama.cpp up to 16 streams on a cold proxy while vLLM still
  scaled). explore_limit keeps the guess from being trusted far; learned points replace
  it as requests finish. The learned points are read as a non-decreasing curve (a running
  maximum): a noisy low sample taken during a burst of prefills must not make a backend
  look as if more load would lower its throughput.
- `explore_limit(b)`: how far past its highest learned concurrency h a backend may be
  loaded before a sample from there comes back: as far as its kind's shape predicts each
  stream still runs at least half as fast as at h (priors.trusted_up_to), at least h + 2.
  A fixed 2h (the earlier rule) held a vLLM measured at one stream to 3 streams and
  forced the rest of a step from 1 to 8 concurrent onto llama.cpp (3 of 8 streams; the
  demo's pool fell to 0.85x vLLM alone at 8); by the shape it may take 16, while a
  llama.cpp measured at one stream may take 3. None for a backend not measured at all:
  its kind's shape is all there is to go on, and a limit there forced the traffic of a
  cold burst onto the one backend that happened to be measured (the idle-probe rule of
  adaptive and the shape already keep an unmeasured backend from being flooded blindly).
- `ttft_s(b, n)`: linear between learned points, flat outside them; `prior_ttft_s` when
  nothing is known.
- `request_ttft_s(b, n, chars)`: the TTFT of a request that brings `chars` body bytes for
  the backend to prefill (what its cache does not hold). The TTFT curve was learned from
  the backend's typical prompts (`mean_uncached_chars`); a request with a longer one waits
  for the difference at the backend's learned prefill speed, and never less than its own
  prefill. So a 20k-token agent opening is charged 3.6 s on a llama.cpp that prefills
  5.5k tokens/s and 0.5 s on a vLLM at 40k, where the curve alone (learned on 512-token
  prompts) saw 0.1 s on both and sent openings to llama.cpp. Requests already sent there
  and not yet at their first token add their own excess over the typical prompt
  (`prefill_backlog_chars`) at the same speed: an engine prefills what it was given first
  (vLLM's scheduler is first come, first served; llama.cpp fills each batch from its slots
  in turn), so a burst of eight 22k-token openings charges the eighth the seven ahead of
  it, 3.9 s on a vLLM at 40k tokens/s, and llama.cpp's idle 4 s becomes the better place
  for it. Without that, every opening of the burst saw an empty vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

from backends.snapshot import BackendSnapshot
from policies import priors

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
    shape = priors.shape_of(b.kind)
    points = monotone(b.throughput_curve)
    if not points:
        return prior_stream_tok_s * priors.relative(shape, n)
    first_n, first_t = points[0]
    if n <= first_n:
        return first_t * priors.relative(shape, n) / priors.relative(shape, first_n)
    last_n, last_t = points[-1]
    if n <= last_n:
        return _interpolate(points, n)
    # past the last point the curve goes on as the kind's shape does from there
    return last_t * priors.relative(shape, n) / priors.relative(shape, last_n)


def monotone(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for n, t in points:
        out.append((n, max(t, out[-1][1]) if out else t))
    return out


def explore_limit(b: BackendSnapshot) -> float:
    if not b.throughput_curve:
        return math.inf
    return priors.trusted_up_to(priors.shape_of(b.kind), b.throughput_curve[-1][0])


def ttft_s(b: BackendSnapshot, n: float, prior_ttft_s: float) -> float:
    points = b.ttft_curve
    if not points:
        return prior_ttft_s
    if n <= points[0][0]:
        return points[0][1]
    if n >= points[-1][0]:
        return points[-1][1]
    return _interpolate(points, n)


def prefill_s(b: BackendSnapshot, chars: float) -> float:
    """Seconds to prefill `chars` body bytes at the learned speed; 0 while unknown."""
    rate = b.prefill_chars_per_s
    return chars / rate if rate else 0.0


def request_ttft_s(b: BackendSnapshot, n: float, chars: float, prior_ttft_s: float) -> float:
    base = ttft_s(b, n, prior_ttft_s)
    if not b.prefill_chars_per_s or b.mean_uncached_chars is None:
        return base
    own = prefill_s(b, chars)
    ahead = prefill_s(b, b.prefill_backlog_chars)
    return max(own, base + own - prefill_s(b, b.mean_uncached_chars)) + ahead


def prior_stream_tok_s(backends: Sequence[BackendSnapshot]) -> float:
    """For a backend never observed: the best single-stream rate seen anywhere in the pool
    (optimistic, so it gets tried), each backend's first learned point taken back to one
    stream along its kind's shape; or a default."""
    rates = [b.throughput_curve[0][1] / priors.relative(priors.shape_of(b.kind),
                                                        b.throughput_curve[0][0])
             for b in backends if b.throughput_curve]
    return max(rates, default=DEFAULT_STREAM_TOK_S)


def prior_ttft_s(backends: Sequence[BackendSnapshot]) -> float:
    values = [b.ttft_curve[0][1] for b in backends if b.ttft_curve]
    return min(values, default=0.0)


def output_tokens(b: BackendSnapshot, max_tokens: int | None) -> float:
    if max_tokens:
        return float(max_tokens)
    return b.mean_output_tokens or DEFAULT_OUTPUT_TOKENS
