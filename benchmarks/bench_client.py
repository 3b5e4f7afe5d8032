"""The load tester's own ceiling: how many streamed chunks per second one `sluiceway bench`
process takes in, and what `--workers` adds, against a fast upstream (64-token streams, no
delay, each chunk one SSE event).

    python benchmarks/bench_client.py [--concurrency 64] [--requests 3000]

When the upstream is fast enough that the client saturates a core, the chunk rate is the
client's ceiling; a sweep that needs more than that should use `--workers`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadgen.cli import add_arguments, run_bench  # noqa: E402
from loadgen.local import free_port, wait_http  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--upstreams", type=int, default=1,
                        help="upstream processes (round-robin over ports by worker)")
    args = parser.parse_args()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "benchmarks.fast_upstream", "--port",
                                 str(port), "--tokens", "64"], cwd=ROOT)
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        for workers in (1, 2):
            bench = argparse.ArgumentParser()
            add_arguments(bench)
            bench_args = bench.parse_args([
                "--url", f"http://127.0.0.1:{port}", "--model", "bench", "--concurrency",
                str(args.concurrency), "--requests", str(args.requests), "--output-len", "64",
                "--input-len", "16", "--workers", str(workers), "--no-progress"])
            cpu = time.process_time()
            result = run_bench(bench_args)[0]
            cpu = time.process_time() - cpu  # this process only: meaningful for 1 worker
            us_per_chunk = cpu / result["total_output_tokens"] * 1e6 if workers == 1 else 0
            rows.append((workers, result["output_throughput"], result["request_throughput"],
                         result["failed"], us_per_chunk))
    finally:
        upstream.terminate()
        upstream.wait(10)
    print(f"{args.requests} streams of 64 chunks at concurrency {args.concurrency}")
    print(f"{'workers':>7} {'chunks/s':>10} {'requests/s':>11} {'failed':>7} "
          f"{'client CPU us/chunk':>20}")
    for workers, chunks, reqs, failed, cost in rows:
        shown = f"{cost:.1f}" if cost else "-"
        print(f"{workers:>7} {chunks:>10,.0f} {reqs:>11,.0f} {failed:>7} {shown:>20}")


if __name__ == "__main__":
    main()
