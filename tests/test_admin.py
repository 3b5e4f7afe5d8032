"""The admin plane (FastAPI on its own port, in the proxy's process): every action against
live traffic through a real `sluiceway serve` over real upstream servers.

A drain with streams in flight loses none of them; a removal waits for the last one; an
added backend takes traffic; a reload (SIGHUP or POST) under a closed loop of streams
drops nothing, and an invalid file changes nothing."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadgen.local import free_port
from tests.conftest import Launcher, backend
from tests.probes import wait_for
from tests.processes import Server, write_config


@dataclass
class Stream:
    status: int
    backend: str
    events: int  # data lines, [DONE] included
    done: bool  # ended with [DONE]


def stream(proxy: Server, tokens: int, key: str | None = None) -> Stream:
    body = {"model": "m", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=30,
                      headers=headers) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
        return Stream(resp.status_code, resp.headers.get("x-sluiceway-backend", ""),
                      len(lines), bool(lines) and lines[-1] == "data: [DONE]")


def complete(s: Stream, tokens: int) -> bool:
    # one event per token, then [DONE] (the proxy asks for usage upstream and strips it)
    return s.status == 200 and s.done and s.events == tokens + 1


def samples(proxy: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class Admin:
    def __init__(self, port: int, key: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"x-api-key": key} if key else {}

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers=self.headers, timeout=60,
                             **kwargs)

    def backends(self) -> dict[str, dict[str, Any]]:
        resp = self.call("GET", "/admin/backends")
        assert resp.status_code == 200, resp.text
        return {b["name"]: b for b in resp.json()["backends"]}


def admin_proxy(launch: Launcher, backends: list[dict[str, Any]], key: str | None = None,
                **sections: dict[str, Any]) -> tuple[Server, Admin]:
    port = free_port()
    admin = {"port": port, **({"api_keys": [key]} if key else {})}
    proxy = launch.proxy(backends, admin=admin, **sections)
    return proxy, Admin(port, key)


def test_the_admin_plane_serves_its_own_port_with_its_own_keys(launch: Launcher) -> None:
    up = launch.upstream("up")
    proxy, admin = admin_proxy(launch, [backend("a", up, models=["m"])], key="adm",
                               server={"api_keys": ["data"]})
    # the admin key guards /admin/*; the data plane's key is not the admin's
    for headers in ({}, {"authorization": "Bearer data"}, {"x-api-key": "wrong"}):
        resp = httpx.get(admin.url + "/admin/backends", headers=headers, timeout=5)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    assert admin.backends()["a"]["health"] == "healthy"
    resp = httpx.get(admin.url + "/admin/backends/a",
                     headers={"authorization": "Bearer adm"}, timeout=5)
    assert resp.status_code == 200 and resp.json()["name"] == "a"
    resp = admin.call("GET", "/admin/backends/nope")
    assert resp.status_code == 404 and "nope" in resp.json()["error"]["message"]
    # the page, the docs and the schema hold no data: open
    assert "sluiceway" in httpx.get(admin.url + "/", timeout=5).text
    assert httpx.get(admin.url + "/docs", timeout=5).status_code == 200
    schema = httpx.get(admin.url + "/openapi.json", timeout=5).json()
    assert {"/admin/backends", "/admin/backends/{name}/drain", "/admin/reload"} \
        <= set(schema["paths"])
    # the data plane keeps its own key, and its read-only view
    assert httpx.get(proxy.url + "/admin/backends", timeout=5).status_code == 401
    resp = httpx.get(proxy.url + "/admin/backends", headers={"x-api-key": "data"}, timeout=5)
    assert resp.json()["backends"][0]["draining"] is False
    assert httpx.post(proxy.url + "/admin/backends/a/drain", headers={"x-api-key": "data"},
                      timeout=5).status_code == 404


def test_a_drain_finishes_the_streams_in_flight_and_routes_nothing_new(
        launch: Launcher) -> None:
    a = launch.upstream("a", token_delay_ms=40)  # 25 tokens: a 1 s stream
    b = launch.upstream("b", token_delay_ms=40)
    proxy, admin = admin_proxy(launch, [backend("a", a, models=["m"]),
                                        backend("b", b, models=["m"])],
                               routing={"policy": "least_loaded"})
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream, proxy, 25) for _ in range(4)]
        wait_for(lambda: a.get("/_stats")["active"] == 2 and b.get("/_stats")["active"] == 2)
        resp = admin.call("POST", "/admin/backends/a/drain", params={"wait_s": 10})
        drained = [f.result() for f in running]
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["draining"] is True and view["in_flight"] == 0  # it waited for them
    assert all(complete(s, 25) for s in drained)
    assert Counter(s.backend for s in drained) == {"a": 2, "b": 2}
    # nothing new goes to a; /ready and the metrics say so
    assert {stream(proxy, 2).backend for _ in range(4)} == {"b"}
    ready = httpx.get(proxy.url + "/ready", timeout=5).json()
    assert ready["healthy_backends"] == ["b"] and ready["draining_backends"] == ["a"]
    m = samples(proxy)
    assert m[("sluiceway_backend_draining", (("backend", "a"),))] == 1.0
    assert m[("sluiceway_backend_draining", (("backend", "b"),))] == 0.0
    assert m[("sluiceway_admin_actions_total", (("action", "drain"), ("result", "ok")))] == 1.0
    # draining every backend of a model leaves nobody to take it: a clear 503
    assert admin.call("POST", "/admin/backends/b/drain").status_code == 200
    resp = httpx.post(proxy.url + "/v1/chat/completions", timeout=5, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 503 and "error" in resp.json()
    assert httpx.get(proxy.url + "/ready", timeout=5).status_code == 503
    # undrained, a is back in rotation (first in the tie-break when both are idle)
    assert admin.call("POST", "/admin/backends/a/undrain").json()["draining"] is False
    assert admin.call("POST", "/admin/backends/b/undrain").status_code == 200
    assert stream(proxy, 2).backend == "a"
    assert admin.call("POST", "/admin/backends/zz/drain").status_code == 404


def slow_first_pair(launch: Launcher) -> tuple[Server, Server, Server, Admin]:
    """a (25 tokens take 1 s) then b, filled in that order (spillover), admin on."""
    a = launch.upstream("a", token_delay_ms=40)
    b = launch.upstream("b")
    proxy, admin = admin_proxy(launch, [backend("a", a, models=["m"]),
                                        backend("b", b, models=["m"])],
                               routing={"policy": "spillover"})
    return a, b, proxy, admin


def test_remove_waits_for_the_last_stream_and_an_added_backend_takes_traffic(
        launch: Launcher) -> None:
    a, b, proxy, admin = slow_first_pair(launch)
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(stream, proxy, 25) for _ in range(2)]
        wait_for(lambda: a.get("/_stats")["active"] == 2)
        resp = admin.call("DELETE", "/admin/backends/a", params={"wait_s": 0.1})
        assert resp.status_code == 202, resp.text  # still finishing: it leaves by itself
        assert resp.json() == {"name": "a", "removed": False, "in_flight": 2}
        assert admin.backends()["a"]["removing"] is True
        assert admin.call("POST", "/admin/backends/a/undrain").status_code == 409
        assert stream(proxy, 2).backend == "b"  # nothing new goes to a meanwhile
        finished = [f.result() for f in running]
    assert all(complete(s, 25) and s.backend == "a" for s in finished)
    wait_for(lambda: admin.call("GET", "/admin/backends/a").status_code == 404)
    assert set(admin.backends()) == {"b"}
    assert admin.call("DELETE", "/admin/backends/b").status_code == 409  # the last one
    # bad additions are refused in the error shape, naming the key
    resp = admin.call("POST", "/admin/backends", json={"name": "c", "url": "nope"})
    assert resp.status_code == 422 and "url" in resp.json()["error"]["message"]
    resp = admin.call("POST", "/admin/backends", json={"name": "c", "url": b.url, "modles": []})
    assert resp.status_code == 422 and "modles: unknown key" in resp.json()["error"]["message"]
    resp = admin.call("POST", "/admin/backends", json={"name": "b", "url": b.url})
    assert resp.status_code == 409
    # an added backend is probed before it answers, then takes traffic
    c = launch.upstream("c")
    resp = admin.call("POST", "/admin/backends", json={"name": "c", "url": c.url,
                                                       "models": ["m"]})
    assert resp.status_code == 201, resp.text
    assert resp.json()["health"] == "healthy"
    assert admin.call("POST", "/admin/backends/b/drain").status_code == 200
    assert stream(proxy, 2).backend == "c"
    m = samples(proxy)
    actions = {labels: v for (name, labels), v in m.items()
               if name == "sluiceway_admin_actions_total"}
    assert actions[(("action", "remove"), ("result", "ok"))] == 1.0
    assert actions[(("action", "remove"), ("result", "conflict"))] == 1.0
    assert actions[(("action", "add"), ("result", "ok"))] == 1.0
    assert actions[(("action", "add"), ("result", "conflict"))] == 1.0


class ClosedLoop:
    """`clients` threads sending streams back to back until stopped; every result kept."""

    def __init__(self, proxy: Server, clients: int, tokens: int) -> None:
        self.results: list[Stream | BaseException] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(clients)
        self._futures: list[Future[None]] = [
            self._pool.submit(self._client, proxy, tokens) for _ in range(clients)]
        self.tokens = tokens

    def _client(self, proxy: Server, tokens: int) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(stream(proxy, tokens))
            except httpx.HTTPError as exc:
                self.results.append(exc)

    def stop(self) -> list[Stream | BaseException]:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()
        return self.results


@pytest.mark.parametrize("trigger", ["sighup", "post"])
def test_a_reload_under_load_drops_nothing_and_a_bad_file_changes_nothing(
        launch: Launcher, trigger: str) -> None:
    a = launch.upstream("a", token_delay_ms=20)
    b = launch.upstream("b", token_delay_ms=20)
    c = launch.upstream("c", token_delay_ms=20)
    proxy, admin = admin_proxy(launch, [backend("a", a, models=["m"]),
                                        backend("b", b, models=["m"])],
                               routing={"policy": "least_loaded"})
    assert proxy.config is not None
    config_text = proxy.config.read_text()
    load = ClosedLoop(proxy, clients=4, tokens=10)  # 0.2 s streams, back to back
    try:
        wait_for(lambda: len(load.results) >= 8, timeout_s=20)
        learned_a = admin.backends()["a"]["completed"]
        # b out, c in, another policy: for new requests only
        write_config(proxy.config, {
            "health": {"interval_s": 0.5, "timeout_s": 1},
            "routing": {"policy": "round_robin", "calibrate_tokens": 0},
            "admin": {"port": int(admin.url.rsplit(":", 1)[1])},
        }, [backend("a", a, models=["m"]), backend("c", c, models=["m"])])
        if trigger == "sighup":
            proxy.proc.send_signal(signal.SIGHUP)
        else:
            resp = admin.call("POST", "/admin/reload")
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"added": ["c"], "removed": ["b"], "changed": [],
                                   "routing": True, "health": False, "timeouts": False,
                                   "models": False,
                                   "restart_needed": []}
        wait_for(lambda: set(admin.backends()) == {"a", "c"}, timeout_s=10)
        before_bad = len(load.results)
        wait_for(lambda: c.get("/_stats")["requests"] >= 4, timeout_s=10)
        # an invalid file is refused with the start-up errors; the running config stays
        proxy.config.write_text(config_text.replace("[routing]", "[routing]\npolcy = 1"))
        if trigger == "sighup":
            proxy.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload (SIGHUP) rejected" in proxy.output())
        else:
            resp = admin.call("POST", "/admin/reload")
            assert resp.status_code == 422
            assert "routing.polcy: unknown key" in resp.json()["error"]["message"]
        time.sleep(0.5)
        assert set(admin.backends()) == {"a", "c"}
        wait_for(lambda: len(load.results) >= before_bad + 8, timeout_s=20)
    finally:
        results = load.stop()
    failures = [r for r in results if not isinstance(r, Stream) or not complete(r, 10)]
    assert not failures and len(results) >= 16
    # every backend served, b only before the reload; a kept what it had learned
    by_backend = Counter(r.backend for r in results if isinstance(r, Stream))
    assert set(by_backend) == {"a", "b", "c"}
    view = admin.backends()
    assert view["a"]["completed"] >= learned_a > 0
    assert httpx.get(proxy.url + "/admin/backends", timeout=5).json()["policy"] == "round_robin"
    m = samples(proxy)
    assert m[("sluiceway_admin_actions_total", (("action", "reload"), ("result", "ok")))] == 1
    assert m[("sluiceway_admin_actions_total",
              (("action", "reload"), ("result", "rejected")))] == 1


def test_a_reload_that_changes_a_backend_keeps_or_resets_what_was_learned(
        launch: Launcher) -> None:
    a = launch.upstream("a")
    a2 = launch.upstream("a2")
    proxy, admin = admin_proxy(launch, [backend("a", a, models=["m"], max_concurrency=4)])
    assert proxy.config is not None
    for _ in range(3):
        assert complete(stream(proxy, 4), 4)
    learned = admin.backends()["a"]
    assert learned["completed"] == 3 and learned["throughput_curve"]
    admin_section = {"port": int(admin.url.rsplit(":", 1)[1])}
    sections = {"health": {"interval_s": 0.5, "timeout_s": 1},
                "routing": {"calibrate_tokens": 0}, "admin": admin_section}
    # the same server with another cap: what was learned stays
    write_config(proxy.config, sections, [backend("a", a, models=["m"], max_concurrency=2)])
    assert admin.call("POST", "/admin/reload").json()["changed"] == ["a"]
    view = admin.backends()["a"]
    assert view["capacity"] == 2 and view["completed"] == 3
    assert view["throughput_curve"] == learned["throughput_curve"]
    # another server under the same name: it starts from scratch, and takes the traffic
    write_config(proxy.config, sections, [backend("a", a2, models=["m"])])
    assert admin.call("POST", "/admin/reload").json()["changed"] == ["a"]
    view = admin.backends()["a"]
    assert view["url"] == a2.url and view["completed"] == 0 and view["throughput_curve"] == []
    wait_for(lambda: admin.backends()["a"]["health"] == "healthy")
    assert complete(stream(proxy, 4), 4)
    assert a2.get("/_stats")["requests"] == 1 and a.get("/_stats")["requests"] == 3
    # a change to [server] is reported, and waits for a restart
    write_config(proxy.config, {**sections, "server": {"max_body_mb": 1}},
                 [backend("a", a2, models=["m"])])
    assert admin.call("POST", "/admin/reload").json()["restart_needed"] == ["server"]


def test_a_reload_that_brings_back_a_backend_still_finishing_its_removal(
        launch: Launcher) -> None:
    a, _, proxy, admin = slow_first_pair(launch)
    assert proxy.config is not None
    config_text = proxy.config.read_text()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream, proxy, 25)  # 1 s on a
        wait_for(lambda: a.get("/_stats")["active"] == 1)
        assert admin.call("DELETE", "/admin/backends/a",
                          params={"wait_s": 0}).status_code == 202
        # the file still has a: the reload keeps it, with its stream
        resp = admin.call("POST", "/admin/reload")
        assert resp.status_code == 200 and resp.json()["added"] == ["a"], resp.text
        view = admin.backends()["a"]
        assert (view["removing"], view["draining"], view["in_flight"]) == (False, False, 1)
        assert complete(running.result(), 25)
    assert proxy.config.read_text() == config_text
    assert stream(proxy, 2).backend == "a"  # first in spillover order again
