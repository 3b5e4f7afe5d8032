"""Calibration (proxy/calibrate.py): before a proxy serves, each backend has had one short
measured request, learned as a routed one would be; a backend that fails its probe or
comes up later is calibrated in a later round; probes are not client requests."""

from __future__ import annotations

import time

import httpx
import pytest

from loadgen.local import free_port
from proxy.calibrate import LONG_TOKENS
from tests.conftest import Launcher, backend
from tests.probes import gauges, sdk, wait_for
from tests.processes import Server

TOKENS = 16


def views(proxy: Server) -> dict[str, dict]:  # type: ignore[type-arg]
    return {b["name"]: b for b in proxy.get("/admin/backends")["backends"]}


# The measuring test's probe: its rate is taken from first token to last, so an emulator
# whose late event loop delivers the first token late and catches up after it reads fast;
# over 16 tokens at --speed 4 (35 ms on llama.cpp) that read 1.29x the profile beside
# busy loops, over 64 at --speed 2 (0.28 s) 10 ms late is 4%. The speed also sets vLLM's
# long-probe prefill (4,000 tokens: 50 ms at --speed 2), which the slope is taken over.
MEASURED_TOKENS = 64
MEASURED_SPEED = 2


def test_every_backend_is_measured_before_the_proxy_serves(launch: Launcher) -> None:
    speed = MEASURED_SPEED
    llama = launch.emulator("llamacpp", "llamacpp-q4km", speed=speed, model="m")
    vllm = launch.emulator("vllm", "vllm-fp8-aiter", speed=speed, model="m")
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp", models=["m"]),
                          backend("vllm", vllm, kind="vllm", models=["m"])],
                         routing={"calibrate_tokens": MEASURED_TOKENS})
    seen = views(proxy)  # the first answer the proxy gives: calibration came before it
    for name in ("llama", "vllm"):
        view = seen[name]
        assert view["completed"] == 1 and view["in_flight"] == 0, view
        [(concurrency, rate)] = view["throughput_curve"]
        assert concurrency == 1 and rate > 0
        assert view["ttft_curve"][0][0] == 1 and view["prefill_chars_per_s"] > 0
        assert view["mean_uncached_chars"] > 0
    # measured, not assumed: the emulators' single streams, in profile units
    assert seen["llama"]["throughput_curve"][0][1] / speed == pytest.approx(114, rel=0.25)
    assert seen["vllm"]["throughput_curve"][0][1] / speed == pytest.approx(121, rel=0.25)
    # llama.cpp prefills 5,555 tokens/s, vLLM 40,000 in these profiles: 7.2x. From the
    # short probe alone (bytes / TTFT) a fresh proxy read 1.3-3.9x, the few ms of HTTP and
    # scheduling in each TTFT outweighing vLLM's 2 ms of prefill; the slope between the
    # short and the long probe leaves them out
    ratio = seen["vllm"]["prefill_chars_per_s"] / seen["llama"]["prefill_chars_per_s"]
    print(f"prefill speed ratio {ratio:.2f}", seen["vllm"]["prefill_chars_per_s"],
          seen["llama"]["prefill_chars_per_s"])
    assert 5.0 < ratio < 12.0
    # each engine answered exactly two requests: the calibration's and the long prompt's
    assert gauges(llama)["llamacpp:tokens_predicted_total"] == MEASURED_TOKENS + LONG_TOKENS
    assert gauges(vllm)["vllm:generation_tokens_total"] == MEASURED_TOKENS + LONG_TOKENS
    assert gauges(vllm)["vllm:request_success_total"] == 2
    assert "sluiceway_requests_total{" not in httpx.get(proxy.url + "/metrics").text
    assert "calibrated backend llama" in proxy.output()
    # and the proxy serves
    reply = sdk(proxy).chat.completions.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_a_failed_probe_is_retried_and_teaches_nothing(launch: Launcher) -> None:
    up = launch.upstream("up", model="m")
    up.post("/_control", {"fail_status": 500, "fail_count": 1})
    # the next round follows a health round: 1 s gives the first look time to come first
    proxy = launch.proxy([backend("up", up, models=["m"])],
                         routing={"calibrate_tokens": TOKENS},
                         health={"interval_s": 1.0, "timeout_s": 1})
    first = views(proxy)["up"]
    assert first["completed"] == 0 and first["throughput_curve"] == [] and first["failed"] == 0
    assert first["in_flight"] == 0  # the slot the probe took is free again
    assert "calibrating backend up failed: HTTP 500" in proxy.output()
    # the next round: the probe again, then the long-prompt one (which teaches no curve)
    wait_for(lambda: up.get("/_stats")["requests"] == 3, timeout_s=15)
    wait_for(lambda: views(proxy)["up"]["in_flight"] == 0, timeout_s=5)
    assert views(proxy)["up"]["completed"] == 1
    body = up.get("/_stats")["last_body"]
    assert body["max_tokens"] == LONG_TOKENS and body["stream"] is True
    assert "ignore_eos" not in body  # an "openai" backend may refuse unknown fields
    time.sleep(1.0)  # later rounds leave a calibrated backend alone
    assert up.get("/_stats")["requests"] == 3


