"""`sluiceway demo`: what sluiceway is for, on nothing but this package.

Starts an emulated llama.cpp (`llamacpp-q4km`) and an emulated vLLM (`vllm-fp8-aiter`)
(`--profile-set h200`: the real llama-server and transformers serve measured on an H200),
`sluiceway serve` in front of both, sweeps each backend alone and the proxy, and prints one
side-by-side table; JSON, PNG and HTML go under `--out`. The proxy is measured as a user
meets it: freshly started, every request counted from its first (no learning pass), whole
runs as `vllm bench serve` reports them. The emulators run at `--speed`; every figure is
converted back to the profile's time (tok/s divided by the speed, TTFT multiplied by it),
so the numbers read as on the measured hardware. Under the table it says how the pool
compares with its best member at each level, and how close each emulator came to its
profile (a machine too busy for the speed asked shows there). Every process it starts is
stopped at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulator.profile import get_profile
from loadgen import report
from loadgen.local import free_port, proxy_head, wait_http
from loadgen.runner import Target, closed_loop
from loadgen.workload import Workload

MODEL = "qwen3.6-35b-a3b"


@dataclass(frozen=True)
class ProfileSet:
    """The two engines a demo emulates: a llama.cpp profile and a batching one."""

    llama: str
    batching: str
    hardware: str


PROFILE_SETS = {
    "mi300x": ProfileSet("llamacpp-q4km", "vllm-fp8-aiter", "MI300X"),
    "h200": ProfileSet("h200-llamacpp-q4km", "h200-transformers-cb", "H200"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="concurrency 1, 8, 32 only: done within a minute on 2 cores")
    parser.add_argument("--out", type=Path, default=Path("sluiceway-demo"), metavar="DIR",
                        help="where the report goes (default ./sluiceway-demo)")
    parser.add_argument("--speed", type=float,
                        help="emulator speed-up (default 8 with --quick, else 4: the full "
                             "sweep's 128 streams at 8x saturate two cores)")
    parser.add_argument("--policy", default="adaptive", help="the proxy's routing policy")
    parser.add_argument("--profile-set", choices=sorted(PROFILE_SETS), default="mi300x",
                        help="mi300x: llama.cpp and vLLM as measured on an AMD MI300X (the "
                             "seed's post); h200: llama-server and transformers serve as "
                             "measured on an NVIDIA H200 (benchmarks/gpu)")


class Processes:
    """Child processes that are always stopped, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _config(llama: int, vllm: int, policy: str, names: ProfileSet) -> str:
    return proxy_head(policy) + f"""[[backends]]
name = "{names.batching}"
kind = "vllm"
url = "http://127.0.0.1:{vllm}"
models = ["{MODEL}"]
max_concurrency = 1024   # vLLM's default max-num-seqs on a 192 GB card
apis = ["chat", "completions"]   # the emulators: Messages requests are translated
[[backends]]
name = "{names.llama}"
kind = "llamacpp"
url = "http://127.0.0.1:{llama}"
models = ["{MODEL}"]
apis = ["chat", "completions"]
"""


def sweep(targets: list[Target], levels: list[int], requests_per_c: int,
          show_progress: bool) -> list[dict[str, Any]]:
    workload = Workload("chat", MODEL, input_len=512, output_len=128)
    results = []
    for target in targets:
        for c in levels:
            level = asyncio.run(closed_loop(
                target, workload, c, requests=max(16, requests_per_c * c), duration_s=None,
                warmup=1, timeout_s=600, show_progress=show_progress))
            results.append(report.result_json(level, [99]))
    return results


