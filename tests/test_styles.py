"""Servers that write their JSON and events differently, over a real socket: the bench
and the proxy count the same tokens from each (tests/sse_styles.py names the styles), and
a server that sends no usage is counted from its content events, marked as estimated."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadgen.workload import Workload
from tests.conftest import EVERY_API, Launcher, backend
from tests.probes import gauges, wait_for
from tests.processes import ROOT, Server
from tests.sse_styles import STYLES
from tests.test_bench import level

N = 20  # tokens per request
CHAT = Workload("chat", "m", input_len=64, output_len=N)
COMPLETIONS = Workload("completions", "m", input_len=64, output_len=N)


@pytest.fixture(scope="module")
def served(module_launch: Launcher) -> Iterator[tuple[Server, Server]]:
    up = module_launch.upstream("styles", token_delay_ms=1)
    proxy = module_launch.proxy([backend("up", up, models=["m"], apis=EVERY_API)])
    yield up, proxy


def counted(proxy: Server) -> dict[str, float]:
    g = gauges(proxy)
    return {k: g.get(f"sluiceway_{k}", 0.0) for k in (
        "output_tokens_total", "output_tokens_estimated_total", "requests_total")}


def proxy_delta(proxy: Server, before: dict[str, float], requests: int) -> dict[str, float]:
    wait_for(lambda: counted(proxy)["requests_total"] - before["requests_total"] >= requests)
    after = counted(proxy)
    return {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_bench_and_proxy_count_every_style(served: tuple[Server, Server], style: str) -> None:
    up, proxy = served
    up.post("/_control", {"style": style, "piece": 'tok{i} "q\\" é '})
    usage = STYLES[style].usage
    for workload in (CHAT, COMPLETIONS):
        direct = level(up.url, 2, 6, workload=workload)
        assert direct["completed"] == 6 and direct["total_output_tokens"] == 6 * N, style
        assert direct["estimated_requests"] == (0 if usage else 6)
        assert direct["output_tokens_counted_by"] == ("usage" if usage else "content_events")
        assert direct["mean_tpot_ms"] > 0
        before = counted(proxy)
        routed = level(proxy.url, 2, 6, workload=workload)
        assert routed["completed"] == 6 and routed["total_output_tokens"] == 6 * N, style
        d = proxy_delta(proxy, before, 6)
        assert d["output_tokens_total"] == 6 * N, (style, workload.endpoint)
        assert d["output_tokens_estimated_total"] == (0 if usage else 6 * N)


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
def test_the_proxy_counts_every_api_in_every_style(
        served: tuple[Server, Server], style: str, path: str) -> None:
    """Responses and Messages streams, and a chat stream whose usage sluiceway asked for
    itself (and removes before the client sees it)."""
    up, proxy = served
    up.post("/_control", {"style": style, "piece": "w{i} "})
    before = counted(proxy)
    body = {"model": "m", "stream": True, "max_tokens": N, "max_output_tokens": N,
            "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    with httpx.stream("POST", proxy.url + path, json=body, timeout=30) as resp:
        assert resp.status_code == 200
        received = resp.read()
    d = proxy_delta(proxy, before, 1)
    assert d["output_tokens_total"] == N, (style, path)
    assert d["output_tokens_estimated_total"] == (0 if STYLES[style].usage else N)
    if path == "/v1/chat/completions":
        assert received.count(b'"w1 "') == 1
        # a usage-only event is removed; usage inside the finish chunk (transformers
        # serve) stays where the server put it: an extra field every client tolerates
        assert (b"usage" in received) == (not STYLES[style].done and STYLES[style].usage)


def test_tokenizer_counts_a_stream_without_usage(served: tuple[Server, Server],
                                                 tmp_path: Path) -> None:
    """`--tokenizer`: each event carries two words, so a tokenizer that knows them counts
    2 x N where one-per-event would say N; the table warns that the count is estimated."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    up, _ = served
    up.post("/_control", {"style": "no_usage", "piece": "alpha{i} beta "})
    vocab = {"[UNK]": 0, "beta": 1, **{f"alpha{i}": 2 + i for i in range(N)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    out = tmp_path / "r.json"
    run = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--url", up.url, "--model", "m",
         "--concurrency", "2", "--requests", "4", "--output-len", str(N), "--input-len",
         "32", "--tokenizer", str(path), "--json", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())["results"][0]
    assert result["total_output_tokens"] == 4 * 2 * N
    assert result["output_tokens_counted_by"] == "tokenizer"
    assert result["tokenizer_id"] == str(path)
    assert "4 of 4 streams carried no usage" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--url", up.url, "--model", "m",
         "--concurrency", "1", "--requests", "1", "--tokenizer", str(tmp_path / "none")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--tokenizer: no file" in bad.stderr


def test_adaptive_learns_a_backend_that_sends_no_usage(launch: Launcher) -> None:
    """Its decode rate and throughput curve come from the content events: the upstream
    sends a token every 20 ms, so about 50 tok/s per stream (less, never more)."""
    up = launch.upstream("silent", token_delay_ms=20)
    up.post("/_control", {"style": "no_usage"})
    proxy = launch.proxy([backend("up", up, models=["m"], apis=EVERY_API)],
                         routing={"policy": "adaptive"})
    r = level(proxy.url, 2, 6, workload=CHAT)
    assert r["completed"] == 6 and r["total_output_tokens"] == 6 * N
    state = httpx.get(proxy.url + "/admin/backends", timeout=5).json()["backends"][0]
    assert state["completed"] == 6
    assert 25 < state["decode_tok_s"] <= 51
    assert state["throughput_curve"], state


@pytest.mark.parametrize(("path", "last"), [("/v1/chat/completions", b"[DONE]"),
                                            ("/v1/responses", b"response.completed"),
                                            ("/v1/messages", b"message_stop")])
def test_a_client_that_leaves_after_the_last_event_was_answered(
        launch: Launcher, path: str, last: bytes) -> None:
    """The openai SDK and Codex close the connection once they have the last event, which
    can be before the upstream's end of body: that request was served in full (200, its
    tokens counted), not a 499 with nothing learned."""
    up = launch.upstream("linger", token_delay_ms=1)
    up.post("/_control", {"linger_ms": 1500})
    proxy = launch.proxy([backend("up", up, models=["m"], apis=EVERY_API)])
    before = counted(proxy)
    body = {"model": "m", "stream": True, "max_tokens": N, "max_output_tokens": N,
            "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    with httpx.stream("POST", proxy.url + path, json=body, timeout=30) as resp:
        got = b""
        for chunk in resp.iter_raw():
            got += chunk
            if last in got:
                break  # and close, while the upstream still holds its body open
    d = proxy_delta(proxy, before, 1)
    assert d["output_tokens_total"] == N
    record = json.loads(proxy.output().splitlines()[-1].split(" ", 4)[-1])
    assert record["status"] == 200 and record["outcome"] == "ok", record
    assert record["ttft_ms"] is not None
    assert gauges(proxy).get("sluiceway_backend_in_flight", 0) == 0


def test_bench_sends_the_prompts_of_a_file(served: tuple[Server, Server],
                                           tmp_path: Path) -> None:
    up, _ = served
    up.post("/_control", {"style": "compact", "piece": "w{i} "})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n"
                               for i in range(3)))
    run = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--url", up.url, "--model", "m",
         "--concurrency", "1", "--requests", "2", "--warmup", "0", "--output-len", "4",
         "--prompts", str(prompts), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    last = up.get("/_stats")["last_body"]["messages"]
    assert last == [{"role": "user", "content": "prompt number 1"}]
    prompts.write_text('{"text": "no prompt key"}\n')
    bad = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--url", up.url, "--model", "m",
         "--prompts", str(prompts)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and 'expected {"prompt": "..."}' in bad.stderr
