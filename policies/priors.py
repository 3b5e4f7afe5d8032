"""What a backend's throughput curve looks like before it has been measured there: a
shape by engine kind.

A shape g(n) is the aggregate output tok/s at n concurrent streams relative to one stream
(g(1) = 1), piecewise linear between its points, n g(1) below one stream and flat past its
last point. The model scales it to what has been measured (policies/model.py): an unmeasured
backend gets the pool's single-stream rate times g(n); past its highest measured
concurrency a backend's curve goes on as g does from there.

Why a shape per kind: a proxy that has just started has no curve, and the cold decisions
are the ones users count (a deploy, a restart, the first sweep). Without a shape, every
unmeasured backend looked linear at the best rate seen, so llama.cpp took as many streams
as vLLM until its first answers came back (measured on a fresh proxy over the emulated
MI300X pool: 15 of the first 32 requests at 8 concurrent went to llama.cpp, 0.45x vLLM
alone on the first pass at 32). The shapes are from the measured MI300X curves
(calibration/mi300x-qwen3.6-35b-a3b.toml, 512 in / 128 out):

- llama.cpp decodes its slots in one batch but is bound by memory traffic per step:
  114, 244, 270, 255, 277 tok/s at 1, 8, 32, 64, 128 streams (x2.1 at 8, flat past 32).
- vLLM (continuous batching; "openai" servers are assumed to batch as well): x4.3-5.5 at
  8, x11.5-16 at 32, x15-24 at 64, x20-30 at 128 over BF16, FP8 and FP8 with AITER; the
  shape takes about the middle.

A shape only has to rank the first few decisions: learned points replace it wherever the
backend has been measured, and model.explore_limit bounds how far it is trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise

Shape = tuple[tuple[int, float], ...]

LLAMACPP: Shape = ((1, 1.0), (2, 1.35), (4, 1.75), (8, 2.1), (16, 2.3), (32, 2.4))
BATCHING: Shape = ((1, 1.0), (8, 5.0), (32, 14.0), (64, 20.0), (128, 26.0), (256, 30.0))

SHAPES: dict[str, Shape] = {"llamacpp": LLAMACPP, "vllm": BATCHING, "openai": BATCHING}


def shape_of(kind: str) -> Shape:
    return SHAPES.get(kind, BATCHING)


def relative(shape: Sequence[tuple[int, float]], n: float) -> float:
    """g(n): aggregate throughput at n streams over that of one stream."""
    if n <= shape[0][0]:
        return shape[0][1] * n / shape[0][0]
    for (n0, g0), (n1, g1) in pairwise(shape):
        if n <= n1:
            return g0 + (g1 - g0) * (n - n0) / (n1 - n0)
    return shape[-1][1]


TRUST = 0.5  # how much slower per stream than measured a shape is trusted to predict


@lru_cache(maxsize=4096)
def trusted_up_to(shape: Shape, highest: int) -> int:
    """How far past `highest` (the highest concurrency a backend has been measured at) its
    curve may be extrapolated along `shape` before a sample from there is needed: the
    largest n at which the shape predicts each stream still runs at least TRUST times as
    fast as at `highest`, and at least two more than `highest`. For a batching engine
    measured at 1 that is 16 streams, at 8 about 64; for llama.cpp measured at 1, 3."""
    floor = TRUST * relative(shape, highest) / highest
    low, high = highest, 1 << 20
    while low < high:  # g(n) / n does not increase with n: bisect for the last n above
        mid = (low + high + 1) // 2
        if relative(shape, mid) / mid >= floor:
            low = mid
        else:
            high = mid - 1
    return max(low, highest + 2)
