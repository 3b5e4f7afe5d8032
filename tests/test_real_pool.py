"""The real mixed pool: the pinned llama-server and the real vLLM, both serving their
random model as `tiny-llama`, behind sluiceway's `adaptive` policy (a fresh proxy, no
learning pass). Both engines take traffic, nothing fails, and neither ever holds more
requests than its capacity (llama.cpp's slots, discovered; the cap set for vLLM)."""

from __future__ import annotations

import threading
import time

from loadgen.workload import Workload
from tests.conftest import Launcher, backend
from tests.probes import gauges
from tests.processes import Server
from tests.realllama.server import MODEL_ALIAS, RealLlama
from tests.test_bench import level


def test_adaptive_serves_a_real_llamacpp_and_vllm_pool(
        launch: Launcher, real_llama: RealLlama, vllm: Server) -> None:
    llama = launch.llama_server(real_llama, slots=2)
    proxy = launch.proxy(
        [backend("llama", llama, kind="llamacpp"),
         backend("vllm", vllm, kind="vllm", max_concurrency=4)],
        routing={"policy": "adaptive", "calibrate_tokens": 32},
        health={"interval_s": 0.2, "timeout_s": 2})
    most = {"llama": 0, "vllm": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for b in proxy.get("/admin/backends")["backends"]:
                most[b["name"]] = max(most[b["name"]], b["in_flight"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = level(proxy.url, concurrency=8, requests=64, timeout_s=120,
                  workload=Workload("chat", MODEL_ALIAS, input_len=64, output_len=64))
    finally:
        done.set()
        watcher.join(10)
    assert r["completed"] == 64 and r["failed"] == 0, r["errors"]
    assert r["total_output_tokens"] == 64 * 64
    shares = {name: b["requests"] for name, b in r["backends"].items()}
    assert shares.get("llama", 0) > 0 and shares.get("vllm", 0) > 0, shares
    assert most["llama"] <= 2 and most["vllm"] <= 4, most
    states = {b["name"]: b for b in proxy.get("/admin/backends")["backends"]}
    assert states["llama"]["capacity"] == 2 and states["llama"]["failed"] == 0
    assert states["vllm"]["failed"] == 0
    assert gauges(llama).get("llamacpp:requests_deferred", 0) == 0
