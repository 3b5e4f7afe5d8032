"""Outlier ejection: the state machine, and real backends that hang or fail under traffic."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from backends.outlier import Ejection, EjectionRule, Fault, Outlier
from tests.conftest import Launcher, backend
from tests.probes import sdk, wait_for
from tests.processes import Server
from tests.realllama.server import RealLlama
from tests.test_admin import admin_proxy
from tests.test_failures import metric

MSG = [{"role": "user", "content": "hello"}]
RULE = EjectionRule(after_failures=3, base_s=5, max_s=30)


# --- the state machine -----------------------------------------------------------------

def test_three_failures_in_a_row_eject_and_a_success_between_resets_the_count() -> None:
    o = Outlier()
    assert o.failed(RULE, True, Fault.ERROR) is None
    assert o.failed(RULE, True, Fault.ERROR) is None
    assert not o.succeeded()  # active: nothing to return, but the count starts again
    assert o.failed(RULE, True, Fault.ERROR) is None
    assert o.failed(RULE, True, Fault.ERROR) is None
    assert not o.blocked
    assert o.failed(RULE, True, Fault.ERROR) == 5
    assert o.state is Ejection.EJECTED and o.blocked


def test_backoff_doubles_while_the_trials_fail_and_is_capped() -> None:
    o = Outlier()
    for _ in range(3):
        backoff = o.failed(RULE, True, Fault.ERROR)
    seen = [backoff]
    for _ in range(4):
        o.expire()
        assert o.state is Ejection.HALF_OPEN and not o.blocked
        assert o.take() and o.blocked  # the trial: nothing else goes there meanwhile
        assert not o.take()
        seen.append(o.failed(RULE, True, Fault.ERROR))
    assert seen == [5, 10, 20, 30, 30]
    assert o.ejections_total == 5


def test_a_successful_trial_returns_the_backend_and_resets_the_backoff() -> None:
    o = Outlier()
    for _ in range(3):
        o.failed(RULE, True, Fault.ERROR)
    assert not o.succeeded()  # an old request ending well while ejected: still out
    assert o.state is Ejection.EJECTED
    o.expire()
    o.take()
    assert o.succeeded()
    assert o.state is Ejection.ACTIVE and o.ejections == 0 and not o.blocked
    for _ in range(3):
        backoff = o.failed(RULE, True, Fault.ERROR)
    assert backoff == 5


def test_a_trial_that_tells_nothing_lets_the_next_request_try() -> None:
    o = Outlier()
    for _ in range(3):
        o.failed(RULE, True, Fault.DOWN)
    o.expire()
    assert o.take()
    o.ended_neutral()  # the client left
    assert not o.blocked and o.take()


@pytest.mark.parametrize(("fault", "readmitted"), [(Fault.DOWN, True), (Fault.ERROR, False)])
def test_a_passing_probe_ends_only_an_ejection_for_being_down(fault: Fault,
                                                              readmitted: bool) -> None:
    o = Outlier()
    for _ in range(3):
        o.failed(RULE, True, fault)
    assert o.probe_passed() is readmitted
    assert o.state is (Ejection.HALF_OPEN if readmitted else Ejection.EJECTED)


def test_failures_while_ejected_do_not_change_its_cause() -> None:
    """The requests given up on an ejection (or still ending there) must not turn an
    ejection for errors into one a passing probe ends."""
    o = Outlier()
    for _ in range(3):
        o.failed(RULE, True, Fault.ERROR)
    assert o.failed(RULE, True, Fault.DOWN) is None
    assert o.last_fault is Fault.ERROR and not o.probe_passed()


def test_no_ejection_when_off_or_when_it_would_leave_a_model_without_a_backend() -> None:
    off, guarded = Outlier(), Outlier()
    for _ in range(10):
        assert off.failed(EjectionRule(after_failures=0), True, Fault.ERROR) is None
        assert guarded.failed(RULE, False, Fault.ERROR) is None
    assert off.state is guarded.state is Ejection.ACTIVE


# --- real servers ----------------------------------------------------------------------

@contextmanager
def stopped(server: Server) -> Iterator[None]:
    """SIGSTOP: the process keeps its sockets (connects still succeed) but says nothing."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def backends_view(proxy: Server) -> dict[str, Any]:
    return {b["name"]: b for b in httpx.get(proxy.url + "/admin/backends").json()["backends"]}