def test_a_backend_that_comes_up_later_is_calibrated_then(launch: Launcher) -> None:
    port = free_port()
    proxy = launch.proxy([backend("late", f"http://127.0.0.1:{port}", kind="vllm",
                                  models=["m"])],
                         routing={"calibrate_tokens": TOKENS},
                         health={"interval_s": 0.3, "timeout_s": 1})
    assert views(proxy)["late"]["completed"] == 0
    launch.emulator("vllm", "vllm-fp8", speed=4, model="m", port=port)
    wait_for(lambda: views(proxy)["late"]["completed"] == 1, timeout_s=30)
    assert views(proxy)["late"]["throughput_curve"][0][0] == 1


@pytest.mark.parametrize(("ctx", "probes"), [(2048, 2), (600, 1)])
def test_the_long_probe_fits_the_context_or_is_left_out(launch: Launcher, ctx: int,
                                                        probes: int) -> None:
    vllm = launch.emulator("vllm", "vllm-fp8", speed=4, model="m", ctx=ctx)
    proxy = launch.proxy([backend("vllm", vllm, kind="vllm", models=["m"])],
                         routing={"calibrate_tokens": TOKENS})
    assert views(proxy)["vllm"]["completed"] == 1
    found = gauges(vllm)
    # every probe answered (none refused for its length), the long one within half the
    # context; a context too small to hold one twice the short probe's size gets none
    assert found["vllm:request_success_total"] == probes
    assert found["vllm:prompt_tokens_total"] <= 300 + (probes - 1) * ctx / 2
    assert ("prefill" in proxy.output().split("calibrated backend vllm:")[-1]) == (probes == 2)


def test_calibration_off_sends_nothing(launch: Launcher) -> None:
    up = launch.upstream("up", model="m")
    proxy = launch.proxy([backend("up", up, models=["m"])], routing={"calibrate_tokens": 0})
    assert views(proxy)["up"]["completed"] == 0
    time.sleep(1.0)
    assert up.get("/_stats")["requests"] == 0


def test_a_server_that_sends_no_done_is_calibrated(launch: Launcher) -> None:
    # transformers serve ends a stream with its finish chunk and no [DONE]: that answer is
    # whole, so the probe measures the backend (it once left it unmeasured, and a cold
    # pool's first real request went there to measure it)
    up = launch.upstream("up", model="m", token_delay_ms=2)
    up.post("/_control", {"style": "transformers"})
    proxy = launch.proxy([backend("up", up, models=["m"])],
                         routing={"calibrate_tokens": TOKENS})
    first = views(proxy)["up"]
    assert first["completed"] == 1 and first["throughput_curve"][0][0] == 1
    assert "calibrated backend up" in proxy.output()
