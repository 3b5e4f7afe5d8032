"""Routing quality: each backend alone and the pool under every policy, side by side.

    python benchmarks/routing.py [--speed 4] [--levels 1,8,32,64,128] [--pools all]
                                 [--cold [--per-c 3]] [--skip-agent | --only-agent]
                                 [--real-llama] [--real [--pin]] [--json PATH]

For each emulated pool (llama.cpp Q4_K_M + vLLM FP8 with AITER, and llama.cpp + stock vLLM
FP8) it runs, in one process and one run: the llama.cpp emulator alone, the vLLM emulator
alone, then `sluiceway serve` in front of both under round_robin, least_loaded, latency and
adaptive (a fresh proxy per policy, so each learns from nothing). Closed loop at each level
with 512 input / 128 output tokens, in order 1, 8, 32, ... (so learning policies see the
low levels first).

Throughput is measured in a steady-state window (tokens arriving after a warm-up and
before dispatch stops), so the drain tail of slow backends does not blur the comparison;
TTFT statistics cover the requests sent in that window; failures count every request.
Figures are in profile time (the emulators run at --speed; tok/s are divided by it, times
multiplied). The last column of each pool's table is the pool's ratio to its best single
backend at that level.

With --cold every level is measured as a user meets a proxy after a deploy: a freshly
started proxy per level and policy, one uncounted warm-up request, then
max(16, PER_C x concurrency) requests, all counted; output tok/s over the whole run (first
dispatch to last token, as `vllm bench serve` reports it) and over its first 10 s of
profile time, each as a ratio to the best single backend measured the same way.

The agent workload (8 conversations x 8 turns, a 2,000-token shared system prompt, then
1,200 tokens of new context and a 64-token reply per turn, as a coding agent adding files
and tool output to its conversation) then runs
against adaptive with and without session affinity, on the llama.cpp + vLLM pool and on a
pool of two llama.cpp instances, and reports mean TTFT per turn (round_robin, which
ignores sessions, is shown as a third reference). With --real-llama the same comparison
runs on two real llama-server instances (2 slots each; built by tests/realllama/build.py,
random test model, real time), with a shorter workload sized for one CPU thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from emulator.profile import get_profile  # noqa: E402
from loadgen.local import free_port, pin, spawn, wait_http  # noqa: E402
from loadgen.record import RequestRecord  # noqa: E402
from loadgen.runner import LevelResult, Target, agent_sessions, closed_loop  # noqa: E402
from loadgen.summary import percentile  # noqa: E402
from loadgen.workload import Workload  # noqa: E402
from tests.realllama.server import RealLlama, prepare, server_args  # noqa: E402
from tests.realvllm import server as vllm_server  # noqa: E402
from tests.realvllm.build import Artifacts as RealVllm  # noqa: E402
from tests.realvllm.build import install as install_vllm  # noqa: E402

POOLS = {
    "llamacpp-q4km + vllm-fp8-aiter": ("llamacpp-q4km", "vllm-fp8-aiter"),
    "llamacpp-q4km + vllm-fp8": ("llamacpp-q4km", "vllm-fp8"),
}
POLICIES = ("round_robin", "least_loaded", "latency", "adaptive")
WORKLOAD = Workload("chat", "m", input_len=512, output_len=128)
# --real: both engines serve their random test model as `tiny-llama` on the same two cores
REAL_WORKLOAD = Workload("chat", vllm_server.MODEL_NAME, input_len=128, output_len=64)
REAL_LEVELS = [1, 2, 4, 8, 16]
REAL_POLICIES = ("round_robin", "least_loaded", "adaptive")


class Fleet:
    """Emulators and proxies started by this benchmark, always stopped."""

    def __init__(self, speed: float, workdir: Path, engine_cpus: set[int] | None = None
                 ) -> None:
        self.speed = speed
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.engine_cpus = engine_cpus  # the real engines' CPUs (None: wherever this runs)
        self.logs: dict[str, Path] = {}  # url -> the output of what serves it (_start)

    def _engine(self, cmd: list[str], log: Path,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = spawn(cmd, log, ROOT, self.engine_cpus, env)
        self.procs.append(proc)
        return proc

    def log_of(self, url: str) -> Path:
        """Where the output of the process serving `url` (started here) goes."""
        return self.logs[url]

    def _start(self, args: list[str], ready: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        log = self.workdir / f"{args[0]}-{port}.log"
        proc = spawn([sys.executable, "-m", "proxy.cli", *args, "--port", str(port)], log, ROOT)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.logs[url] = log
        wait_http(url + ready, proc)
        return proc, url

    def emulator(self, profile: str) -> str:
        engine = get_profile(profile).engine
        return self._start(["emulate", "--engine", engine, "--profile", profile, "--speed",
                            str(self.speed), "--model", "m"], "/health")[1]

    def llama_server(self, real: RealLlama, slots: int) -> str:
        """A real llama-server (built by tests/realllama) on the random test model."""
        port = free_port()
        proc = self._engine([str(real.server), *server_args(real.model, port, slots)],
                            self.workdir / f"llama-server-{port}.log")
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, timeout_s=120)
        return url

    def vllm(self, real: RealVllm, max_num_seqs: int) -> str:
        """The real vLLM (installed by tests/realvllm) on its random test model."""
        port = free_port()
        proc = self._engine(
            [str(real.vllm), *vllm_server.server_args(real.model, port, max_num_seqs)],
            self.workdir / f"vllm-{port}.log", {**os.environ, **vllm_server.ENV})
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, timeout_s=vllm_server.START_TIMEOUT_S)
        return url

    def proxy(self, backends: list[tuple[str, str, str]], policy: str,
              affinity: bool = True, model: str = "m", access_log: bool = False,
              ) -> tuple[subprocess.Popen[bytes], str]:
        """A fresh `sluiceway serve`; its output (with `access_log`, one JSON line per
        request) goes to `self.log_of(url)`."""
        lines = [f'[routing]\npolicy = "{policy}"\naffinity = {str(affinity).lower()}',
                 f"[server]\naccess_log = {str(access_log).lower()}",
                 "[health]\ninterval_s = 1"]
        for name, kind, url in backends:
            cap = "\nmax_concurrency = 1024" if kind == "vllm" else ""
            lines.append(f'[[backends]]\nname = "{name}"\nkind = "{kind}"\nurl = "{url}"\n'
                         f'models = ["{model}"]{cap}')
        config = self.workdir / f"proxy-{policy}-{free_port()}.toml"
        config.write_text("\n".join(lines) + "\n")
        return self._start(["serve", "--config", str(config), "--log-level",
                            "info" if access_log else "warning"], "/ready")

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc)
            for leftover in Path("/dev/shm").glob(f"__KMP_REGISTERED_LIB_{proc.pid}_*"):
                leftover.unlink(missing_ok=True)  # Intel OpenMP's, from vLLM


def chunk_times(r: RequestRecord) -> list[float]:
    if r.first_choice is None:
        return []
    times, t = [r.first_choice], r.first_choice
    for gap in r.itl:
        t += gap
        times.append(t)
    return times


def windowed(level: LevelResult, warmup_s: float, window_s: float,
             speed: float) -> dict[str, Any]:
    """Steady-state output tok/s and TTFT of one closed-loop level, in profile time."""
    start = level.started + warmup_s
    end = start + window_s  # dispatch stops here; what follows is the drain
    # a chunk is a choices message; spread each request's output tokens over its chunks
    # (the role-only and finish chunks carry none)
    tokens = 0.0
    for r in level.records:
        times = chunk_times(r) if r.ok else []
        if times:
            tokens += r.output_tokens / len(times) * sum(1 for t in times if start <= t < end)
    ttfts = [r.ttft * speed for r in level.records
             if r.ok and r.ttft is not None and start <= r.t0 < end]
    return {
        "tok_s": tokens / (end - start) / speed if end > start else 0.0,
        "failed": sum(1 for r in level.records if not r.ok),
        "mean_ttft_s": statistics.fmean(ttfts) if ttfts else 0.0,
        "p99_ttft_s": percentile(ttfts, 99),
        "requests": len(level.records),
        "llama_share": (sum(1 for r in level.records if (r.backend or "").startswith("llama"))
                        / len(level.records)),
    }


def whole_run(level: LevelResult, speed: float, first_s: float) -> dict[str, Any]:
    """A closed-loop level as a user measures it, in profile time: every request counted,
    output tok/s over the whole run from the first dispatch to the last token (as
    `vllm bench serve` reports it), and the output rate within its first `first_s`."""
    head_end = level.started + first_s / speed
    head = 0.0
    for r in level.records:
        times = chunk_times(r) if r.ok else []
        if times:
            head += r.output_tokens / len(times) * sum(1 for t in times if t < head_end)
    ok = [r for r in level.records if r.ok]
    ttfts = [r.ttft * speed for r in ok if r.ttft is not None]
    return {
        "tok_s": sum(r.output_tokens for r in ok) / level.duration / speed,
        "first_tok_s": head / min(first_s, level.duration * speed),
        "failed": len(level.records) - len(ok),
        "mean_ttft_s": statistics.fmean(ttfts) if ttfts else 0.0,
        "p99_ttft_s": percentile(ttfts, 99),
        "requests": len(level.records),
        "llama_share": (sum(1 for r in level.records if (r.backend or "").startswith("llama"))
                        / len(level.records)),
    }


def cold_level(url: str, concurrency: int, per_c: int, speed: float,
               workload: Workload = WORKLOAD) -> dict[str, Any]:
    """One level from a fresh start: one warm-up request (uncounted), then
    max(16, per_c x concurrency) requests, all counted."""
    level = asyncio.run(closed_loop(Target("t", url), workload, concurrency,
                                    requests=max(16, per_c * concurrency), duration_s=None,
                                    warmup=1, timeout_s=900, show_progress=False))
    return whole_run(level, speed, first_s=10.0)


def cold_sweep(label: str, levels: list[int], per_c: int, speed: float,
               start: Any, workload: Workload = WORKLOAD) -> dict[int, dict[str, Any]]:
    """`start()` gives a fresh (process, url) for every level; it is stopped after."""
    out = {}
    for c in levels:
        proc, url = start()
        try:
            out[c] = cold_level(url, c, per_c, speed, workload)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        progress(label, c, out[c])
    return out


def run_level(url: str, concurrency: int, expected_tok_s: float, speed: float) -> dict[str, Any]:
    # Fixed-length requests started together stay in cohorts (all prefill, then all
    # decode), so the window spans a whole number of request cycles.
    cycle_s = concurrency * WORKLOAD.output_len / expected_tok_s / speed
    warmup_s = max(2.0, 1.5 * cycle_s)
    window_s = cycle_s * max(3, math.ceil(4.0 / cycle_s))
    level = asyncio.run(closed_loop(Target("t", url), WORKLOAD, concurrency, requests=None,
                                    duration_s=warmup_s + window_s, warmup=0, timeout_s=900,
                                    show_progress=False))
    return windowed(level, warmup_s, window_s, speed)


def sweep(url: str, levels: list[int], expect: dict[int, float], speed: float,
          label: str) -> dict[int, dict[str, Any]]:
    out = {}
    for c in levels:
        out[c] = run_level(url, c, expect[c], speed)
        progress(label, c, out[c])
    return out


def print_pool(title: str, results: dict[str, dict[int, dict[str, Any]]],
               singles: list[str], levels: list[int], cold: bool = False) -> None:
    """One table per pool; a cold run adds the output rate of each level's first 10 s and
    its ratio to the best single backend's."""
    print(f"\n## {title}{' (cold: a fresh proxy per level, whole runs)' if cold else ''}\n")
    header = (f"{'target':<20} {'conc':>5} {'out tok/s':>10} "
              + (f"{'first 10 s':>11} " if cold else "")
              + f"{'failed':>7} {'TTFT mean':>10} {'TTFT p99':>9} {'llama share':>12} "
              f"{'vs best single':>15}" + (f" {'first 10 s':>11}" if cold else ""))
    print(header)
    print("-" * len(header))
    for target, per_level in results.items():
        for c in levels:
            m = per_level[c]
            pool = target not in singles
            best = max(results[s][c]["tok_s"] for s in singles)
            ratio = f"{m['tok_s'] / best:.2f}x" if pool else ""
            head = ""
            if cold:
                best_head = max(results[s][c]["first_tok_s"] for s in singles)
                head = f"{m['first_tok_s'] / best_head:.2f}x" if pool else ""
            print(f"{target:<20} {c:>5} {m['tok_s']:>10,.0f} "
                  + (f"{m['first_tok_s']:>11,.0f} " if cold else "")
                  + f"{m['failed']:>7} {m['mean_ttft_s']:>9.2f}s {m['p99_ttft_s']:>8.2f}s "
                  f"{m['llama_share']:>11.0%} {ratio:>15}" + (f" {head:>11}" if cold else ""))