FAST_HEALTH = {"interval_s": 2, "timeout_s": 0.5, "failing_interval_s": 0.25,
               "eject_after_failures": 2, "ejection_s": 1}


def test_a_hung_backend_is_ejected_and_its_waiting_requests_go_elsewhere(
        launch: Launcher) -> None:
    """The issue's report: SIGSTOP one of two backends under round_robin, and every second
    request failed with 504 after the first-byte timeout. Now the requests already waiting
    on it move to the other backend once it is ejected, and no new one goes there."""
    a = launch.upstream("a", first_delay_ms=400)
    b = launch.upstream("b", first_delay_ms=400)
    proxy = launch.proxy([backend("a", a, models=["m"]), backend("b", b, models=["m"])],
                         routing={"policy": "round_robin"}, health=FAST_HEALTH,
                         timeouts={"first_byte_s": 60})
    api = sdk(proxy.url, timeout=90)

    def one(i: int) -> tuple[int, str, float]:
        started = time.monotonic()
        raw = api.chat.completions.with_raw_response.create(
            model="m", messages=MSG, max_tokens=3, stream=i % 2 == 0)
        if i % 2 == 0:
            assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            assert raw.parse().choices[0].message.content
        return raw.status_code, raw.headers["x-sluiceway-backend"], time.monotonic() - started

    with ThreadPoolExecutor(8) as workers, stopped(a):
        stopped_at = time.monotonic()
        results = list(workers.map(one, range(8)))
        wait_for(lambda: backends_view(proxy)["a"]["ejection"]["state"] != "active",
                 timeout_s=15)
        detected_s = time.monotonic() - stopped_at
        view = backends_view(proxy)["a"]
        more = list(workers.map(one, range(8)))
    assert [r[0] for r in results + more] == [200] * 16  # no 504 for anyone
    assert {r[1] for r in results + more} == {"b"}
    # those that waited on a moved on its ejection, well before the 60 s first-byte timeout
    assert max(r[2] for r in results) < 15
    assert detected_s < 15
    assert view["ejection"]["last_fault"] == "down" and view["health"] == "down"
    assert metric(proxy.url, 'sluiceway_retries_total{backend="a"}') >= 1
    assert metric(proxy.url, 'sluiceway_backend_ejections_total{backend="a"}') >= 1
    # SIGCONT: its probes pass, it is half-open, and a trial request brings it back
    wait_for(lambda: backends_view(proxy)["a"]["ejection"]["state"] != "ejected", timeout_s=15)
    served = set()
    for i in range(6):
        served.add(one(2 * i + 1)[1])
    assert served == {"a", "b"}
    assert backends_view(proxy)["a"]["ejection"]["state"] == "active"
    assert metric(proxy.url, 'sluiceway_backend_ejected{backend="a"}') == 0


def test_a_backend_answering_500s_is_ejected_until_a_trial_succeeds(launch: Launcher) -> None:
    flaky = launch.upstream("flaky")
    good = launch.upstream("good")
    proxy = launch.proxy(
        [backend("flaky", flaky, models=["m"]), backend("good", good, models=["m"])],
        routing={"policy": "round_robin"},
        health={"interval_s": 0.5, "eject_after_failures": 3, "ejection_s": 1.5})
    flaky.post("/_control", {"fail_status": 500, "fail_count": 1000})
    flaky.post("/_control", {"reset": True})
    api = sdk(proxy.url)
    for _ in range(10):  # each failure is retried on good: every client gets its answer
        raw = api.chat.completions.with_raw_response.create(model="m", messages=MSG,
                                                            max_tokens=2)
        assert raw.headers["x-sluiceway-backend"] == "good"
    # three failures ejected it; its health probes pass all along and do not bring it back
    assert flaky.get("/_stats")["requests"] == 3
    view = backends_view(proxy)["flaky"]
    assert view["ejection"]["state"] == "ejected" and view["health"] == "healthy"
    assert view["ejection"]["last_fault"] == "error"
    assert httpx.get(proxy.url + "/ready").json()["ejected_backends"] == ["flaky"]
    # the backoff ends: one trial, which fails, and it is out again for twice as long
    wait_for(lambda: backends_view(proxy)["flaky"]["ejection"]["state"] == "half_open",
             timeout_s=10)
    for _ in range(4):
        api.chat.completions.create(model="m", messages=MSG, max_tokens=2)
    assert flaky.get("/_stats")["requests"] == 4
    assert backends_view(proxy)["flaky"]["ejection"]["ejections_in_a_row"] == 2
    # healed: the next trial succeeds and it takes its share again
    flaky.post("/_control", {"fail_count": 0})
    wait_for(lambda: backends_view(proxy)["flaky"]["ejection"]["state"] == "half_open",
             timeout_s=10)
    served = [api.chat.completions.with_raw_response.create(
        model="m", messages=MSG, max_tokens=2).headers["x-sluiceway-backend"]
        for _ in range(6)]
    assert served.count("flaky") == 3
    assert backends_view(proxy)["flaky"]["ejection"]["state"] == "active"


