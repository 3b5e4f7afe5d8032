"""Which upstream HTTP client for the hot path? Measured, side by side: aiohttp, httpx, and
sluiceway's own (proxy/h1.py: asyncio protocol + httptools, what the proxy uses).

Starts `benchmarks.fast_upstream` (64-chunk streams, no delay) in its own process, then in
this process streams the same requests with each client at the same concurrency and
reports SSE events per second of wall time and per second of this process's CPU time (the
cost the proxy would pay), plus the ratio between the two clients.

    python benchmarks/upstream_client.py [--requests 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadgen.local import free_port, wait_http  # noqa: E402
from proxy.h1 import H1Client, parse_url  # noqa: E402

BODY = b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":64,' \
       b'"stream":true}'
HEADERS = {"content-type": "application/json"}


async def run_aiohttp(url: str, requests: int, concurrency: int) -> int:
    chunks = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            nonlocal chunks
            async with gate, session.post(url, data=BODY, headers=HEADERS) as resp:
                while chunk := await resp.content.readany():
                    chunks += chunk.count(b"data:")

        await asyncio.gather(*(one() for _ in range(requests)))
    return chunks


async def run_httpx(url: str, requests: int, concurrency: int) -> int:
    chunks = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            nonlocal chunks
            async with gate, client.stream("POST", url, content=BODY, headers=HEADERS) as resp:
                async for chunk in resp.aiter_raw():
                    chunks += chunk.count(b"data:")

        await asyncio.gather(*(one() for _ in range(requests)))
    return chunks


async def run_h1(url: str, requests: int, concurrency: int) -> int:
    chunks = 0
    client = H1Client(connect_timeout_s=5)
    target = parse_url(url)
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        nonlocal chunks
        async with gate:
            resp = await client.request(target, BODY, HEADERS)
            while chunk := await resp.readany():
                chunks += chunk.count(b"data:")
            client.release(resp)

    await asyncio.gather(*(one() for _ in range(requests)))
    await client.close()
    return chunks


Runner = Callable[[str, int, int], Awaitable[int]]


def measure(runner: Runner, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    asyncio.run(runner(url, max(concurrency, requests // 10), concurrency))  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    chunks = asyncio.run(runner(url, requests, concurrency))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return chunks / wall, chunks / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.fast_upstream", "--port",
                               str(port)], cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        results = {name: measure(fn, url, args.requests, args.concurrency)
                   for name, fn in (("aiohttp", run_aiohttp), ("httpx", run_httpx),
                                           ("h1", run_h1))}
    finally:
        server.terminate()
        server.wait(10)
    print(f"{args.requests} streams x 64 chunks, concurrency {args.concurrency}, "
          f"pid {os.getpid()}")
    print(f"{'client':<8} {'events/s (wall)':>16} {'events/CPU-s':>14}")
    for name, (wall, cpu) in results.items():
        print(f"{name:<8} {wall:>16,.0f} {cpu:>14,.0f}")
    a, h, own = results["aiohttp"], results["httpx"], results["h1"]
    print(f"aiohttp / httpx: {a[0] / h[0]:.2f}x wall, {a[1] / h[1]:.2f}x per CPU-second")
    print(f"h1 / aiohttp: {own[0] / a[0]:.2f}x wall, {own[1] / a[1]:.2f}x per CPU-second")


if __name__ == "__main__":
    main()
