"""Learning a backend's throughput curve from the requests it serves.

For every finished request the proxy knows how many tokens it produced, how long its decode
took, its TTFT, and the average number of requests in flight on that backend during its
life (from an exact time integral of the in-flight count). That gives one sample of the
per-stream decode rate r(b) and of TTFT at concurrency b. Samples go into buckets of
concurrency (exact up to 4, then about 1.5x apart): a bucket's first samples are averaged
(weight 1/k for its k-th), later ones enter with weight ALPHA. One request's rate varies a
lot with the prefills that happen to share its steps, and the policy reads differences
between neighbouring buckets (the marginal throughput), so a bucket has to average over
about ten requests: with ALPHA = 0.25 the noise alone put a second stream on llama.cpp at
32 concurrent about half the time.

Following a backend that changes speed: when a sample moves its bucket's estimate by a
ratio q, every other bucket of the curve moves by q^e, so the whole curve follows a
slowdown seen at the current load, not only the bucket that observed it. The exponent is
DRIFT / weight while a bucket is young (others move about DRIFT of the surprise in log
terms) and FOLLOW once it has its ten samples. Moving by a power of the *estimate's* change
matters: the product of those factors telescopes to a power of the estimate's overall
change, which is bounded. A power of the raw sample's surprise (an earlier version) does
not telescope: the mean log of noisy samples sits below the log of their mean, so every
unobserved bucket sank a little with each sample, without bound; with the noisy rates of a
fast upstream a bucket reached 0.0 within a few thousand requests and the next division by
it failed the request.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
ALPHA = 0.1  # weight of a new rate sample in a bucket past its first 1 / ALPHA samples
TTFT_ALPHA = 0.25  # weight of a new TTFT sample (queueing changes TTFT quickly)
DRIFT = 0.1  # share of a young bucket's surprise (in log terms) that the others take on
FOLLOW = 0.8  # share of a settled bucket's change the others follow (below 1: the shape
#              between buckets keeps learning, slowly)


def bucket_of(concurrency: float) -> int:
    """Index of the bucket nearest to `concurrency` (in log space)."""
    i = bisect.bisect_left(BUCKETS, concurrency)
    if i == 0:
        return 0
    if i == len(BUCKETS):
        return len(BUCKETS) - 1
    low, high = BUCKETS[i - 1], BUCKETS[i]
    return i - 1 if concurrency * concurrency < low * high else i


class CurveLearner:
    """Per-bucket moving estimates of per-stream decode tok/s and of TTFT seconds."""

    __slots__ = ("_count", "_rate", "_samples", "_ttft")

    def __init__(self) -> None:
        self._rate: list[float | None] = [None] * len(BUCKETS)
        self._ttft: list[float | None] = [None] * len(BUCKETS)
        self._count = [0] * len(BUCKETS)  # rate samples per bucket
        self._samples = 0

    @property
    def samples(self) -> int:
        return self._samples

    def observe(self, concurrency: float, stream_tok_s: float | None,
                ttft_s: float | None) -> None:
        i = bucket_of(max(1.0, concurrency))
        if stream_tok_s is not None and 0 < stream_tok_s < math.inf:
            self._samples += 1
            self._count[i] += 1
            weight = max(ALPHA, 1 / self._count[i])
            old = self._rate[i]
            if old is None:
                self._rate[i] = stream_tok_s
            else:
                new = self._rate[i] = old + weight * (stream_tok_s - old)
                factor = (new / old) ** min(FOLLOW, DRIFT / weight)
                for j, value in enumerate(self._rate):
                    if j != i and value is not None:
                        self._rate[j] = value * factor
        if ttft_s is not None and ttft_s >= 0:
            old_t = self._ttft[i]
            self._ttft[i] = ttft_s if old_t is None else old_t + TTFT_ALPHA * (ttft_s - old_t)

    def state(self) -> dict[str, list[float | None] | list[int] | int]:
        """Everything learned, as plain JSON-able data (shared by replicas: cluster/)."""
        return {"rate": list(self._rate), "ttft": list(self._ttft),
                "count": list(self._count), "samples": self._samples}

    def load(self, state: dict[str, Any]) -> None:
        """Take over a state from `state()`; raises ValueError for one of another shape."""
        rate, ttft, count = state["rate"], state["ttft"], state["count"]
        if not len(rate) == len(ttft) == len(count) == len(BUCKETS):
            raise ValueError("a curve with other buckets")
        self._rate = [None if v is None else float(v) for v in rate]
        self._ttft = [None if v is None else float(v) for v in ttft]
        self._count = [int(c) for c in count]
        self._samples = int(state["samples"])

    def throughput_points(self) -> tuple[tuple[int, float], ...]:
        """(concurrency, aggregate tok/s) for every bucket seen, by concurrency."""
        return tuple((b, b * r) for b, r in zip(BUCKETS, self._rate, strict=True)
                     if r is not None)

    def ttft_points(self) -> tuple[tuple[int, float], ...]:
        return tuple((b, t) for b, t in zip(BUCKETS, self._ttft, strict=True) if t is not None)
