"""Soak: steady mixed load with periodic faults for a long time; the proxy's resources must
stay flat and no request may be lost.

    python benchmarks/soak.py --minutes 60 [--clients 32] [--window-s 30] [--out out/soak]

The pool, the load and the faults are the chaos benchmark's (benchmarks/chaos.py): its
fault windows run one after another, over and over, until the time is up. The proxy's RSS,
open file descriptors (client and upstream sockets) and event-loop tasks are sampled every
`--sample-s` (10 s) from its /metrics.

Pass criteria, after a warm-up (the first 10% of the run, at least 60 s):
- no request lost (no status and no in-band error);
- RSS: the median of the last tenth of the samples is within 10 MB of the median of the
  first tenth after the warm-up (sluiceway's own growth; the issue's goal);
- open fds and tasks do not grow without bound: the highest value in the last half of
  the run is at most the highest in the first half (after the warm-up) plus a slack of
  16 fds / 16 tasks (a request in progress holds a few of each, and how many are in
  progress when a sample is taken varies).
Writes soak.json and soak.png; exit status 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.chaos import (  # noqa: E402
    ChaosPool,
    Sampler,
    loaded,
    play,
    plot,
    resources,
    schedule,
)
from benchmarks.mixed_load import Load  # noqa: E402

MODEL = "tiny-llama"
RSS_GROWTH_MB = 10.0
SLACK = 16


async def soak(pool: ChaosPool, proxy: str, clients: int, minutes: float, window_s: float,
               sample_s: float) -> tuple[Load, Sampler]:
    load = Load(proxy, MODEL, clients, seed=7)
    sampler = Sampler(proxy, every_s=sample_s)
    end = time.monotonic() + minutes * 60
    async with loaded(load, sampler):
        while time.monotonic() < end:
            for w in schedule(pool):
                if time.monotonic() >= end:
                    break
                await play(w, load, min(window_s, max(1.0, end - time.monotonic())))
                print(f"[{time.strftime('%H:%M:%S')}] {w.name}: {len(load.results)} requests "
                      f"so far", file=sys.stderr, flush=True)
    return load, sampler


def verdict(series: dict[str, list[float]], lost: int, warmup_s: float) -> dict[str, Any]:
    t = series["t_s"]
    after = [i for i, x in enumerate(t) if x >= warmup_s]
    out: dict[str, Any] = {"lost": lost, "samples_after_warmup": len(after)}
    checks = {"no request lost": lost == 0}
    if len(after) >= 4:
        tenth = max(1, len(after) // 10)
        rss = [series["rss_mb"][i] for i in after]
        start, finish = statistics.median(rss[:tenth]), statistics.median(rss[-tenth:])
        out["rss_mb"] = {"after_warmup": round(start, 1), "at_end": round(finish, 1),
                         "growth": round(finish - start, 1)}
        checks[f"RSS growth under {RSS_GROWTH_MB:g} MB"] = finish - start < RSS_GROWTH_MB
        half = len(after) // 2
        for key in ("open_fds", "tasks"):
            values = [series[key][i] for i in after]
            first, second = max(values[:half]), max(values[half:])
            out[key] = {"max_first_half": first, "max_second_half": second}
            checks[f"{key} bounded"] = second <= first + SLACK
    else:
        checks["enough samples after the warm-up"] = False
    out["checks"] = checks
    out["passed"] = all(checks.values())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--window-s", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--policy", default="least_loaded")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "soak")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pool = ChaosPool(args.out)
    try:
        proxy = pool.start_all(args.policy, max(1, args.clients * 3 // 4))
        load, sampler = asyncio.run(soak(pool, proxy, args.clients, args.minutes,
                                                  args.window_s, args.sample_s))
    finally:
        pool.stop_all()
    series = resources(sampler)
    lost = sum(r.outcome == "lost" for r in load.results)
    warmup_s = max(60.0, args.minutes * 60 * 0.1)
    result = verdict(series, lost, warmup_s)
    t0 = sampler.samples[0].t if sampler.samples else 0.0
    plot(series, [], t0, args.out / "soak.png",
         f"sluiceway soak: {args.minutes:g} min, {args.clients} clients, faults every "
         f"{args.window_s:g} s")
    outcomes: dict[str, int] = {}
    for r in load.results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    (args.out / "soak.json").write_text(json.dumps({
        "minutes": args.minutes, "clients": args.clients, "window_s": args.window_s,
        "requests": len(load.results), "outcomes": outcomes, "verdict": result,
        "resources": series}, indent=1))
    print(json.dumps({"requests": len(load.results), "outcomes": outcomes, **result},
                     indent=1))
    print(f"{args.out}/soak.png")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
