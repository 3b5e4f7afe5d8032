"""One stream, direct and through the proxy, in alternating blocks on the same engines.

At one client every proxied run on the H200 read 0.90-0.97x of llama-server direct, its
TTFT 41-42 ms against 28-41 ms direct in separate runs minutes apart. Separate runs cannot
tell a proxy cost from the engine's own drift between runs, so this target alternates short
blocks (direct, proxied, direct, ...) on one llama-server, one proxy, and also reads the
proxy's own TTFT (`sluiceway_ttft_seconds`: from sending upstream to the first content) for
each proxied block: the client's TTFT minus the proxy's is what the proxy adds on the way
in and out; the proxy's TTFT against the direct blocks' is what the engine does
differently with a proxied request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadgen.local import metric_sums


def proxy_ttft(proxy: str) -> tuple[float, float]:
    """(sum, count) of the proxy's TTFT histogram over every backend."""
    sums = metric_sums(proxy)
    return sums.get("sluiceway_ttft_seconds_sum", 0.0), sums.get("sluiceway_ttft_seconds_count",
                                                                 0.0)


def one_block(url: str, model: str, duration_s: float, out: Path) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "proxy.cli", "bench", "--url", f"x={url}",
                    "--model", model, "--concurrency", "1", "--duration-s", str(duration_s),
                    "--input-len", "512", "--output-len", "128", "--warmup", "1",
                    "--timeout-s", "120", "--no-ignore-eos", "--no-progress", "--json",
                    str(out)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(out.read_text())["results"][0]
    return result


def alternate(direct: str, proxy: str, model: str, rounds: int, duration_s: float,
              work: Path, log: Any) -> list[dict[str, Any]]:
    """`rounds` pairs of blocks; one row per block."""
    rows: list[dict[str, Any]] = []
    for k in range(rounds):
        for via, url in (("direct", direct), ("proxied", proxy)):
            before = proxy_ttft(proxy)
            r = one_block(url, model, duration_s, work / f"alt-{k}-{via}.json")
            after = proxy_ttft(proxy)
            n = after[1] - before[1]
            row = {"round": k, "via": via, "output_throughput": r["output_throughput"],
                   "mean_ttft_ms": r["mean_ttft_ms"], "median_ttft_ms": r["median_ttft_ms"],
                   "mean_tpot_ms": r["mean_tpot_ms"], "completed": r["completed"],
                   "failed": r["failed"], "backends": r.get("backends"),
                   # the warm-up request is counted by the proxy too: n - completed >= 0
                   "proxy_ttft_ms": (after[0] - before[0]) / n * 1000 if n else None}
            rows.append(row)
            own = row["proxy_ttft_ms"]
            log(f"  c=1 {via} #{k}: {row['output_throughput']:.0f} tok/s, ttft "
                f"{row['mean_ttft_ms']:.1f} ms (the proxy's own: "
                f"{'-' if own is None or via == 'direct' else f'{own:.1f}'}), "
                f"tpot {row['mean_tpot_ms']:.2f} ms")
    return rows
