"""Metrics, headers, health, readiness and the admin view, against real servers."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Launcher, backend
from tests.probes import gauges, wait_for

MSG = [{"role": "user", "content": "hello"}]


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_after_traffic(launch: Launcher) -> None:
    a = launch.upstream("a", token_delay_ms=5)
    proxy = launch.proxy([backend("a", a, models=["m"], max_concurrency=4)],
                         routing={"policy": "spillover"})
    sdk = OpenAI(base_url=proxy.url + "/v1", api_key="unused")
    for _ in range(3):
        list(sdk.chat.completions.create(model="m", messages=MSG, max_tokens=6, stream=True))
    sdk.completions.create(model="m", prompt="hi", max_tokens=2)
    httpx.post(proxy.url + "/v1/chat/completions", json={"model": "ghost", "messages": MSG})
    m = samples(proxy.url)
    a_ = (("backend", "a"),)
    assert m[("sluiceway_requests_total", (("backend", "a"), ("endpoint", "chat"),
                                           ("outcome", "ok")))] == 3
    assert m[("sluiceway_requests_total", (("backend", "a"), ("endpoint", "completions"),
                                           ("outcome", "ok")))] == 1
    assert m[("sluiceway_ttft_seconds_count", a_)] == 3  # streams only
    assert m[("sluiceway_request_duration_seconds_count", a_)] == 4
    assert m[("sluiceway_time_per_output_token_seconds_count", a_)] == 3
    assert m[("sluiceway_output_tokens_total", a_)] == 3 * 6 + 2
    assert m[("sluiceway_prompt_tokens_total", a_)] > 0
    assert m[("sluiceway_routing_decisions_total", (("backend", "a"),
                                                    ("policy", "spillover")))] == 4
    assert m[("sluiceway_backend_in_flight", a_)] == 0
    assert m[("sluiceway_backend_capacity", a_)] == 4
    assert m[("sluiceway_backend_healthy", a_)] == 1
    assert m[("sluiceway_queue_depth", ())] == 0
    assert m[("sluiceway_queue_wait_seconds_count", ())] == 4
    assert ("sluiceway_ttft_seconds_bucket", (("backend", "a"), ("le", "120.0"))) in m
    assert m[("sluiceway_requests_total", (("backend", "none"), ("endpoint", "chat"),
                                           ("outcome", "rejected")))] == 1  # the ghost model
    admin = httpx.get(proxy.url + "/admin/backends").json()
    entry = admin["backends"][0]
    assert admin["policy"] == "spillover"
    assert entry["completed"] == 4 and entry["ttft_s"] > 0 and entry["decode_tok_s"] > 0
    assert entry["health"] == "healthy" and entry["models"] == ["m"]


def test_one_structured_log_line_per_request(launch: Launcher) -> None:
    a = launch.upstream("a")
    proxy = launch.proxy([backend("a", a, models=["m"])])
    list(OpenAI(base_url=proxy.url + "/v1", api_key="unused").chat.completions.create(
        model="m", messages=MSG, max_tokens=4, stream=True))
    deadline = time.monotonic() + 5
    while "sluiceway.access" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    httpx.post(proxy.url + "/v1/chat/completions", json={"model": "ghost", "messages": MSG})
    deadline = time.monotonic() + 5
    while proxy.output().count("sluiceway.access") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in proxy.output().splitlines() if "sluiceway.access" in line]
    assert len(lines) == 2
    record = json.loads(lines[0].split("sluiceway.access ", 1)[1])
    assert record["backend"] == "a" and record["status"] == 200 and record["outcome"] == "ok"
    assert record["output_tokens"] == 4 and record["ttft_ms"] is not None
    assert record["duration_ms"] >= record["ttft_ms"]
    refused = json.loads(lines[1].split("sluiceway.access ", 1)[1])
    assert refused["status"] == 404 and refused["backend"] is None and "ghost" in refused["error"]


def test_ready_follows_llamacpp_loading_then_healthy(launch: Launcher) -> None:
    llama = launch.upstream("llama", slots=1, loading_s=2.5)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp", models=["m"])],
                         health={"interval_s": 0.2, "timeout_s": 1})
    assert httpx.get(proxy.url + "/health").status_code == 200
    assert httpx.get(proxy.url + "/ready").status_code == 503
    admin = httpx.get(proxy.url + "/admin/backends").json()["backends"][0]
    assert admin["health"] == "loading" and admin["capacity"] is None
    refused = httpx.post(proxy.url + "/v1/chat/completions",
                         json={"model": "m", "messages": MSG})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    deadline = time.monotonic() + 10
    while httpx.get(proxy.url + "/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(proxy.url + "/ready").json()["healthy_backends"] == ["llama"]
    admin = httpx.get(proxy.url + "/admin/backends").json()["backends"][0]
    assert admin["health"] == "healthy" and admin["capacity"] == 1
    assert admin["upstream_running"] == 0  # scraped from llamacpp:requests_processing


@pytest.mark.parametrize("name", ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"])
def test_vllm_kv_cache_fill_is_read_under_either_name(launch: Launcher, name: str) -> None:
    """vLLM renamed its KV-cache gauge with the V1 engine; either is read (the fullest of
    two engines' series) and shown in /admin/backends and /metrics."""
    up = launch.upstream("kv", kv_metric=name)
    proxy = launch.proxy([backend("v", up, kind="vllm", models=["m"])],
                         health={"interval_s": 0.2, "timeout_s": 1})
    wait_for(lambda: httpx.get(proxy.url + "/admin/backends").json()["backends"][0][
        "kv_cache_usage"] is not None)
    admin = httpx.get(proxy.url + "/admin/backends").json()["backends"][0]
    assert admin["kv_cache_usage"] == 0.25 and admin["upstream_waiting"] == 0
    assert gauges(proxy)["sluiceway_backend_kv_cache_usage"] == 0.25


def test_ready_is_503_when_every_backend_is_down(launch: Launcher) -> None:
    a = launch.upstream("a")
    proxy = launch.proxy([backend("a", a, models=["m"])],
                         health={"interval_s": 0.2, "timeout_s": 0.5})
    assert httpx.get(proxy.url + "/ready").status_code == 200
    a.kill()
    deadline = time.monotonic() + 5
    while httpx.get(proxy.url + "/ready").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(proxy.url + "/ready").status_code == 503
    assert samples(proxy.url)[("sluiceway_backend_healthy", (("backend", "a"),))] == 0
