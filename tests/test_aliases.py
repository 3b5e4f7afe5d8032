"""Model aliases: what a client asks for, mapped to what the pool serves (exact names
beat globs; globs in file order), listed by /v1/models in OpenAI's shape and, for a
client that sends `anthropic-version`, in Anthropic's (read here by the official SDKs)."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from pydantic import ValidationError

from proxy.aliases import Aliases
from proxy.settings import ModelSettings
from tests.conftest import EVERY_API, Launcher, backend
from tests.probes import access_records, sdk


def test_exact_names_beat_globs_and_globs_go_in_order() -> None:
    aliases = Aliases({"claude-*": "big", "claude-haiku-*": "small", "claude-opus-5-5": "x",
                       "gpt-?o": "y"})
    assert aliases.resolve("claude-opus-5-5") == "x"
    assert aliases.resolve("claude-haiku-4") == "big"  # the first glob that matches
    assert aliases.resolve("claude-sonnet") == "big"
    assert aliases.resolve("gpt-4o") == "y" and aliases.resolve("gpt-40o") == "gpt-40o"
    assert aliases.resolve("Claude-x") == "Claude-x"  # case counts
    assert dict(aliases.names) == {"claude-opus-5-5": "x"}


def test_an_alias_of_an_alias_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="not another alias: a"):
        ModelSettings(aliases={"a": "b", "b": "m"})


def test_aliases_route_list_and_explain(launch: Launcher) -> None:
    up = launch.upstream("up", model="m")
    proxy = launch.proxy([backend("up", up, apis=EVERY_API)], models={"aliases": {
        "claude-*": "m", "gpt-4o": "m", "ghost": "not-served"}})
    # a vendor name through the official SDKs reaches the backend as the served model
    reply = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0
                                ).messages.create(model="claude-opus-5-5", max_tokens=8,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert reply.content[0].type == "text"
    assert up.get("/_stats")["last_body"]["model"] == "m"
    chat = sdk(proxy).chat.completions.create(model="gpt-4o", max_tokens=4,
                                              messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content
    assert up.get("/_stats")["last_body"]["model"] == "m"
    # an alias whose model no backend serves: 404 that says so; an unknown name: 404
    resp = httpx.post(proxy.url + "/v1/chat/completions", timeout=5, json={
        "model": "ghost", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 404
    assert "alias of 'not-served'" in resp.json()["error"]["message"]
    assert httpx.post(proxy.url + "/v1/chat/completions", timeout=5, json={
        "model": "nope", "messages": []}).status_code == 404
    # listed: served models and exact aliases of them (globs and dead aliases are not)
    assert [m.id for m in sdk(proxy).models.list()] == ["m", "gpt-4o"]
    page = anthropic.Anthropic(base_url=proxy.url, api_key="unused").models.list(limit=1000)
    assert [m.id for m in page.data] == ["m", "gpt-4o"]
    assert page.data[0].type == "model" and page.data[0].created_at.year >= 2026
    raw = httpx.get(proxy.url + "/v1/models", headers={"anthropic-version": "2023-06-01"},
                    timeout=5).json()
    assert (raw["has_more"], raw["first_id"], raw["last_id"]) == (False, "m", "gpt-4o")
    # the access log has the model routed and the name the client sent
    records = access_records(proxy)
    assert records[0]["model"] == "m" and records[0]["alias"] == "claude-opus-5-5"
    assert records[1]["alias"] == "gpt-4o"
