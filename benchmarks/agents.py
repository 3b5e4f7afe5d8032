"""Long-context coding agents on an emulated llama.cpp + vLLM pool, per target.

    .venv/bin/python benchmarks/agents.py [--speed 4] [--pools fp8,aiter]

Agent sessions as coding agents run them: each opens with a large context (repository
files, a task: --opening tokens after a shared system prompt), then adds a tool result of
--turn-tokens per turn and asks for --output tokens, with 0..--think-ms of tool time
between turns (profile time). --conversations sessions at once. Targets, each on freshly
started emulators (no cache warm from an earlier run) and, for the policies, a freshly
started proxy (calibrated as shipped, nothing else learned): llama.cpp alone, vLLM alone,
round_robin, least_loaded, adaptive. Reported in profile time (measured x speed): mean
TTFT of the first turns, mean / p50 / p99 TTFT of turns 2+ and their mean end-to-end time
(request sent to last token: what an agent waits before its tool runs), output tok/s over the whole
run, failures, the share of turns on llama.cpp, and for the policies turns 2+ per backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.routing import Fleet  # noqa: E402
from loadgen.record import RequestRecord  # noqa: E402
from loadgen.runner import Target, agent_sessions  # noqa: E402
from loadgen.summary import percentile  # noqa: E402
from loadgen.workload import Workload  # noqa: E402

POOLS = {"fp8": ("llamacpp-q4km", "vllm-fp8"), "aiter": ("llamacpp-q4km", "vllm-fp8-aiter")}
TARGETS = ("llama alone", "vllm alone", "round_robin", "least_loaded", "adaptive")


def run(fleet: Fleet, pool: tuple[str, str], target: str,
        args: argparse.Namespace) -> dict[str, Any]:
    llama = fleet.emulator(pool[0])
    vllm = fleet.emulator(pool[1])
    if target == "llama alone":
        url = llama
    elif target == "vllm alone":
        url = vllm
    else:
        url = fleet.proxy([("llama", "llamacpp", llama), ("vllm", "vllm", vllm)], target,
                          access_log=args.trace is not None)[1]
    sampler = None
    if args.trace is not None and target not in TARGETS[:2]:
        sampler = Sampler(url, args.trace / f"{'-'.join(pool)}-{target}-backends.jsonl")
    try:
        level = asyncio.run(agent_sessions(
            Target(target, url),
            Workload("chat", "m", input_len=args.turns * args.turn_tokens,
                     output_len=args.output),
            conversations=args.conversations, turns=args.turns,
            prefix_tokens=args.prefix, first_turn_tokens=args.opening, timeout_s=900,
            think_s=args.think_ms / 1000 / fleet.speed, show_progress=False))
        if args.trace is not None:
            trace(args.trace / f"{'-'.join(pool)}-{target}", level.records, level.started,
                  None if sampler is None else fleet.log_of(url))
    finally:
        if sampler is not None:
            sampler.stop()
        fleet.stop_all()
        fleet.procs.clear()
    speed = fleet.speed
    ok = [r for r in level.records if r.ok and r.ttft is not None]
    first = [r.ttft * speed for r in ok if r.turn == 0 and r.ttft is not None]
    later = [r.ttft * speed for r in ok if r.turn > 0 and r.ttft is not None]
    whole = [r.e2el * speed for r in ok if r.turn > 0 and r.e2el is not None]
    by_backend = {}  # turns 2+ per backend: where a session stays, what its turns take
    for name in sorted({r.backend for r in ok if r.turn > 0 and r.backend}):
        mine = [r for r in ok if r.turn > 0 and r.backend == name and r.e2el is not None]
        by_backend[name] = {
            "turns": len(mine),
            "ttft_mean": statistics.fmean(r.ttft * speed for r in mine if r.ttft is not None),
            "e2e_mean": statistics.fmean(r.e2el * speed for r in mine if r.e2el is not None),
        }
    tokens = sum(r.output_tokens for r in level.records if r.ok)
    on_llama = sum(1 for r in level.records if r.backend == "llama")
    return {
        "first_mean": statistics.fmean(first) if first else None,
        "later_mean": statistics.fmean(later) if later else None,
        "later_p50": percentile(later, 50) if later else None,
        "later_p99": percentile(later, 99) if later else None,
        "later_e2e_mean": statistics.fmean(whole) if whole else None,
        "later_by_backend": by_backend,
        "out_tok_s": tokens / level.duration / speed,
        "failed": sum(1 for r in level.records if not r.ok),
        "turns": len(level.records),
        "llama_share": on_llama / max(1, len(level.records)) if target not in TARGETS[:2]
        else None,
    }


class Sampler:
    """Polls the proxy's /admin/backends every 50 ms into a JSON-lines file while a run
    goes: what each backend held, its prefill backlog and what the policy had learned
    (in flight, backlog, prefill speed, typical uncached prompt, curves)."""

    KEYS = ("in_flight", "prefill_backlog_chars", "prefill_chars_per_s", "mean_uncached_chars",
            "ttft_s", "decode_tok_s", "ttft_curve", "throughput_curve")

    def __init__(self, url: str, path: Path) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(url, path), daemon=True)
        self._thread.start()

    def _poll(self, url: str, path: Path) -> None:
        with httpx.Client(timeout=5) as client, path.open("w") as out:
            while not self._done.wait(0.05):
                try:
                    views = client.get(url + "/admin/backends").json()["backends"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue  # the proxy is starting or stopping
                line = {"t": time.perf_counter(),
                        **{b["name"]: {k: b.get(k) for k in self.KEYS} for b in views}}
                out.write(json.dumps(line) + "\n")

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)


def trace(prefix: Path, records: list[RequestRecord], started: float,
          proxy_log: Path | None) -> None:
    """Every request of a run (perf_counter times, as the sampler's) and the proxy's
    access log, for reading a run's routing afterwards (--trace)."""
    with Path(f"{prefix}-requests.jsonl").open("w") as out:
        # the access log's times are wall-clock: this line maps them to perf_counter's
        out.write(json.dumps({"clock": {"perf_counter": time.perf_counter(),
                                        "time": time.time()}}) + "\n")
        for r in records:
            out.write(json.dumps({"t0": r.t0, "since_start": r.t0 - started, "turn": r.turn,
                                  "backend": r.backend, "ttft": r.ttft, "e2el": r.e2el,
                                  "prompt_tokens": r.prompt_tokens, "ok": r.ok}) + "\n")
    if proxy_log is not None:
        shutil.copy(proxy_log, f"{prefix}-proxy.log")


def show(title: str, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n## {title}\n")
    print(f"{'target':<14} {'turn 1 TTFT':>11} {'turns 2+ mean':>13} {'p50':>7} {'p99':>7} "
          f"{'e2e 2+':>7} {'out tok/s':>9} {'failed':>6} {'llama share':>11}")
    for target, m in results.items():
        share = "" if m["llama_share"] is None else f"{m['llama_share']:.0%}"
        print(f"{target:<14} {m['first_mean']:>10.2f}s {m['later_mean']:>12.3f}s "
              f"{m['later_p50']:>6.3f}s {m['later_p99']:>6.3f}s {m['later_e2e_mean']:>6.2f}s "
              f"{m['out_tok_s']:>9,.0f} "
              f"{m['failed']:>6} {share:>11}")
        for backend, b in m["later_by_backend"].items():
            print(f"  turns 2+ on {backend:<7} {b['turns']:>3} turns, TTFT {b['ttft_mean']:.3f}s, "
                  f"e2e {b['e2e_mean']:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", type=float, default=4.0)
    parser.add_argument("--pools", default="fp8,aiter")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--prefix", type=int, default=2000, help="shared system prompt")
    parser.add_argument("--opening", type=int, default=20000)
    parser.add_argument("--turn-tokens", type=int, default=1500)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--think-ms", type=float, default=5000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trace", type=Path, help="a folder: every request, the proxy's "
                        "access log and /admin/backends every 50 ms, per pool and target")
    args = parser.parse_args()
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(args.speed, Path(tempfile.mkdtemp(prefix="sluiceway-agents-")))
    report: dict[str, Any] = {"args": vars(args) | {"json": None, "trace": None},
                              "pools": {}}
    try:
        for name in args.pools.split(","):
            pool = POOLS[name]
            results = {}
            for target in args.targets.split(","):
                results[target] = run(fleet, pool, target, args)
                print(f"{name} {target}: {results[target]}", file=sys.stderr)
            show(f"llamacpp-q4km + {pool[1]}, speed {args.speed:g}, {args.conversations} "
                 f"agents x {args.turns} turns, opening {args.opening:,} + {args.prefix:,} "
                 f"tokens, +{args.turn_tokens:,} per turn, {args.output} out, tool time "
                 f"0-{args.think_ms / 1000:g} s", results)
            report["pools"][name] = results
            if args.json:  # after every pool, so a later failure keeps what was measured
                args.json.write_text(json.dumps(report, indent=2))
    finally:
        fleet.stop_all()


if __name__ == "__main__":
    main()