def progress(label: str, c: int, m: dict[str, Any]) -> None:
    first = f" (first 10 s {m['first_tok_s']:>7,.0f})" if "first_tok_s" in m else ""
    print(f"  {label:<28} c={c:<4} {m['tok_s']:>7,.0f} tok/s{first}  failed {m['failed']}  "
          f"TTFT {m['mean_ttft_s']:.2f} s (p99 {m['p99_ttft_s']:.2f})  "
          f"llama {m['llama_share']:.0%}", file=sys.stderr, flush=True)


AGENTS = (
    # (a) every turn adds 1,200 tokens, back to back
    {"conversations": 8, "turns": 8, "prefix_tokens": 2000, "turn_tokens": 1200,
     "output_len": 64},
    # (b) an opening context of 8,000 tokens, then 200-token tool results, 0-2 s of tool
    # time between turns (profile time)
    {"conversations": 8, "turns": 8, "prefix_tokens": 2000, "first_turn_tokens": 8000,
     "turn_tokens": 200, "output_len": 64, "think_ms": 2000},
)
# the real llama-server decodes the random test model on one CPU thread (~45 tok/s,
# ~700 tok/s prefill): fewer, shorter turns. (a) every turn the same size; (b) an agent
# that opens with a large context (files, a task), then adds small tool results; (c) the
# same with 0-1.5 s of tool time between turns, so turns arrive in no fixed order
REAL_AGENTS = (
    {"conversations": 4, "turns": 6, "prefix_tokens": 400, "turn_tokens": 120,
     "output_len": 16},
    {"conversations": 4, "turns": 6, "prefix_tokens": 200, "first_turn_tokens": 800,
     "turn_tokens": 40, "output_len": 16},
    {"conversations": 4, "turns": 6, "prefix_tokens": 200, "first_turn_tokens": 800,
     "turn_tokens": 40, "output_len": 16, "think_ms": 1500},
)