def run(args: argparse.Namespace) -> int:
    speed = args.speed or (8.0 if args.quick else 4.0)
    levels = [1, 8, 32] if args.quick else [1, 8, 32, 64, 128]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    procs = Processes(out)
    started = time.monotonic()
    try:
        llama_port, vllm_port, proxy_port = free_port(), free_port(), free_port()
        names = PROFILE_SETS[args.profile_set]
        llama = procs.start("llamacpp", "emulate", "--engine", "llamacpp", "--profile",
                            names.llama, "--port", str(llama_port), "--speed", str(speed))
        vllm = procs.start("vllm", "emulate", "--engine", "vllm", "--profile",
                           names.batching, "--port", str(vllm_port), "--speed", str(speed))
        config = out / "sluiceway.toml"
        config.write_text(_config(llama_port, vllm_port, args.policy, names))
        wait_http(f"http://127.0.0.1:{llama_port}/health", llama)
        wait_http(f"http://127.0.0.1:{vllm_port}/health", vllm)
        proxy = procs.start("sluiceway", "serve", "--config", str(config), "--port",
                            str(proxy_port), "--log-level", "warning")
        wait_http(f"http://127.0.0.1:{proxy_port}/ready", proxy)
        pool = Target(f"sluiceway ({args.policy})", f"http://127.0.0.1:{proxy_port}", MODEL)
        targets = [Target(names.llama, f"http://127.0.0.1:{llama_port}", MODEL),
                   Target(names.batching, f"http://127.0.0.1:{vllm_port}", MODEL), pool]
        print(f"sluiceway demo: emulated {names.llama} and {names.batching} "
              f"({names.hardware} profiles) at --speed {speed:g}, "
              f"512 in / 128 out, closed loop at {', '.join(map(str, levels))}",
              file=sys.stderr)
        results = sweep(targets, levels, 3, show_progress=True)
    except KeyboardInterrupt:
        print("\nsluiceway demo: interrupted; stopping everything it started",
              file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    hardware = PROFILE_SETS[args.profile_set].hardware
    title = (f"sluiceway demo: llama.cpp vs batching vs sluiceway (emulated {hardware} "
             f"profiles, "
             f"figures in profile time; run at --speed {speed:g})")
    table = report.side_by_side(results, scale=speed)
    print(f"\n{title}\n\n{table}\n")
    print(report.console([r for r in results if r["label"].startswith("sluiceway")],
                         scale=speed))
    checks = verdict(results, speed)
    print("\n" + "\n".join(checks))
    report.write_json(out / "demo.json", results, {"sluiceway_demo": 1, "speed_scale": speed})
    png = report.plot_png(results, scale=speed) if report.can_plot() else b""
    if png:
        (out / "demo.png").write_bytes(png)
    else:
        print(f"\nno demo.png: {report.PLOT_MISSING}")
    report.write_html(out / "demo.html", title, png,
                      [table, report.console(results, scale=speed), "\n".join(checks)])
    print(f"\nwrote {out}/demo.json, {'demo.png, ' if png else ''}demo.html "
          f"in {time.monotonic() - started:.0f} s")
    return 0


def verdict(results: list[dict[str, Any]], speed: float) -> list[str]:
    """The pool against its best member per level, and each emulator against its profile."""
    by_label: dict[str, dict[int, float]] = {}
    for r in results:
        by_label.setdefault(r["label"], {})[r["max_concurrency"]] = (
            r["output_throughput"] / speed)
    pool = next(v for k, v in by_label.items() if k.startswith("sluiceway"))
    singles = {k: v for k, v in by_label.items() if not k.startswith("sluiceway")}
    ratios = []
    for c, tok_s in pool.items():
        name, best = max(((k, v[c]) for k, v in singles.items()), key=lambda kv: kv[1])
        ratios.append(f"c={c} {tok_s / best:.2f}x ({name})")
    lines = ["pool vs its best member: " + ", ".join(ratios)]
    for name, per_level in singles.items():
        profile = get_profile(name)
        shares = [tok_s / profile.aggregate_tok_s(c) for c, tok_s in per_level.items()]
        note = "" if all(abs(x - 1) <= 0.05 for x in shares) else (
            "  (off by more than 5%: a machine too busy for --speed "
            f"{speed:g}? try a lower one)")
        lines.append(f"{name} vs its profile: "
                     + ", ".join(f"{x:.0%}" for x in shares) + note)
    return lines
