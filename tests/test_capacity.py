"""Capacity is never exceeded; the admission queue waits, then refuses with 503."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

from tests.conftest import Launcher, backend

MSG = [{"role": "user", "content": "hello"}]
BODY = {"model": "m", "messages": MSG, "max_tokens": 5}


def test_backend_with_capacity_one_never_sees_two(launch: Launcher) -> None:
    a = launch.upstream("a", token_delay_ms=20)
    proxy = launch.proxy([backend("a", a, models=["m"], max_concurrency=1)])
    sdk = OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(8) as workers:
        replies = list(workers.map(lambda _: sdk.chat.completions.create(
            model="m", messages=MSG, max_tokens=5, stream=bool(_ % 2)), range(8)))
    assert len(replies) == 8
    stats = a.get("/_stats")
    assert stats["requests"] == 8 and stats["max_active"] == 1


def test_llamacpp_slots_are_discovered_and_respected(launch: Launcher) -> None:
    llama = launch.upstream("llama", slots=2, token_delay_ms=20)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp", models=["m"])])
    admin = httpx.get(proxy.url + "/admin/backends").json()["backends"][0]
    assert admin["capacity"] == 2 and admin["capacity_source"] == "discovered"
    with ThreadPoolExecutor(10) as workers:
        statuses = list(workers.map(
            lambda _: httpx.post(proxy.url + "/v1/chat/completions", json=BODY,
                                 timeout=30).status_code, range(10)))
    assert statuses == [200] * 10
    assert llama.get("/_stats")["max_active"] == 2


def test_configured_cap_overrides_discovered_slots(launch: Launcher) -> None:
    llama = launch.upstream("llama", slots=8)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp", models=["m"],
                                  max_concurrency=3)])
    admin = httpx.get(proxy.url + "/admin/backends").json()["backends"][0]
    assert admin["capacity"] == 3 and admin["capacity_source"] == "config"


def test_queue_timeout_gives_503_with_retry_after(launch: Launcher) -> None:
    a = launch.upstream("a", token_delay_ms=400)
    proxy = launch.proxy([backend("a", a, models=["m"], max_concurrency=1)],
                         routing={"queue_timeout_s": 0.3})
    with ThreadPoolExecutor(2) as workers:
        first = workers.submit(httpx.post, proxy.url + "/v1/chat/completions", json=BODY,
                               timeout=30)
        time.sleep(0.3)
        started = time.monotonic()
        second = httpx.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=30)
        waited = time.monotonic() - started
        assert first.result().status_code == 200
    assert second.status_code == 503
    assert int(second.headers["retry-after"]) >= 1
    error = second.json()["error"]
    assert error["code"] == "no_capacity" and "waited" in error["message"]
    assert 0.25 < waited < 1.5  # it really waited in the queue, and no longer than told
    assert a.get("/_stats")["requests"] == 1  # the refused request never reached it


def test_full_queue_refuses_at_once(launch: Launcher) -> None:
    a = launch.upstream("a", token_delay_ms=300)
    proxy = launch.proxy([backend("a", a, models=["m"], max_concurrency=1)],
                         routing={"queue_size": 0})
    with ThreadPoolExecutor(2) as workers:
        first = workers.submit(httpx.post, proxy.url + "/v1/chat/completions", json=BODY,
                               timeout=30)
        time.sleep(0.3)
        second = httpx.post(proxy.url + "/v1/chat/completions", json=BODY, timeout=30)
        assert first.result().status_code == 200
    assert second.status_code == 503 and "queue is full" in second.json()["error"]["message"]


def test_queued_requests_flow_to_whichever_backend_frees_first(launch: Launcher) -> None:
    a = launch.upstream("a", token_delay_ms=30)
    b = launch.upstream("b", token_delay_ms=30)
    proxy = launch.proxy([backend("a", a, models=["m"], max_concurrency=2),
                          backend("b", b, models=["m"], max_concurrency=1)])
    with ThreadPoolExecutor(12) as workers:
        statuses = list(workers.map(
            lambda _: httpx.post(proxy.url + "/v1/chat/completions", json=BODY,
                                 timeout=30).status_code, range(12)))
    assert statuses == [200] * 12
    assert a.get("/_stats")["max_active"] == 2 and b.get("/_stats")["max_active"] == 1
    assert a.get("/_stats")["requests"] + b.get("/_stats")["requests"] == 12