def test_the_last_backend_of_a_model_is_never_ejected(launch: Launcher) -> None:
    only = launch.upstream("only")
    proxy = launch.proxy([backend("only", only, models=["m"])],
                         health={"eject_after_failures": 2})
    only.post("/_control", {"fail_status": 500, "fail_count": 5})
    statuses = [httpx.post(proxy.url + "/v1/chat/completions", json={
        "model": "m", "messages": MSG, "max_tokens": 1}).status_code for _ in range(6)]
    # the upstream's own 500s come through as 502s, then it answers again: never a 503
    # for want of a backend
    assert statuses == [502] * 5 + [200]
    assert backends_view(proxy)["only"]["ejection"]["state"] == "active"


def test_an_operator_readmits_an_ejected_backend(launch: Launcher) -> None:
    flaky = launch.upstream("flaky")
    good = launch.upstream("good")
    proxy, admin = admin_proxy(
        launch, [backend("flaky", flaky, models=["m"]), backend("good", good, models=["m"])],
        routing={"policy": "spillover"}, health={"eject_after_failures": 1, "ejection_s": 300})
    flaky.post("/_control", {"fail_status": 502, "fail_count": 1})
    api = sdk(proxy.url)
    api.chat.completions.create(model="m", messages=MSG, max_tokens=1)
    assert admin.backends()["flaky"]["ejection"]["seconds_left"] > 200
    resp = admin.call("POST", "/admin/backends/flaky/readmit")
    assert resp.status_code == 200 and resp.json()["ejection"]["state"] == "active"
    raw = api.chat.completions.with_raw_response.create(model="m", messages=MSG, max_tokens=1)
    assert raw.headers["x-sluiceway-backend"] == "flaky"


# --- the head timeout: a hung backend told from a long prefill ------------------------

def test_a_stream_whose_head_does_not_come_goes_elsewhere_long_before_first_byte_s(
        launch: Launcher) -> None:
    silent = launch.upstream("silent", first_delay_ms=4000)  # says nothing, head included
    good = launch.upstream("good")
    proxy = launch.proxy([backend("silent", silent, models=["m"]),
                          backend("good", good, models=["m"])],
                         routing={"policy": "spillover"},
                         timeouts={"head_s": 0.5, "first_byte_s": 60})
    started = time.monotonic()
    raw = sdk(proxy.url).chat.completions.with_raw_response.create(
        model="m", messages=MSG, max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert raw.headers["x-sluiceway-backend"] == "good"
    assert time.monotonic() - started < 3
    assert metric(proxy.url, 'sluiceway_requests_total{backend="silent",endpoint="chat",'
                             'outcome="timeout"}') == 1
    # a whole reply's head comes only with the reply: head_s does not apply to it
    raw = sdk(proxy.url).chat.completions.with_raw_response.create(
        model="m", messages=MSG, max_tokens=3)
    assert raw.headers["x-sluiceway-backend"] == "silent"


def test_a_long_prefill_on_the_real_llama_server_keeps_its_time(
        launch: Launcher, real_llama: RealLlama) -> None:
    """llama-server sends a stream's head before it prefills (measured: 3 ms for a short
    prompt, 13 ms before a 4 s prefill), so a head timeout far below the prefill time
    lets a long prompt through."""
    llama = launch.llama_server(real_llama, slots=1, ctx_per_slot=4096)
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp")],
                         timeouts={"head_s": 0.3})
    started = time.monotonic()
    first = None
    for chunk in sdk(proxy.url, timeout=120).chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "river " * 3800}],
            max_tokens=4, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
            first = time.monotonic() - started
    assert first is not None
    assert first > 0.9, f"the prefill took {first:.2f} s: too short to show anything"
    assert metric(proxy.url, 'sluiceway_requests_total{backend="llama",endpoint="chat",'
                             'outcome="ok"}') == 1
