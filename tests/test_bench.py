"""`sluiceway bench` against servers with known timing, failures of every class, the JSON
keys of `vllm bench serve`, per-backend attribution, agent sessions and the demo."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadgen.local import free_port
from loadgen.record import Failure
from loadgen.report import result_json
from loadgen.runner import Target, agent_sessions, closed_loop, open_loop
from loadgen.workload import Span, Workload
from tests.conftest import Launcher, backend
from tests.processes import ROOT
from tests.test_failures import metric

WORKLOAD = Workload("chat", "m", input_len=64, output_len=20)


def level(url: str, concurrency: int, requests: int, workload: Workload = WORKLOAD,
          timeout_s: float = 30, warmup: int = 0) -> dict[str, Any]:
    result = asyncio.run(closed_loop(Target("t", url), workload, concurrency,
                                     requests=requests, duration_s=None, warmup=warmup,
                                     timeout_s=timeout_s, show_progress=False))
    return result_json(result, [50, 99])


def test_metrics_match_a_server_with_known_timing(launch: Launcher) -> None:
    # first event after 100 ms, then one every 50 ms. The bench is compared with what the
    # server recorded of each stream on its own clock, not with the nominal delays: a
    # 10 ms sleep takes 10.3 ms on an idle 2-core machine and more beside busy ones.
    up = launch.upstream("known", first_delay_ms=100, token_delay_ms=50)
    r = level(up.url, concurrency=4, requests=12)
    assert r["completed"] == 12 and r["failed"] == 0
    assert r["total_output_tokens"] == 12 * 20  # from usage, which the bench asks for
    server = up.get("/_stats")["timings"]
    assert len(server) == 12

    def mean_ms(key: str) -> float:
        return 1000 * sum(t[key] for t in server) / len(server)

    # the server did as asked, to within its event loop's timer granularity: uvloop (libuv)
    # schedules on a clock cached at the start of each loop pass, in whole milliseconds, so
    # a 100 ms sleep can end up to 1 ms early by perf_counter (CI saw a mean of 99.96 ms)
    assert mean_ms("ttft") >= 99 and mean_ms("tpot") >= 49
    # A client sees each event after the server sent it, by the loopback's and both event
    # loops' scheduling delay. TTFT and E2EL carry that delay once per request: never
    # less than the server's (a one-sided bound), and more by 2-10 ms a request (measured
    # on an idle 2-core machine with 4 streams; a mean of 9.5 ms over failed the 5 ms this
    # test once allowed, with tokens 10 ms apart). The ceiling is half a token's delay:
    # far above that, and below a TTFT taken at the second event (50 ms late).
    for key in ("ttft", "e2el"):
        assert mean_ms(key) <= r[f"mean_{key}_ms"] <= mean_ms(key) + 25, key
    # TPOT and ITL are differences, where the delay cancels out but for jitter
    assert r["mean_tpot_ms"] == pytest.approx(mean_ms("tpot"), rel=0.03)
    assert r["median_itl_ms"] == pytest.approx(
        1000 * sorted(t["median_itl"] for t in server)[6], rel=0.03)
    # the bench's run spans the server's (from the first arrival to the last stream's
    # end), a little longer: the connection's set-up and the last read
    span = max(t["end"] for t in server) - min(t["arrival"] for t in server)
    assert 12 * 20 / span * 0.97 <= r["output_throughput"] <= 12 * 20 / span
    assert r["max_concurrent_requests"] == 4


def test_metrics_match_an_emulated_vllm(launch: Launcher) -> None:
    vllm = launch.emulator("vllm", "vllm-fp8-aiter", speed=4, model="m")
    workload = Workload("chat", "m", input_len=512, output_len=128)
    level(vllm.url, concurrency=1, requests=1, workload=workload)  # warm-up, not measured
    e2e_before = metric(vllm.url, "vllm:e2e_request_latency_seconds_sum")
    r = level(vllm.url, concurrency=1, requests=12, workload=workload)
    assert r["completed"] == 12 and r["failed"] == 0
    assert r["total_input_tokens"] == 12 * 512  # the server's count, from usage
    assert r["total_output_tokens"] == 12 * 128
    # The profile, on the emulator's own clock: one step prefills the 512 tokens at
    # 40,000 tok/s and gives the first token, then 127 decode steps of 1 / 122.5 s, all
    # divided by the speed. The engine schedules its steps on absolute times, so only the
    # first wake and the last step can run late.
    busy_s = metric(vllm.url, "vllm:e2e_request_latency_seconds_sum") - e2e_before
    model_s = (512 / 40_000 + 127 / 122.5) / 4
    assert model_s - 0.001 <= busy_s / 12 <= model_s * 1.05
    # single stream: TPOT is 1 / T_dec(1) = 1 / 122.5 s, divided by the speed
    assert r["mean_tpot_ms"] == pytest.approx(1000 / 122.5 / 4, rel=0.05)
    # The bench's output throughput against what the server did. The profile says nothing
    # of the time between the server's requests (the client uploading a 512-token prompt,
    # the server parsing it, the next request's turnaround: 8-17 ms a request measured on
    # a 2-core machine, 3-6% of a request here), so comparing with 121 tok/s x 4 left the
    # check to luck. One stream at a time: the run spans every request the server timed,
    # so the bench can never report more than the server's busy time allows; and since a
    # closed loop keeps its stream busy, not much less. The floor leaves 20% of the run
    # outside the server's requests; 4% here idle, about 6% in the soak run that failed.
    assert r["mean_e2el_ms"] >= 1000 * busy_s / 12
    ceiling = 12 * 128 / busy_s
    assert 0.8 * ceiling <= r["output_throughput"] <= ceiling


def test_every_failure_class_is_counted(launch: Launcher) -> None:
    up = launch.upstream("faulty", token_delay_ms=5)
    up.post("/_control", {"fail_status": 503, "fail_count": 2})
    r = level(up.url, 1, 4)
    assert r["failures"] == {Failure.HTTP: 2} and r["completed"] == 2
    up.post("/_control", {"garbage_count": 1})
    assert level(up.url, 1, 1)["failures"] == {Failure.PAYLOAD: 1}
    up.post("/_control", {"die_after_chunks": 3})
    assert level(up.url, 1, 1)["failures"] == {Failure.CUT: 1}
    up.post("/_control", {"die_after_chunks": -1, "first_delay_ms": 2000})
    assert level(up.url, 1, 1, timeout_s=0.5)["failures"] == {Failure.TIMEOUT_FIRST: 1}
    up.post("/_control", {"first_delay_ms": 0, "token_delay_ms": 200})
    assert level(up.url, 1, 1, timeout_s=1)["failures"] == {Failure.TIMEOUT_STREAM: 1}
    closed = level(f"http://127.0.0.1:{free_port()}", 1, 2)
    assert closed["failures"] == {Failure.CONNECT: 2}
    assert closed["errors"] and closed["completed"] == 0


def test_json_has_the_vllm_bench_keys(launch: Launcher) -> None:
    up = launch.upstream("keys")
    r = level(up.url, 2, 6)
    keys = ["date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id",
            "num_prompts", "request_rate", "burstiness", "max_concurrency", "duration",
            "completed", "failed", "total_input_tokens", "total_output_tokens",
            "request_throughput", "request_goodput", "output_throughput",
            "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
            "rtfx", "queue_times", "latencies"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        keys += [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms",
                 f"p50_{name}_ms", f"p99_{name}_ms"]
    assert [k for k in keys if k not in r] == []
    assert r["request_rate"] == "inf" and r["max_concurrency"] == 2
    assert r["endpoint_type"] == "openai-chat" and r["request_goodput"] is None


def test_goodput_and_open_loop(launch: Launcher) -> None:
    up = launch.upstream("open", first_delay_ms=50, token_delay_ms=2)
    result = asyncio.run(open_loop(Target("t", up.url), WORKLOAD, rate=40, requests=40,
                                   duration_s=None, warmup=0, timeout_s=10,
                                   show_progress=False))
    from loadgen.summary import Goodput

    r = result_json(result, [99], Goodput.parse("ttft:75,tpot:1"))  # tpot 2 ms: never good
    assert r["completed"] == 40 and r["request_rate"] == 40
    assert r["request_goodput"] == 0.0
    good = result_json(result, [99], Goodput.parse("ttft:1000"))
    assert good["request_goodput"] == pytest.approx(good["request_throughput"])
    assert 0.5 < result.duration < 2.5  # 40 arrivals at 40/s, then the drain


def test_cli_per_backend_tables_through_the_proxy(launch: Launcher, tmp_path: Path) -> None:
    a = launch.upstream("a", token_delay_ms=2)
    b = launch.upstream("b", token_delay_ms=2)
    proxy = launch.proxy([backend("a", a, models=["m"]), backend("b", b, models=["m"])],
                         routing={"policy": "round_robin"})
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--url", f"pool={proxy.url}",
         "--url", f"direct={a.url}", "--model", "m", "--concurrency", "1,4",
         "--requests", "16", "--input-len", "32", "--output-len", "8", "--no-progress",
         "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
         "--plot", str(tmp_path / "r.png"), "--html", str(tmp_path / "r.html")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "per backend (from x-sluiceway-backend)" in out.stdout
    assert "pool tok/s" in out.stdout and "direct tok/s" in out.stdout  # side by side
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    pool = [r for r in results if r["label"] == "pool"]
    assert {tuple(sorted(r["backends"])) for r in pool} == {("a", "b")}
    assert sum(v["requests"] for v in pool[0]["backends"].values()) == 16
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r.csv").read_text().count("\n") == 5
    assert "data:image/png;base64" in (tmp_path / "r.html").read_text()


def test_agent_sessions_send_session_ids_and_report_turns(launch: Launcher) -> None:
    up = launch.upstream("agent", token_delay_ms=1)
    result = asyncio.run(agent_sessions(Target("t", up.url), WORKLOAD, conversations=3,
                                        turns=4, prefix_tokens=100, timeout_s=10,
                                        show_progress=False))
    r = result_json(result, [99])
    assert r["completed"] == 12
    assert list(r["agent"]["mean_ttft_ms_per_turn"]) == [0, 1, 2, 3]
    stats = up.get("/_stats")
    assert stats["last_headers"]["x-session-id"].startswith("agent-")
    history = stats["last_body"]["messages"]
    assert len(history) == 1 + 4 + 3  # system, 4 user turns, 3 replies before the last
    assert history[2]["role"] == "assistant" and history[2]["content"].startswith("tok0")


def test_each_agent_is_the_same_session_in_every_run_and_ends_with_its_last_reply(
        launch: Launcher) -> None:
    """Each agent draws its turns (sizes, reply lengths, tool times) from its own seeded
    generator: agent 0 of three sends what agent 0 alone sends, so targets that answer in
    different orders are sent the same sessions (one generator shared by all agents gave
    each the draws in the order replies came back, and the agent bench's whole-run rates
    differed by up to 10% between targets from that alone). No tool time follows a
    session's last turn: the run's duration ends with its last reply."""
    up = launch.upstream("agent-draws", token_delay_ms=1)

    def run(conversations: int) -> Any:
        return asyncio.run(agent_sessions(
            Target("t", up.url), WORKLOAD, conversations=conversations, turns=3,
            prefix_tokens=50, timeout_s=20, show_progress=False, turn_tokens=Span(20, 200),
            reply_tokens=Span(5, 40), think_s=0.5))

    def turns(result: Any) -> set[tuple[int, int, int]]:
        return {(r.turn, r.prompt_tokens, r.output_tokens) for r in result.records}

    alone, among = run(1), run(3)
    assert len(turns(alone)) == 3 and len(among.records) == 9
    assert turns(alone) <= turns(among), (sorted(turns(alone)), sorted(turns(among)))
    last_reply = max(r.t0 + (r.e2el or 0.0) for r in among.records)
    assert among.started + among.duration - last_reply < 0.1


def test_agent_shape_from_the_command_line(launch: Launcher, tmp_path: Path) -> None:
    """`--opening-tokens`, `--turn-tokens`, `--reply-tokens` (ranges drawn per turn) and
    `--tool-time-s` shape the sessions as sent; the summary has turns 2+ mean/p50/p99."""
    up = launch.upstream("agent-shape", token_delay_ms=1)
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--url", up.url, "--model", "m",
         "--workload", "agent", "--conversations", "3", "--turns", "4",
         "--prefix-tokens", "50", "--opening-tokens", "400-600", "--turn-tokens", "100-200",
         "--reply-tokens", "5-20", "--tool-time-s", "0.05", "--no-progress",
         "--json", str(tmp_path / "a.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "turns 2+: mean" in out.stdout and "p99" in out.stdout
    (r,) = json.loads((tmp_path / "a.json").read_text())["results"]
    assert r["completed"] == 12 and r["failed"] == 0
    agent = r["agent"]
    assert (agent["first_turn_tokens"], agent["turn_tokens"], agent["reply_tokens"],
            agent["think_s"]) == ("400-600", "100-200", "5-20", 0.05)
    assert 0 < agent["p50_ttft_ms_later_turns"] <= agent["p99_ttft_ms_later_turns"]
    # the last request of a session carries its whole history: each user turn as drawn
    body = up.get("/_stats")["last_body"]
    users = [m["content"].split() for m in body["messages"] if m["role"] == "user"]
    assert len(users) == 4
    assert 400 <= len(users[0]) - 2 <= 600  # "task i.t:" then the words
    assert all(100 <= len(u) - 2 <= 200 for u in users[1:])
    assert 5 <= body["max_tokens"] <= 20
    # each turn asked its own reply length (the upstream sends max_tokens tokens)
    per_request = r["total_output_tokens"]
    assert 12 * 5 <= per_request <= 12 * 20 and per_request not in (60, 240)


def test_agent_ranges_are_checked(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--url", "http://127.0.0.1:9",
         "--workload", "agent", "--turn-tokens", "300-100"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "a range must be 0 <= A <= B: '300-100'" in out.stderr


def test_no_ignore_eos_for_servers_that_refuse_unknown_fields(launch: Launcher,
                                                                tmp_path: Path) -> None:
    # transformers serve answers 422 to `ignore_eos`; --no-ignore-eos leaves it out
    strict = launch.upstream("strict", reject_fields="ignore_eos")

    def bench(*flags: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "bench", "--url", strict.url, "--model", "m",
             "--concurrency", "2", "--requests", "6", "--input-len", "16", "--output-len",
             "4", "--warmup", "0", "--no-progress", "--json", str(tmp_path / "r.json"),
             *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads((tmp_path / "r.json").read_text())["results"][0]
        return result

    refused = bench()
    assert refused["completed"] == 0 and refused["failed"] == 6
    served = bench("--no-ignore-eos")
    assert served["completed"] == 6 and served["failed"] == 0
    assert served["total_output_tokens"] == 6 * 4
    assert "ignore_eos" not in strict.get("/_stats")["last_body"]


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "bench", "--url",
                          "http://127.0.0.1:9", "--model", "m", "--concurrency", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--concurrency" in out.stderr


def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    # --speed 4, not the quick demo's 8: there the proxy relays ~14,000 tokens/s at c=32,
    # and with two busy loops beside it on two cores the pool read 0.90x its best member
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--quick", "--speed",
                          "4", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "llamacpp-q4km tok/s" in out.stdout and "vllm-fp8-aiter tok/s" in out.stdout
    report = json.loads((tmp_path / "demo.json").read_text())
    results, speed = report["results"], report["speed_scale"]
    assert len(results) == 9 and all(r["failed"] == 0 for r in results)
    by = {(r["label"].split()[0], r["max_concurrency"]): r for r in results}
    # the emulated backends reproduce their profiles' shape: vLLM scales, llama.cpp does not
    assert by[("vllm-fp8-aiter", 32)]["output_throughput"] / speed > 1500
    assert by[("llamacpp-q4km", 32)]["output_throughput"] / speed < 320
    # the promise, from a freshly started proxy with every request counted, coarsely: the
    # demo measures each target once, and one whole run on this shared machine can read
    # 10% slow (CI read a pool run at 0.90x whose twin read 1.02x). Measured 0.99-1.01x;
    # the policy before the kind shapes gave 0.85x at c=8. tests/test_promise.py holds
    # this pool to 0.97x on medians of three runs.
    for c in (1, 8, 32):
        best = max(by[(name, c)]["output_throughput"]
                   for name in ("vllm-fp8-aiter", "llamacpp-q4km"))
        assert by[("sluiceway", c)]["output_throughput"] >= 0.88 * best, c
    assert "pool vs its best member: c=1" in out.stdout
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert (tmp_path / "demo.html").exists()
    leftovers = subprocess.run(["pgrep", "-f", f"--config {tmp_path}"], capture_output=True)
    assert leftovers.stdout == b""  # every process it started is gone
