"""In what order does the real vLLM prefill prompts that arrive together?

    PYTHONPATH=. .venv/bin/python benchmarks/vllm_prefill_order.py [WORDS] [BUDGET]

Starts the suite's real vLLM for the CPU (tests/realvllm; built on first use by `make
test`) with `--max-num-batched-tokens BUDGET` (default 512) and no prefix caching, sends
four prompts of about WORDS tokens (default 3,000) at the same instant, each asking for
one token, streamed, and prints each one's time to first token, three times (the first
is a warm-up). First come, first served (the V1 scheduler fills each step's token
budget with the running requests in order, then waiting ones) shows as first tokens one
prefill apart; prompts prefilled side by side would all get theirs together, at the end.
The emulators follow the first (emulator/engine.py); docs/benchmarks.md has the result.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from loadgen.local import free_port
from tests.processes import Server
from tests.realvllm.build import MODEL_NAME, artifacts
from tests.realvllm.model import corpus
from tests.realvllm.server import ENV, START_TIMEOUT_S, server_args

PROMPTS = 4


async def first_token(client: httpx.AsyncClient, url: str, index: int, prompt: str,
                      t0: float) -> tuple[int, float, float, int]:
    """(index, sent at, first token at, prompt tokens), times from t0."""
    sent = time.monotonic() - t0
    first, prompt_tokens = -1.0, 0
    async with client.stream("POST", url + "/v1/completions", json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first < 0 and event.get("choices"):
                first = time.monotonic() - t0
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
    return index, sent, first, prompt_tokens


async def burst(url: str, words: int) -> None:
    # distinct from their first word (no shared prefix), made before the clock starts
    prompts = [" ".join(" ".join(corpus(seed=i + 1)).split()[:words]) for i in range(PROMPTS)]
    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.monotonic()
        done = await asyncio.gather(*(first_token(client, url, i, prompt, t0)
                                      for i, prompt in enumerate(prompts)))
    for index, sent, first, tokens in sorted(done, key=lambda d: d[2]):
        print(f"  prompt {index}: sent at {sent * 1000:4.0f} ms, first token at "
              f"{first * 1000:5.0f} ms ({tokens} prompt tokens)")


def main() -> int:
    words = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    budget = sys.argv[2] if len(sys.argv) > 2 else "512"
    real = artifacts()
    if not real.vllm.exists():
        print("no real vLLM built yet: `make test` builds it (tests/realvllm/build.py)")
        return 2
    port = free_port()
    args = server_args(real.agent_model, port, max_num_seqs=8, max_model_len=16384,
                       extra=("--max-num-batched-tokens", budget,
                              "--no-enable-prefix-caching"))
    server = Server(args, port, Path("/tmp") / f"vllm-prefill-order-{port}.log",
                    program=str(real.vllm), env=ENV)
    try:
        server.wait_listening(START_TIMEOUT_S)  # vLLM listens once its engine is up
        print(f"vLLM {real.version} (CPU), --max-num-batched-tokens {budget}: {PROMPTS} "
              f"prompts of ~{words} tokens sent together")
        for label in ("warm-up", "run 1", "run 2"):
            print(label)
            asyncio.run(burst(server.url, words))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
