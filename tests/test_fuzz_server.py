"""Fuzzing the running proxy (hypothesis): structured random requests, random byte
mutations of valid ones, and hostile JSON bodies. Whatever arrives, every connection ends
with a status or a close, the proxy keeps serving, and nothing leaks: no task, client
connection or upstream request is left behind, and memory stays bounded."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Launcher, backend
from tests.http_corpus import _responses
from tests.processes import Server
from tests.test_failures import metric, rss_mb

VALID = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         b"Content-Type: application/json\r\nContent-Length: 72\r\n\r\n"
         b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}')
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
         "/v1/messages", "/v1/models", "/health", "/ready", "/metrics", "/admin/backends",
         "/", "/v1/../admin", "/%00", "/v1/chat/completions?x=%ZZ"]
KNOWN = {200, 400, 401, 404, 405, 408, 413, 422, 431, 501, 502, 503, 504}
FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def target(module_launch: Launcher) -> Iterator[tuple[Server, Server]]:
    up = module_launch.upstream("fuzz-up")
    proxy = module_launch.proxy([backend("up", up, models=["m"])],
                                server={"max_body_mb": 1, "head_timeout_s": 2})
    baseline_tasks = metric(proxy.url, "sluiceway_event_loop_tasks")
    yield proxy, up
    # after everything: still serving, nothing left in flight anywhere
    assert httpx.post(proxy.url + "/v1/chat/completions", timeout=10, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1}).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
            metric(proxy.url, "sluiceway_client_connections ") > 1
            or metric(proxy.url, "sluiceway_event_loop_tasks") > baseline_tasks + 1
            or up.get("/_stats")["active"]):
        time.sleep(0.2)
    assert metric(proxy.url, "sluiceway_client_connections ") <= 1
    assert metric(proxy.url, "sluiceway_event_loop_tasks") <= baseline_tasks + 1
    assert up.get("/_stats")["active"] == 0
    assert metric(proxy.url, 'sluiceway_backend_in_flight{backend="up"}') == 0


def send(port: int, raw: bytes, wait_s: float = 0.5) -> tuple[list[int], bool]:
    """Send, read what comes within `wait_s`; then half-close (a request the bytes left
    unfinished must end now: the proxy takes a client's EOF as its leaving) and read to
    the close. Returns the statuses and whether the connection ended within bounds."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            return [], True  # the proxy closed on us mid-send: a close is an ending
        data, ended = b"", False
        sock.settimeout(wait_s)
        deadline = time.monotonic() + 10
        shut = False
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if shut:
                    continue
                sock.shutdown(socket.SHUT_WR)
                shut = True
                continue
            except ConnectionResetError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            data += chunk
            if _responses(data)[1] >= 1 and not shut:
                sock.shutdown(socket.SHUT_WR)  # answered: we have nothing more to say
                shut = True
        return _responses(data)[0], ended


def check(proxy: Server, raw: bytes) -> None:
    statuses, ended = send(proxy.port, raw)
    assert ended, f"the connection did not end: {raw[:200]!r}"
    assert set(statuses) <= KNOWN, f"{statuses} for {raw[:200]!r}"


TOKEN = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                       exclude_characters='()<>@,;:\\"/[]?={}'),
                min_size=1, max_size=20)
VALUE = st.binary(max_size=40)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                                   "BREW", "POST", "POST"]))
    path = draw(st.sampled_from(PATHS))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9"]))
    body = draw(st.one_of(
        st.binary(max_size=300),
        st.builds(lambda m, t, s: orjson.dumps({"model": m, "messages": [
            {"role": "user", "content": t}], "stream": s, "max_tokens": 2}),
            st.sampled_from(["m", "nope", ""]), st.text(max_size=50), st.booleans()),
    ))
    headers = [(b"Host", b"127.0.0.1")] if draw(st.booleans()) or version == "HTTP/1.1" \
        else []
    headers += [(n.encode(), v) for n, v in draw(st.lists(st.tuples(TOKEN, VALUE),
                                                           max_size=4))]
    framing = draw(st.sampled_from(["length", "short", "long", "chunked", "none"]))
    if framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif framing != "none":
        length = len(body) + {"length": 0, "short": -1, "long": 5}[framing]
        headers.append((b"Content-Length", b"%d" % max(0, length)))
    head = f"{method} {path} {version}\r\n".encode() + b"".join(
        n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + body


@FUZZ
@given(raw=requests())
def test_structured_random_requests(target: tuple[Server, Server], raw: bytes) -> None:
    check(target[0], raw)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.sampled_from(
    ["flip", "insert", "delete"]), st.integers(0, 255)), min_size=1, max_size=6))
def test_byte_mutations_of_a_valid_request(target: tuple[Server, Server],
                                           edits: list[tuple[int, str, int]]) -> None:
    raw = bytearray(VALID)
    for at, op, byte in edits:
        at = min(at, len(raw) - 1)
        if op == "flip":
            raw[at] ^= byte or 1
        elif op == "insert":
            raw.insert(at, byte)
        elif len(raw) > 1:
            del raw[at]
    check(target[0], bytes(raw))


HOSTILE = {
    "deep nesting": b'{"model":"m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge number": b'{"model":"m","messages":[],"max_tokens":1' + b"0" * 5000 + b"}",
    "huge float": b'{"model":"m","messages":[],"temperature":1e999999}',
    "invalid UTF-8": b'{"model":"m\xff\xfe","messages":[]}',
    "lone surrogate": b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
    "duplicate keys": b'{"model":"nope","model":"m","messages":[{"role":"user",'
                      b'"content":"hi"}],"max_tokens":1}',
    "a multi-megabyte string": b'{"model":"m","messages":[{"role":"user","content":"'
                               + b"x" * 3_000_000 + b'"}]}',
    "not an object": b'[{"model":"m"}]',
    "model not a string": b'{"model":{"$ne":null},"messages":[]}',
    "NaN": b'{"model":"m","messages":[],"temperature":NaN}',
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_json_gets_a_clear_error_in_bounded_memory(
        target: tuple[Server, Server], name: str) -> None:
    proxy, up = target
    before = rss_mb(proxy.proc.pid)
    resp = httpx.post(proxy.url + "/v1/chat/completions", content=HOSTILE[name],
                      headers={"content-type": "application/json"}, timeout=10)
    grown = rss_mb(proxy.proc.pid) - before
    assert grown < 30, f"{name}: RSS grew {grown:.1f} MB"
    if name == "duplicate keys":  # the last one wins, as in Python's json and orjson: the
        assert resp.status_code == 200  # request was routed for "m" (not refused as "nope")
        assert up.get("/_stats")["last_body"]["messages"][0]["content"] == "hi"
        return
    expected = 413 if name == "a multi-megabyte string" else 400
    assert resp.status_code == expected, (name, resp.status_code, resp.text[:200])
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
