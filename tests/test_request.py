"""Parsing a client request: routing fields, the affinity key, the upstream body."""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import ProxyError
from proxy.request import ROUTED, parse

CHAT = ROUTED["/v1/chat/completions"]


def req(body: dict, headers: list[tuple[bytes, bytes]] | None = None):  # type: ignore[no-untyped-def]
    return parse(CHAT, orjson.dumps(body), headers or [], "rid")


def test_routing_fields() -> None:
    r = req({"model": "m", "stream": True, "max_completion_tokens": 9, "messages": []})
    assert (r.route.model, r.route.stream, r.route.max_tokens) == ("m", True, 9)
    assert r.strip_usage  # streaming chat without include_usage: asked for, then stripped
    asked = req({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert not asked.strip_usage


def test_affinity_key_precedence() -> None:
    body = {"model": "m", "user": "u1", "prompt_cache_key": "pk",
            "messages": [{"role": "system", "content": "s"}]}
    assert req(body, [(b"x-session-id", b"sess")]).route.affinity_key == "sess"
    assert req(body, [(b"session_id", b"codex")]).route.affinity_key == "codex"
    assert req(body).route.affinity_key == "pk"
    assert req({**body, "prompt_cache_key": None}).route.affinity_key == "u1"


def test_session_keys_the_agents_send_in_the_documented_order() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    every = [(b"conversation_id", b"conv"), (b"thread-id", b"thread"),
             (b"session_id", b"sess_"), (b"session-id", b"codex"), (b"x-session-id", b"oc"),
             (b"x-claude-code-session-id", b"cc"), (b"x-session-affinity", b"aff")]
    # whatever order they arrive in, the first of the documented order wins
    for n in range(len(every)):
        headers = every[n:]
        r = req(body, list(reversed(headers)))
        assert (r.route.affinity_key, r.affinity_source) == (
            headers[-1][1].decode(), headers[-1][0].decode())
    # Claude Code: metadata.user_id is a JSON string holding the conversation's session_id
    user_id = orjson.dumps({"device_id": "d", "session_id": "s-1"}).decode()
    r = req({**body, "metadata": {"user_id": user_id}})
    assert (r.route.affinity_key, r.affinity_source) == ("s-1", "metadata.user_id")
    r = req({**body, "metadata": {"user_id": "plain-user"}, "user": "u"})
    assert (r.route.affinity_key, r.affinity_source) == ("plain-user", "metadata.user_id")
    r = req({**body, "metadata": {"user_id": "{not json"}})
    assert r.route.affinity_key == "{not json"
    r = req({**body, "prompt_cache_key": "pk", "metadata": {"user_id": user_id}})
    assert r.affinity_source == "prompt_cache_key"
    assert req(body).affinity_source == "prefix"
    assert req({"model": "m"}).affinity_source is None


def test_affinity_hash_follows_a_growing_conversation() -> None:
    turn1 = [{"role": "system", "content": "agent"}, {"role": "user", "content": "fix x"}]
    turn2 = [*turn1, {"role": "assistant", "content": "done"}, {"role": "user", "content": "y"}]
    other = [{"role": "system", "content": "agent"}, {"role": "user", "content": "fix z"}]
    k1 = req({"model": "m", "messages": turn1}).route.affinity_key
    assert k1 is not None and k1.startswith("h:")
    assert req({"model": "m", "messages": turn2}).route.affinity_key == k1
    assert req({"model": "m", "messages": other}).route.affinity_key != k1


def test_body_rewrites_model_and_asks_for_usage_only_when_needed() -> None:
    r = req({"model": "m", "stream": True, "stream_options": {"x": 1}, "messages": []})
    sent = orjson.loads(r.body_for("served"))
    assert sent["model"] == "served"
    assert sent["stream_options"] == {"x": 1, "include_usage": True}
    plain = req({"model": "m", "messages": []})
    assert plain.body_for(None) is plain.raw  # nothing to change: the client's bytes


def test_upstream_headers_drop_credentials_and_hop_by_hop() -> None:
    r = req({"model": "m"}, [(b"authorization", b"Bearer client"), (b"connection", b"x"),
                             (b"anthropic-version", b"2023-06-01")])
    assert "authorization" not in r.headers and "connection" not in r.headers
    assert r.headers["anthropic-version"] == "2023-06-01"
    assert r.headers_for("up")["Authorization"] == "Bearer up"


@pytest.mark.parametrize("raw", [b"", b"null", b'{"model": ""}', b'{"model": ["m"]}'])
def test_bad_bodies(raw: bytes) -> None:
    with pytest.raises(ProxyError) as err:
        parse(CHAT, raw, [], "rid")
    assert err.value.status == 400
