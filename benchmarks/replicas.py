"""Two replicas on Redis against one: routing quality and what Redis costs per request.

    .venv/bin/python benchmarks/replicas.py [--speed 1] [--levels 8,32,128] [--per-c 3]
                                            [--cpu-requests 3000] [--json PATH]

Routing quality: the emulated MI300X pool (llama.cpp Q4_K_M + vLLM FP8 with AITER) behind
one sluiceway (no Redis) and behind two replicas sharing a real redis-server, each behind
nginx as the load balancer (round robin per request, so the client load is split evenly:
one closed loop of `sluiceway bench`'s client against it). Every level starts from fresh proxies
(and a fresh Redis key prefix, so nothing learned carries over), counts every request
(max(16, PER_C x concurrency) in all, one uncounted warm-up per proxy), and measures output
tok/s over the whole run, as `vllm bench serve` does; the ratio is two replicas' over one.
Each backend's own peak concurrency is read from the emulators after each run and checked
against its capacity.

CPU per request: one replica with and without Redis in front of a fast streaming upstream
(`benchmarks/fast_upstream.py`), the same closed-loop load, sluiceway's own CPU time
(user + system from /proc) per request; three alternating rounds, medians reported. The
difference is what the leases, the session lookup and the shared learning cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import load, process_cpu_s  # noqa: E402
from benchmarks.routing import WORKLOAD, Fleet, whole_run  # noqa: E402
from loadgen.local import free_port, proxy_head, wait_http  # noqa: E402
from loadgen.runner import Target, closed_loop  # noqa: E402
from tests import nginx  # noqa: E402
from tests.processes import Server  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

LLAMA, VLLM = "llamacpp-q4km", "vllm-fp8-aiter"
VLLM_CAPACITY = 256  # the emulated vLLM's max_num_seqs


def config(backends: list[tuple[str, str, str]], redis_url: str = "", prefix: str = "",
           replica: str = "", model: str = "m") -> str:
    text = proxy_head("adaptive")
    if redis_url:
        text += (f'[cluster]\nredis_url = "{redis_url}"\nprefix = "{prefix}"\n'
                 f'replica_id = "{replica}"\n')
    for name, kind, url in backends:
        cap = f"\nmax_concurrency = {VLLM_CAPACITY}" if kind == "vllm" else ""
        text += (f'[[backends]]\nname = "{name}"\nkind = "{kind}"\nurl = "{url}"\n'
                 f'models = ["{model}"]{cap}\n')
    return text


class Proxies:
    """sluiceway processes of this benchmark, always stopped."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, text: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        path = self.workdir / f"proxy-{port}.toml"
        path.write_text(text)
        log = (self.workdir / f"proxy-{port}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config",
                                 str(path), "--port", str(port), "--log-level", "warning"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/ready", proc, timeout_s=60)
        return proc, url

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)
        self.procs = []


NGINX = """    upstream sluiceway {{
{servers}        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sluiceway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 900s;
        }}
    }}"""


def balancer(work: Path, urls: list[str], servers: list[Server]) -> str:
    """nginx in front of the replicas, round robin per request (as a plain L7 load
    balancer does), with keep-alive to them; returns its URL."""
    port = free_port()
    lines = "".join(f"        server {u.removeprefix('http://')};\n" for u in urls)
    where = work / f"nginx-{port}"
    where.mkdir()
    conf = nginx.config(where, NGINX.format(servers=lines, port=port), connections=4096)
    server = Server(["-c", str(conf), "-p", str(where)], port, where / "nginx.log",
                    program=nginx.binary())
    servers.append(server)
    wait_http(server.url + "/ready", server.proc)
    return server.url


def peaks(urls: dict[str, str]) -> dict[str, int]:
    """Each emulator's own peak of requests held at once since the last call (which
    resets it)."""
    return {name: int(httpx.post(url + "/_emulator/load", timeout=5).json()["peak"])
            for name, url in urls.items()}


