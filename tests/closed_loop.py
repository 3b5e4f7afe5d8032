"""An independent closed-loop client for checking emulator timing (not the project's
load tester, so a bug there cannot hide one here).

c workers each send streamed requests back to back; every content event's arrival is
time-stamped, and throughput is the number of tokens that arrived inside a steady-state
window (after a warm-up) divided by the window's length.
"""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
CONTENT = b'":" '  # every generated token starts with a space: "content":" w / "text":" w


def prompt_words(n: int, rng: random.Random) -> str:
    # a unique first word per request, so no prefix cache can serve the prompt
    return " ".join([f"u{rng.getrandbits(48):x}", *(rng.choice(WORDS) for _ in range(n - 1))])


async def closed_loop(
    url: str, model: str, concurrency: int, warmup_s: float, window_s: float,
    input_tokens: int = 512, output_tokens: int = 128,
) -> float:
    """Output tokens/s summed over all streams in the steady-state window."""
    rng = random.Random(concurrency)
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup_s, start + warmup_s + window_s)
    counted = 0
    words = input_tokens - 5  # the chat template adds 5 tokens around one user message

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counted
        while loop.time() < window[1]:
            body = {"model": model, "stream": True, "max_tokens": output_tokens,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": prompt_words(words, rng)}]}
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                while chunk := await resp.content.readany():
                    now = loop.time()
                    if window[0] <= now < window[1]:
                        counted += chunk.count(CONTENT)
                    if now >= window[1]:
                        return

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return counted / window_s


def measure(url: str, model: str, concurrency: int, warmup_s: float, window_s: float) -> float:
    started = time.monotonic()
    rate = asyncio.run(closed_loop(url, model, concurrency, warmup_s, window_s))
    assert time.monotonic() - started < warmup_s + window_s + 30
    return rate
