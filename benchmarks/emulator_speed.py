"""How fast one emulator process can run: the largest profile (vllm-fp8-aiter, 128
concurrent, 512 in / 128 out) at increasing --speed, with the emulator's CPU use.

    python benchmarks/emulator_speed.py [--speeds 1,2,4,6,8] [--concurrency 128]

For each speed: the measured aggregate tok/s divided by the speed (in profile units), its
ratio to the profile, the events/s the emulator actually sent, and its CPU share of one
core. The emulator keeps up while the ratio stays near 1.00.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from emulator.profile import get_profile  # noqa: E402
from loadgen.local import free_port, wait_http  # noqa: E402
from tests.closed_loop import measure  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="vllm-fp8-aiter")
    parser.add_argument("--speeds", default="1,2,4,6,8")
    parser.add_argument("--concurrency", type=int, default=128)
    args = parser.parse_args()
    profile = get_profile(args.profile)
    expected = profile.aggregate_tok_s(args.concurrency)
    print(f"{args.profile} at {args.concurrency} concurrent: profile {expected:.0f} tok/s")
    print(f"{'speed':>6} {'tok/s (profile units)':>22} {'ratio':>6} {'events/s':>9} "
          f"{'emulator CPU':>13}")
    for speed in (float(s) for s in args.speeds.split(",")):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "emulate", "--engine", profile.engine,
             "--profile", args.profile, "--port", str(port), "--speed", str(speed),
             "--model", "m"], cwd=ROOT)
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models")
            cycle = args.concurrency * profile.output_tokens / expected / speed
            warmup, window = max(1.0, 2 * cycle), max(3.0, 3 * cycle)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            rate = measure(f"http://127.0.0.1:{port}", "m", args.concurrency, warmup, window)
            cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            proc.terminate()
            proc.wait(10)
        print(f"{speed:>6g} {rate / speed:>22,.0f} {rate / speed / expected:>6.2f} "
              f"{rate:>9,.0f} {cpu:>12.0%}")


if __name__ == "__main__":
    main()
