"""Proxy overhead: the same streaming load sent directly to a fast upstream, through
`sluiceway serve`, and through nginx as a reference, measured side by side in one run.

    python benchmarks/overhead.py [--requests 2000] [--concurrency 1,64] [--tokens 64]
                                  [--token-delay-ms 0] [--rounds 3] [--no-nginx]
                                  [--install-nginx] [--floor]

nginx runs as a plain reverse proxy (one worker, `proxy_buffering off`, upstream
keep-alive); `--install-nginx` installs Debian's package first when it is missing.

Reports per target: requests/s and SSE events/s (and their ratio to direct), TTFT p50/p99
and the TTFT added over direct, errors, the proxy's CPU time per request (read from /proc,
nginx's worker included), and sluiceway's peak RSS. The client is aiohttp on uvloop in
this process. Two columns say what bounds a row: the client's CPU share (near 100%: the
client is the limit) and the whole machine's busy share (near 100%: the cores are, and the
ratio to direct is then the proxy's CPU per request against the client's and upstream's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadgen.local import free_port, wait_http  # noqa: E402
from tests import nginx  # noqa: E402


@dataclass
class Result:
    target: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    client_cpu_s: float
    events: int
    ttfts: list[float]
    proxy_cpu_s: float  # the proxy's processes over the measured run (0 for direct)
    box_busy: float  # share of all cores busy over the measured run

    def pct(self, p: float) -> float:
        if not self.ttfts:
            return float("nan")
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def load(
    url: str, requests: int, concurrency: int, tokens: int
) -> tuple[int, int, list[float]]:
    body = (b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":true,'
            b'"max_tokens":%d}' % tokens)
    headers = {"content-type": "application/json"}
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    events = errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            nonlocal events, errors
            async with gate:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        if resp.status != 200:
                            errors += 1
                            await resp.read()
                            return
                        first = True
                        while chunk := await resp.content.readany():
                            if first:
                                ttfts.append(time.perf_counter() - t0)
                                first = False
                            events += chunk.count(b"data:")
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        await asyncio.gather(*(one() for _ in range(requests)))
    return events, errors, ttfts


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of its live children (nginx's worker)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    total = 0
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def box_times() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def run(target: str, base: str, pid: int | None, requests: int, concurrency: int,
        tokens: int) -> Result:
    url = base + "/v1/chat/completions"
    asyncio.run(load(url, min(requests, max(50, concurrency * 2)), concurrency, tokens))
    proxy_cpu = process_cpu_s(pid) if pid else 0.0
    busy, total = box_times()
    wall, cpu = time.perf_counter(), time.process_time()
    events, errors, ttfts = asyncio.run(load(url, requests, concurrency, tokens))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    busy_after, total_after = box_times()
    proxy_cpu = process_cpu_s(pid) - proxy_cpu if pid else 0.0
    return Result(target, concurrency, requests, errors, wall, cpu, events, ttfts, proxy_cpu,
                  (busy_after - busy) / max(1, total_after - total))


NGINX_HTTP = """    upstream fast {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}"""


def start_nginx(work: Path, upstream: int, install: bool) -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("nginx") is None and install:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True)
    binary = nginx.binary()
    if not Path(binary).exists():
        raise FileNotFoundError("nginx is not installed (use --install-nginx or --no-nginx)")
    port = free_port()
    conf = nginx.config(work, NGINX_HTTP.format(upstream=upstream, port=port),
                        connections=16384)
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(work)])
    return proc, port


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure each target this many times, interleaved, and report "
                             "the totals (a burst of noise on a shared machine then hits "
                             "every target alike)")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--install-nginx", action="store_true",
                        help="apt-get install nginx-light if it is missing")
    parser.add_argument("--floor", action="store_true",
                        help="also measure benchmarks/relay_floor.py, a bare Python byte "
                             "relay: the floor for any Python proxy here")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    up_port, proxy_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="sluiceway-overhead-"))
    config = work / "proxy.toml"
    config.write_text(
        "[server]\naccess_log = false\n[routing]\npolicy = \"spillover\"\n"
        f"[[backends]]\nname = \"fast\"\nurl = \"http://127.0.0.1:{up_port}\"\n"
        "models = [\"bench\"]\n"
    )
    upstream = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fast_upstream", "--port", str(up_port),
         "--tokens", str(args.tokens), "--token-delay-ms", str(args.token_delay_ms)], cwd=ROOT)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port",
         str(proxy_port), "--log-level", "warning"], cwd=ROOT)
    results: list[Result] = []
    nginx = floor = None
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health")
        wait_http(f"http://127.0.0.1:{proxy_port}/ready")
        targets: dict[str, tuple[str, int | None]] = {
            "direct": (f"http://127.0.0.1:{up_port}", None),
            "sluiceway": (f"http://127.0.0.1:{proxy_port}", proxy.pid),
        }
        if not args.no_nginx:
            nginx, nginx_port = start_nginx(work, up_port, args.install_nginx)
            wait_http(f"http://127.0.0.1:{nginx_port}/health")
            targets["nginx"] = (f"http://127.0.0.1:{nginx_port}", nginx.pid)
        if args.floor:
            floor_port = free_port()
            floor = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.relay_floor", "--port", str(floor_port),
                 "--upstream-port", str(up_port)], cwd=ROOT)
            wait_http(f"http://127.0.0.1:{floor_port}/health", floor)
            targets["py-floor"] = (f"http://127.0.0.1:{floor_port}", floor.pid)
        order = list(targets.items())
        for c in (int(x) for x in args.concurrency.split(",")):
            rounds: dict[str, list[Result]] = {name: [] for name in targets}
            for i in range(args.rounds):  # interleaved, each round in a rotated order
                for name, (base, pid) in order[i % len(order):] + order[:i % len(order)]:
                    rounds[name].append(run(name, base, pid, args.requests, c, args.tokens))
            results += [merge(rs) for rs in rounds.values()]
        rss = peak_rss_mb(proxy.pid)
    finally:
        for proc in (p for p in (nginx, floor, proxy, upstream) if p is not None):
            proc.terminate()
            proc.wait(10)
    print(f"\n{args.requests} streams of {args.tokens} tokens x {args.rounds} rounds, "
          f"{args.token_delay_ms:g} ms/token upstream delay")
    header = (f"{'target':<10} {'conc':>5} {'req/s':>9} {'ratio':>6} {'events/s':>10} "
              f"{'ratio':>6} {'ttft p50':>9} {'p99':>8} {'added p50':>10} {'errors':>6} "
              f"{'client cpu':>10} {'box busy':>8} {'proxy cpu/req':>13}")
    print(header)
    print("-" * len(header))
    direct = {r.concurrency: r for r in results if r.target == "direct"}
    for r in results:
        d = direct[r.concurrency]
        rps, d_rps = r.requests / r.wall_s, d.requests / d.wall_s
        eps, d_eps = r.events / r.wall_s, d.events / d.wall_s
        print(f"{r.target:<10} {r.concurrency:>5} {rps:>9,.0f} {rps / d_rps:>6.2f} "
              f"{eps:>10,.0f} {eps / d_eps:>6.2f} {r.pct(50) * 1e3:>7.2f}ms "
              f"{r.pct(99) * 1e3:>6.2f}ms {(r.pct(50) - d.pct(50)) * 1e3:>8.2f}ms "
              f"{r.errors:>6} {r.client_cpu_s / r.wall_s:>9.0%} {r.box_busy:>8.0%} "
              f"{_per_request_us(r):>13}")
    print(f"sluiceway peak RSS: {rss:.0f} MB")


def merge(rounds: list[Result]) -> Result:
    """One row from several rounds: rates from the summed counts and times, percentiles
    over all the requests."""
    first = rounds[0]
    return Result(
        first.target, first.concurrency, sum(r.requests for r in rounds),
        sum(r.errors for r in rounds), sum(r.wall_s for r in rounds),
        sum(r.client_cpu_s for r in rounds), sum(r.events for r in rounds),
        [t for r in rounds for t in r.ttfts], sum(r.proxy_cpu_s for r in rounds),
        sum(r.box_busy * r.wall_s for r in rounds) / sum(r.wall_s for r in rounds),
    )


def _per_request_us(r: Result) -> str:
    if r.target == "direct":
        return "-"
    return f"{r.proxy_cpu_s / r.requests * 1e6:,.0f} us"


if __name__ == "__main__":
    main()