def quality(args: argparse.Namespace, redis: RedisServer, work: Path) -> dict[str, Any]:
    fleet, proxies = Fleet(args.speed, work), Proxies(work)
    lbs: list[Server] = []
    try:
        llama, vllm = fleet.emulator(LLAMA), fleet.emulator(VLLM)
        backends = [("llama", "llamacpp", llama), ("vllm", "vllm", vllm)]
        slots = int(httpx.get(llama + "/props", timeout=5).json()["total_slots"])
        capacity = {"llama": slots, "vllm": VLLM_CAPACITY}
        rows: dict[str, Any] = {}
        for c in args.levels:
            requests = max(16, args.per_c * c)
            row = {}
            for label, n in (("one", 1), ("two", 2)):
                prefix = f"bench-{uuid.uuid4().hex[:8]}"
                urls = [proxies.start(config(backends, redis.url if n > 1 else "", prefix,
                                             f"r{i}"))[1] for i in range(n)]
                front = balancer(work, urls, lbs)
                peaks({"llama": llama, "vllm": vllm})  # reset (calibration counted none)
                level = asyncio.run(closed_loop(
                    Target(label, front), WORKLOAD, c, requests=requests, duration_s=None,
                    warmup=n, timeout_s=900, show_progress=False))
                row[label] = whole_run(level, args.speed, first_s=10.0)
                row[label]["peak"] = peak = peaks({"llama": llama, "vllm": vllm})
                proxies.stop_all()
                for server in lbs:
                    server.stop()
                lbs.clear()
                print(f"  c={c:<4} {label} replica(s): {row[label]['tok_s']:8.1f} tok/s, "
                      f"{row[label]['failed']} failed, llama share "
                      f"{row[label]['llama_share']:.2f}, peak {peak}", flush=True)
                over = {k: v for k, v in peak.items() if v > capacity[k]}
                if over:
                    raise RuntimeError(f"capacity exceeded: peak {over}, capacity {capacity}")
            row["ratio"] = row["two"]["tok_s"] / row["one"]["tok_s"]
            rows[str(c)] = row
        return rows
    finally:
        proxies.stop_all()
        for server in lbs:
            server.stop()
        fleet.stop_all()


def cpu(args: argparse.Namespace, redis: RedisServer, work: Path) -> dict[str, Any]:
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fast_upstream", "--port", str(upstream_port),
         "--tokens", "16"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxies = Proxies(work)
    rounds: dict[str, list[float]] = {"without": [], "with": []}
    try:
        url = f"http://127.0.0.1:{upstream_port}"
        wait_http(url + "/v1/models", upstream)
        backends = [("fast", "vllm", url)]
        for _ in range(3):
            for label in ("without", "with"):
                redis_url = redis.url if label == "with" else ""
                proc, base = proxies.start(config(backends, redis_url,
                                                  f"cpu-{uuid.uuid4().hex[:8]}", "r0",
                                                  model="bench"))
                target = base + "/v1/chat/completions"
                asyncio.run(load(target, 300, 32, 16))  # warm: connections, scripts
                before = process_cpu_s(proc.pid)
                _events, errors, _ = asyncio.run(load(target, args.cpu_requests, 32, 16))
                spent = process_cpu_s(proc.pid) - before
                if errors:
                    raise RuntimeError(f"{errors} requests failed ({label} Redis)")
                rounds[label].append(spent / args.cpu_requests * 1000)
                proxies.stop_all()
        without, with_ = statistics.median(rounds["without"]), statistics.median(rounds["with"])
        print(f"  sluiceway CPU per request: {without:.3f} ms without Redis, {with_:.3f} ms "
              f"with (+{with_ - without:.3f} ms); rounds {rounds}", flush=True)
        return {"without_ms": without, "with_ms": with_, "added_ms": with_ - without,
                "rounds": rounds}
    finally:
        proxies.stop_all()
        upstream.terminate()
        upstream.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--levels", default="8,32,128")
    parser.add_argument("--per-c", type=int, default=3)
    parser.add_argument("--cpu-requests", type=int, default=3000)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="sluiceway-replicas-") as tmp:
        work = Path(tmp)
        redis = RedisServer(work / "redis").start()
        try:
            print("CPU per request, one replica with and without Redis:", flush=True)
            results: dict[str, Any] = {"cpu": cpu(args, redis, work)}
            if not args.skip_quality:
                print("Routing quality, whole runs from fresh proxies:", flush=True)
                results["quality"] = quality(args, redis, work)
        finally:
            redis.stop()
    if "quality" in results:
        print("\n| concurrency | one replica tok/s | two replicas tok/s | ratio | failed |")
        print("|---|---|---|---|---|")
        for c, row in results["quality"].items():
            print(f"| {c} | {row['one']['tok_s']:,.0f} | {row['two']['tok_s']:,.0f} | "
                  f"{row['ratio']:.2f}x | {row['one']['failed']} / {row['two']['failed']} |")
    if args.json:
        args.json.write_text(json.dumps({"speed": args.speed, **results}, indent=2))


if __name__ == "__main__":
    main()
