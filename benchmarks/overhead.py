"""Proxy overhead: the same streaming load sent directly to a fast upstream, through
`sluiceway serve`, and through nginx as a reference, measured side by side in one run.

    python benchmarks/overhead.py [--requests 2000] [--concurrency 1,64] [--tokens 64]
                                  [--token-delay-ms 0] [--no-nginx] [--install-nginx]
                                  [--floor]

nginx runs as a plain reverse proxy (one worker, `proxy_buffering off`, upstream
keep-alive); `--install-nginx` installs Debian's package first when it is missing.

Reports per target: requests/s and SSE events/s (and their ratio to direct), TTFT p50/p99
and the TTFT added over direct, errors, and the proxy's peak RSS. The client is aiohttp on
uvloop in this process; its CPU share is printed so a client-bound run can be recognised.
"""

from __future__ import annotations

import argparse
import asyncio
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


def run(target: str, base: str, requests: int, concurrency: int, tokens: int) -> Result:
    url = base + "/v1/chat/completions"
    asyncio.run(load(url, min(requests, max(50, concurrency * 2)), concurrency, tokens))
    wall, cpu = time.perf_counter(), time.process_time()
    events, errors, ttfts = asyncio.run(load(url, requests, concurrency, tokens))
    return Result(target, concurrency, requests, errors, time.perf_counter() - wall,
                  time.process_time() - cpu, events, ttfts)


NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    upstream fast {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def start_nginx(work: Path, upstream: int, install: bool) -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("nginx") is None and install:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise FileNotFoundError("nginx is not installed (use --install-nginx or --no-nginx)")
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=work, upstream=upstream, port=port))
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
        targets = {"direct": f"http://127.0.0.1:{up_port}",
                   "sluiceway": f"http://127.0.0.1:{proxy_port}"}
        if not args.no_nginx:
            nginx, nginx_port = start_nginx(work, up_port, args.install_nginx)
            wait_http(f"http://127.0.0.1:{nginx_port}/health")
            targets["nginx"] = f"http://127.0.0.1:{nginx_port}"
        if args.floor:
            floor_port = free_port()
            floor = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.relay_floor", "--port", str(floor_port),
                 "--upstream-port", str(up_port)], cwd=ROOT)
            wait_http(f"http://127.0.0.1:{floor_port}/health", floor)
            targets["py-floor"] = f"http://127.0.0.1:{floor_port}"
        for c in (int(x) for x in args.concurrency.split(",")):
            for name, base in targets.items():
                results.append(run(name, base, args.requests, c, args.tokens))
        rss = peak_rss_mb(proxy.pid)
    finally:
        for proc in (p for p in (nginx, floor, proxy, upstream) if p is not None):
            proc.terminate()
            proc.wait(10)
    print(f"\n{args.requests} streams of {args.tokens} tokens, "
          f"{args.token_delay_ms:g} ms/token upstream delay")
    header = (f"{'target':<10} {'conc':>5} {'req/s':>9} {'ratio':>6} {'events/s':>10} "
              f"{'ratio':>6} {'ttft p50':>9} {'p99':>8} {'added p50':>10} {'errors':>6} "
              f"{'client cpu':>10}")
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
              f"{r.errors:>6} {r.client_cpu_s / r.wall_s:>9.0%}")
    print(f"sluiceway peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