def agent_run(fleet: Fleet, servers: list[tuple[str, str, str]], policy: str,
              affinity: bool, speed: float, shape: dict[str, int]) -> dict[str, Any]:
    """One agent run on freshly started servers (so no cache is warm from an earlier run)."""
    _, url = fleet.proxy(servers, policy, affinity)
    try:
        level = asyncio.run(agent_sessions(
            Target("agents", url),
            Workload("chat", "m", input_len=shape["turns"] * shape["turn_tokens"],
                     output_len=shape["output_len"]),
            conversations=shape["conversations"], turns=shape["turns"],
            prefix_tokens=shape["prefix_tokens"], timeout_s=900, show_progress=False,
            first_turn_tokens=shape.get("first_turn_tokens"),
            think_s=shape.get("think_ms", 0) / 1000 / speed))
    finally:
        fleet.stop_all()
    per_turn: dict[int, list[float]] = {}
    for r in level.records:
        if r.ok and r.ttft is not None:
            per_turn.setdefault(r.turn, []).append(r.ttft * speed)
    means = {t: statistics.fmean(v) for t, v in sorted(per_turn.items())}
    later = [v for t, vs in per_turn.items() if t > 0 for v in vs]
    return {"per_turn": means, "later_mean": statistics.fmean(later) if later else 0.0,
            "failed": sum(1 for r in level.records if not r.ok)}


