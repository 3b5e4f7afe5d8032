"""Run-level metrics, defined as in `vllm bench serve`, with its JSON key names.

Percentiles interpolate linearly (numpy's default); standard deviation is the population
one; an empty sample gives 0. Times are reported in milliseconds.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from loadgen.record import RequestRecord


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def stats_ms(name: str, values: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in percentiles:
        out[f"p{_key(p)}_{name}_ms"] = percentile(ms, p)
    return out


@dataclass(frozen=True)
class Goodput:
    """SLOs in ms for `--goodput ttft:MS,tpot:MS,e2el:MS`."""

    slos: dict[str, float]

    @classmethod
    def parse(cls, text: str) -> Goodput:
        slos = {}
        for part in text.replace(" ", ",").split(","):
            if not part:
                continue
            name, _, value = part.partition(":")
            if name not in ("ttft", "tpot", "e2el") or not value:
                raise ValueError(f"bad goodput SLO {part!r}: use ttft:MS, tpot:MS or e2el:MS")
            slos[name] = float(value)
        return cls(slos)

    def good(self, r: RequestRecord) -> bool:
        values = {"ttft": r.ttft or 0.0, "tpot": r.tpot or 0.0, "e2el": r.e2el or 0.0}
        return all(values[k] * 1000 <= slo for k, slo in self.slos.items())


def max_overlap(records: list[RequestRecord]) -> int:
    """Exact peak number of successful requests in flight at once."""
    edges = sorted([(r.t0, 1) for r in records] + [(r.last_choice or r.t0, -1) for r in records],
                   key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def max_tokens_per_s(records: list[RequestRecord], start: float) -> float:
    """Most output chunks in any one-second bucket (vLLM counts chunks here)."""
    buckets: Counter[int] = Counter()
    for r in records:
        if r.first_choice is None:
            continue
        t = r.first_choice
        buckets[int(t - start)] += 1
        for gap in r.itl:
            t += gap
            buckets[int(t - start)] += 1
    return float(max(buckets.values(), default=0))


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    started_at: float,
    percentiles: list[float],
    goodput: Goodput | None = None,
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "request_goodput": (sum(1 for r in ok if goodput.good(r)) / duration_s
                            if goodput and duration_s else None),
        "output_throughput": output / duration_s if duration_s else 0.0,
        "total_token_throughput": (prompt + output) / duration_s if duration_s else 0.0,
        "max_output_tokens_per_s": max_tokens_per_s(ok, started_at),
        "max_concurrent_requests": max_overlap(ok),
        "estimated_requests": sum(1 for r in ok if r.estimated),  # no usage in their stream
        "resent_requests": sum(1 for r in records if r.resent),  # after a stale connection
    }
    result |= stats_ms("ttft", [r.ttft for r in ok if r.ttft is not None], percentiles)
    result |= stats_ms("tpot", [r.tpot for r in ok if r.tpot is not None], percentiles)
    result |= stats_ms("itl", [gap for r in ok for gap in r.itl], percentiles)
    result |= stats_ms("e2el", [r.e2el for r in ok if r.e2el is not None], percentiles)
    result["failures"] = dict(Counter(r.error for r in failed if r.error))
    result["errors"] = [r.detail for r in failed[:10]]
    return result


def by_backend(records: list[RequestRecord], duration_s: float) -> dict[str, dict[str, Any]]:
    """Per-backend share, tokens/s, TTFT and failures, from `x-sluiceway-backend`."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.backend or "-", []).append(r)
    out = {}
    for name, group in sorted(groups.items()):
        ok = [r for r in group if r.ok]
        ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
        out[name] = {
            "requests": len(group),
            "share": len(group) / len(records) if records else 0.0,
            "completed": len(ok),
            "failed": len(group) - len(ok),
            "output_throughput": sum(r.output_tokens for r in ok) / duration_s
            if duration_s else 0.0,
            "mean_ttft_ms": statistics.fmean(ttfts) if ttfts else 0.0,
            "failures": dict(Counter(r.error for r in group if r.error)),
        }
    return out
