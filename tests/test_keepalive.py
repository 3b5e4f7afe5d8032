"""Early headers with protocol keep-alives (`server.stream_keepalive_s`) behind a real
ingress: nginx with a 1 s read timeout in front of sluiceway, a backend that takes 2.5 s to
its first byte. Held until the first byte (the default), every stream gets nginx's 504;
with keep-alives every 0.4 s, the official SDKs and the real Claude Code read the streams
through, in each API (pings on Messages, SSE comments elsewhere). A backend that dies
after the headers went out ends the stream with an in-band error in the client's API."""

from __future__ import annotations

import threading
from pathlib import Path

import anthropic
import httpx
import pytest
from openai import APIError, OpenAI

from loadgen.local import free_port
from tests import nginx
from tests.agents.clients import CLIENTS
from tests.agents.install import install
from tests.conftest import EVERY_API, Launcher, backend
from tests.probes import access_records
from tests.processes import Server

NGINX_SERVER = """    client_body_buffer_size 4m;  # agents' bodies stay in memory
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1s;
        }}
    }}"""
PROMPT = [{"role": "user", "content": "hi"}]


def nginx_before(server: Server, launch: Launcher) -> Server:
    """nginx (Debian's; make debian-tools) proxying to `server` with a 1 s read timeout."""
    port = free_port()
    return nginx.start(launch.workdir / f"nginx-{port}", port,
                       NGINX_SERVER.format(port=port, upstream=server.port), launch.servers)


@pytest.fixture
def slow(launch: Launcher) -> Server:
    return launch.upstream("slow", model="m", first_delay_ms=2500)


def proxy_over(launch: Launcher, up: Server, keepalive_s: float) -> Server:
    proxy = launch.proxy([backend("slow", up, apis=EVERY_API)],
                         server={"stream_keepalive_s": keepalive_s})
    return nginx_before(proxy, launch)


def test_held_until_the_first_byte_a_slow_stream_times_out_at_the_ingress(
        launch: Launcher, slow: Server) -> None:
    ingress = proxy_over(launch, slow, 0)
    resp = httpx.post(ingress.url + "/v1/chat/completions", timeout=10, json={
        "model": "m", "stream": True, "max_tokens": 4, "messages": PROMPT})
    assert resp.status_code == 504  # nginx's: nothing came within its read timeout


def test_keepalives_carry_every_api_through_the_ingress(launch: Launcher, slow: Server
                                                         ) -> None:
    ingress = proxy_over(launch, slow, 0.4)
    openai = OpenAI(base_url=ingress.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    chunks = list(openai.chat.completions.create(model="m", messages=PROMPT, max_tokens=4,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with openai.responses.stream(model="m", input="hi", max_output_tokens=4) as stream:
        assert stream.get_final_response().output_text
    claude = anthropic.Anthropic(base_url=ingress.url, api_key="unused", max_retries=0)
    with claude.messages.stream(model="m", max_tokens=4, messages=PROMPT) as stream:
        assert stream.get_final_message().content[0].type == "text"
    raw = httpx.post(ingress.url + "/v1/messages", timeout=20, json={
        "model": "m", "stream": True, "max_tokens": 2, "messages": PROMPT}).text
    assert raw.startswith('event: ping\ndata: {"type": "ping"}\n\n' * 3)  # 2.5 s / 0.4 s
    raw = httpx.post(ingress.url + "/v1/chat/completions", timeout=20, json={
        "model": "m", "stream": True, "max_tokens": 2, "messages": PROMPT}).text
    assert raw.startswith(": keep-alive\n\n" * 3)
    # a whole (not streamed) reply is not committed early: the ingress times it out
    assert httpx.post(ingress.url + "/v1/chat/completions", timeout=10, json={
        "model": "m", "max_tokens": 2, "messages": PROMPT}).status_code == 504


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_a_backend_that_dies_after_early_headers_ends_the_stream_in_band(
        launch: Launcher, slow: Server, api: str) -> None:
    proxy = launch.proxy([backend("slow", slow, apis=EVERY_API)],
                         server={"stream_keepalive_s": 0.3})
    killer = threading.Timer(1.2, slow.kill)  # mid-wait, after the headers went out
    killer.start()
    if api == "chat":
        with pytest.raises(APIError):  # the openai SDK raises the in-band error event
            list(OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0).chat
                 .completions.create(model="m", messages=PROMPT, max_tokens=4, stream=True))
        killer.join(10)  # done killing before teardown stops the same process
        return
    resp = httpx.post(proxy.url + "/v1/messages", timeout=10, json={
        "model": "m", "stream": True, "max_tokens": 2, "messages": PROMPT})
    assert resp.status_code == 200  # committed before the backend died
    lines = resp.text.rstrip().splitlines()
    assert lines[0] == "event: ping" and lines[-2] == "event: error"
    assert '"type":"error"' in lines[-1].replace(" ", "")
    # the anthropic SDK raises that event, after skipping the pings
    again = launch.upstream("slow2", model="m", first_delay_ms=2500)
    proxy = launch.proxy([backend("slow2", again, apis=EVERY_API)],
                         server={"stream_keepalive_s": 0.3})
    killer.join(10)
    killer = threading.Timer(1.2, again.kill)
    killer.start()
    with pytest.raises(anthropic.APIStatusError, match=r"could not be reached|failed"), \
            anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0
                                ).messages.stream(model="m", max_tokens=2,
                                                  messages=PROMPT) as stream:
        stream.get_final_message()
    killer.join(10)


@pytest.mark.parametrize(("client", "endpoint"), [("claude", "messages"),
                                                  ("codex", "responses")])
def test_real_agents_through_the_ingress_with_keepalives(
        launch: Launcher, slow: Server, tmp_path: Path, client: str, endpoint: str) -> None:
    """Claude Code and Codex behind nginx (1 s read timeout), a backend 2.5 s from its first
    byte (Chat only: their APIs are translated). Claude Code reads the pings before
    `message_start`; Codex the comments before `response.created`."""
    proxy = launch.proxy([backend("slow", slow)], server={"stream_keepalive_s": 0.4},
                         models={"aliases": {"claude-*": "m"}})
    ingress = nginx_before(proxy, launch)
    agent = CLIENTS[client](install(), tmp_path / client, ingress.url,
                            model="m" if client == "codex" else "")
    turn = agent.turn("Say hello.")
    assert turn.returncode == 0, turn.stdout[-2000:] + turn.stderr[-3000:]
    assert "tok0" in turn.stdout  # the test upstream's words
    mine = [r for r in access_records(proxy) if r["endpoint"] == endpoint]
    assert mine and all(r["status"] == 200 and r["outcome"] == "ok" for r in mine), mine
    assert all(r["ttft_ms"] > 2000 for r in mine)  # the backend's delay, kept alive through