def real_pool(args: argparse.Namespace) -> None:
    """The real llama-server and the real vLLM on this machine's cores, in real time."""
    levels = REAL_LEVELS if args.levels == "1,8,32,64,128" else [
        int(x) for x in args.levels.split(",")]
    # --pin: the engines on the first CPU, the proxies and the client on the others, as a
    # proxy runs beside (not on) a CPU engine's cores in a deployment
    engine_cpus = pin(True) if args.pin else None
    fleet = Fleet(1.0, Path(tempfile.mkdtemp(prefix="sluiceway-routing-real-")), engine_cpus)
    try:
        llama_url = fleet.llama_server(prepare(), slots=4)
        vllm_url = fleet.vllm(install_vllm(), max_num_seqs=16)
        singles = {"llama-server": llama_url, "vllm": vllm_url}
        results = {name: cold_sweep(name, levels, args.per_c, 1.0, lambda u=url: (None, u),
                                    REAL_WORKLOAD)
                   for name, url in singles.items()}
        backends = [("llama-server", "llamacpp", llama_url), ("vllm", "vllm", vllm_url)]
        policies = (REAL_POLICIES if args.policies == ",".join(POLICIES)
                    else args.policies.split(","))
        for policy in policies:
            results[policy] = cold_sweep(
                policy, levels, args.per_c, 1.0,
                lambda p=policy: fleet.proxy(backends, p, model=REAL_WORKLOAD.model),
                REAL_WORKLOAD)
        print_pool("real llama-server (4 slots) + real vLLM (16 seqs), "
                   f"{REAL_WORKLOAD.input_len} in / {REAL_WORKLOAD.output_len} out",
                   results, list(singles), levels, cold=True)
        if args.json:
            args.json.write_text(json.dumps({"real": results, "levels": levels}, indent=2))
    finally:
        fleet.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", type=float, default=4.0)
    parser.add_argument("--levels", default="1,8,32,64,128")
    parser.add_argument("--pools", default="all", help="comma list of pool names, or all")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--skip-agent", action="store_true")
    parser.add_argument("--only-agent", action="store_true")
    parser.add_argument("--real-llama", action="store_true",
                        help="also run the agent workload on two real llama-server "
                             "instances (built by tests/realllama/build.py)")
    parser.add_argument("--real-llama-only", action="store_true",
                        help="with --only-agent: run the agent workload on real llama-server "
                             "instances only")
    parser.add_argument("--real-shapes", default="abc",
                        help="which real llama-server agent shapes to run (letters)")
    parser.add_argument("--cold", action="store_true",
                        help="whole runs, a freshly started proxy per level and policy, no "
                             "learning pass (as a user meets it after a deploy)")
    parser.add_argument("--per-c", type=int, default=3,
                        help="with --cold: requests per level = max(16, PER_C x concurrency)")
    parser.add_argument("--pin", action="store_true",
                        help="with --real: the engines on the first CPU, the proxies and the "
                             "client on the others (loadgen.local.pin)")
    parser.add_argument("--real", action="store_true",
                        help="only the real pool: the pinned llama-server (4 slots) and the "
                             "real vLLM (--max-num-seqs 16), each alone and under "
                             "round_robin, least_loaded and adaptive, cold, at 1-16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.real:
        real_pool(args)
        return
    levels = [int(x) for x in args.levels.split(",")]
    pools = POOLS if args.pools == "all" else {k: POOLS[k] for k in args.pools.split(",")}
    if args.only_agent:
        pools = {}
    fleet = Fleet(args.speed, Path(tempfile.mkdtemp(prefix="sluiceway-routing-")))
    report: dict[str, Any] = {"speed": args.speed, "levels": levels, "pools": {}}
    try:
        for title, (llama_profile, vllm_profile) in pools.items():
            llama_url = fleet.emulator(llama_profile)
            vllm_url = fleet.emulator(vllm_profile)
            expect = {c: max(get_profile(llama_profile).aggregate_tok_s(c),
                             get_profile(vllm_profile).aggregate_tok_s(c)) for c in levels}
            slow = {c: get_profile(llama_profile).aggregate_tok_s(c) for c in levels}
            print(f"{title}:", file=sys.stderr)
            backends = [(llama_profile, "llamacpp", llama_url),
                        (vllm_profile, "vllm", vllm_url)]
            if args.cold:
                results = {name: cold_sweep(name, levels, args.per_c, args.speed,
                                            lambda u=url: (None, u))
                           for name, url in ((llama_profile, llama_url),
                                             (vllm_profile, vllm_url))}
                for policy in args.policies.split(","):
                    results[policy] = cold_sweep(
                        policy, levels, args.per_c, args.speed,
                        lambda p=policy, b=backends: fleet.proxy(b, p))
                print_pool(title, results, [llama_profile, vllm_profile], levels, cold=True)
                report["pools"][title] = results
                continue
            results = {
                llama_profile: sweep(llama_url, levels, slow, args.speed, llama_profile),
                vllm_profile: sweep(vllm_url, levels, expect, args.speed, vllm_profile),
            }
            for policy in args.policies.split(","):
                proc, url = fleet.proxy(backends, policy)
                try:
                    results[policy] = sweep(url, levels, expect, args.speed, policy)
                finally:
                    fleet.stop(proc)
            print_pool(title, results, [llama_profile, vllm_profile], levels)
            report["pools"][title] = results
        if not args.skip_agent:
            agent: dict[str, Any] = {}

            def emulated(*profiles: tuple[str, str]) -> Any:
                return lambda: [(name, get_profile(profile).engine, fleet.emulator(profile))
                                for name, profile in profiles]

            agent_pools: list[tuple[str, Any, float, dict[str, int]]] = [
                (f"{title} ({'ab'[i]})", start, args.speed, shape)
                for title, start in (
                    ("llamacpp + vllm-fp8-aiter", emulated(
                        ("llamacpp-q4km", "llamacpp-q4km"),
                        ("vllm-fp8-aiter", "vllm-fp8-aiter"))),
                    ("2 x llamacpp", emulated(("llamacpp-a", "llamacpp-q4km"),
                                              ("llamacpp-b", "llamacpp-q4km"))))
                for i, shape in enumerate(AGENTS)
            ]
            if args.real_llama_only:
                agent_pools = []
            if args.real_llama or args.real_llama_only:
                real = prepare()
                for i, shape in enumerate(REAL_AGENTS):
                    if "abc"[i] not in args.real_shapes:
                        continue
                    agent_pools.append((f"2 x real llama-server ({'abc'[i]})", lambda: [
                        (name, "llamacpp", fleet.llama_server(real, slots=2))
                        for name in ("llama-a", "llama-b")], 1.0, shape))
            for title, start, speed, shape in agent_pools:
                for policy, affinity, label in (("adaptive", True, "adaptive, affinity on"),
                                                ("adaptive", False, "adaptive, affinity off"),
                                                ("round_robin", False, "round_robin")):
                    agent[f"{title}: {label}"] = agent_run(fleet, start(), policy,
                                                           affinity, speed, shape)
                    agent[f"{title}: {label}"]["workload"] = shape
            print("\n## agent workload (conversations x turns, each turn adds turn_tokens "
                  "of context and a reply; shared prefix)\n")
            for name, m in agent.items():
                turns = " ".join(f"{v:.2f}" for v in m["per_turn"].values())
                print(f"{name:<50} later turns {m['later_mean']:.3f} s  failed {m['failed']}"
                      f"  per turn: {turns}   {m['workload']}")
            report["agent"] = agent
    finally:
        fleet.stop_all()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
