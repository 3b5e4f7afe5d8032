"""Parsing a client request once, and building what is sent upstream for it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import orjson

from policies import RouteRequest
from proxy.errors import bad_request
from proxy.sse import CHAT, MESSAGES, RESPONSES, ContentRule


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    name: str  # the `endpoint` metric label
    asks_usage: bool = False  # streams carry usage only when asked (chat, completions)
    anthropic: bool = False  # errors in Anthropic's shape
    content: ContentRule = CHAT  # which stream events carry generated output


ROUTED: dict[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint("/v1/chat/completions", "chat", asks_usage=True),
        Endpoint("/v1/completions", "completions", asks_usage=True),
        Endpoint("/v1/embeddings", "embeddings"),
        Endpoint("/v1/responses", "responses", content=RESPONSES),
        Endpoint("/v1/messages", "messages", anthropic=True, content=MESSAGES),
        Endpoint("/v1/messages/count_tokens", "count_tokens", anthropic=True),
    )
}

# Client headers never sent upstream: hop-by-hop ones, the proxy's own credentials, and
# the ones the upstream client (proxy/h1.py) writes itself.
_DROPPED = frozenset({
    b"host", b"content-length", b"authorization", b"x-api-key", b"connection", b"keep-alive",
    b"transfer-encoding", b"te", b"trailer", b"upgrade", b"proxy-authorization",
    b"proxy-connection", b"accept-encoding", b"cookie", b"expect",
})  # names as the server hands them over: lower-cased bytes
# Session keys, in the order they are looked for (see docs/policies.md, "Session
# affinity"): headers the agents send (opencode, Claude Code, Codex, others), then body
# fields, then a hash of the conversation's first messages.
_AFFINITY_HEADERS = (
    b"x-session-affinity", b"x-claude-code-session-id", b"x-session-id", b"session-id",
    b"session_id", b"thread-id", b"conversation_id",
)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    endpoint: Endpoint
    request_id: str
    payload: dict[str, Any]
    raw: bytes
    stream: bool
    strip_usage: bool  # sluiceway asked the upstream for usage; the client did not
    headers: dict[str, str]  # what is forwarded upstream
    route: RouteRequest
    affinity_source: str | None = None  # where the session key came from (access log)
    max_tokens_key: str | None = None  # which of the output limits the client set

    def aliased(self, model: str) -> ClientRequest:
        """The request for `model`, the one an alias of the client's name stands for."""
        return replace(self, route=replace(self.route, model=model))

    def body_for(self, served_model: str | None, max_tokens: int | None = None) -> bytes:
        """The body for one backend: its model name (else the routed one: an alias
        resolved), a usage request on streams, and `max_tokens` when it must be lowered
        to fit the backend (proxy/clamp.py)."""
        model = served_model or self.route.model
        if not self.strip_usage and model == self.payload.get("model") and max_tokens is None:
            return self.raw
        payload = dict(self.payload)
        payload["model"] = model
        if max_tokens is not None and self.max_tokens_key is not None:
            payload[self.max_tokens_key] = max_tokens
        if self.strip_usage:
            options = payload.get("stream_options")
            payload["stream_options"] = {
                **(options if isinstance(options, dict) else {}), "include_usage": True
            }
        return orjson.dumps(payload)

    def headers_for(self, upstream_key: str | None) -> dict[str, str]:
        if upstream_key is None:
            return self.headers
        return {**self.headers, "Authorization": f"Bearer {upstream_key}"}


def parse(
    endpoint: Endpoint, raw: bytes, headers: list[tuple[bytes, bytes]], request_id: str
) -> ClientRequest:
    """Validate the body (400 on any problem) and derive the routing request."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise bad_request("Request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("Missing required parameter: 'model'.", param="model")
    stream = payload.get("stream") is True
    options = payload.get("stream_options")
    client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    max_tokens_key = next(
        (k for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")
         if isinstance(payload.get(k), int) and not isinstance(payload.get(k), bool)),
        None,
    )
    max_tokens = payload[max_tokens_key] if max_tokens_key else None
    forwarded = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name not in _DROPPED
    }
    forwarded["x-request-id"] = request_id
    forwarded["accept-encoding"] = "identity"
    affinity_key, affinity_source = session_key(payload, headers)
    route = RouteRequest(
        endpoint=endpoint.name,
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        prompt_chars=len(raw),
        affinity_key=affinity_key,
    )
    return ClientRequest(
        endpoint=endpoint,
        request_id=request_id,
        payload=payload,
        raw=raw,
        stream=stream,
        strip_usage=stream and endpoint.asks_usage and not client_wants_usage,
        headers=forwarded,
        route=route,
        affinity_source=affinity_source,
        max_tokens_key=max_tokens_key,
    )


def session_key(payload: dict[str, Any], headers: list[tuple[bytes, bytes]]
                ) -> tuple[str | None, str | None]:
    """(the request's session key, where it came from): the first of the session headers
    present, `prompt_cache_key`, the `session_id` inside Anthropic's `metadata.user_id`
    (Claude Code sends a JSON string there) or that string itself, `user`, else a hash of
    the conversation's first messages."""
    present = {name: value for name, value in headers if name in _AFFINITY_HEADERS and value}
    for name in _AFFINITY_HEADERS:
        if name in present:
            return present[name].decode("latin-1"), name.decode()
    key = payload.get("prompt_cache_key")
    if isinstance(key, str) and key:
        return key, "prompt_cache_key"
    metadata = payload.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str) and user_id:
        return _session_in(user_id), "metadata.user_id"
    user = payload.get("user")
    if isinstance(user, str) and user:
        return user, "user"
    # A conversation keeps its first messages (system prompt, first user turn) as it grows.
    start = payload.get("messages") or payload.get("input") or payload.get("prompt")
    if isinstance(start, list):
        start = start[:2]
    elif isinstance(start, str):
        start = start[:2048]
    else:
        return None, None
    return "h:" + hashlib.blake2b(orjson.dumps(start), digest_size=8).hexdigest(), "prefix"


def _session_in(user_id: str) -> str:
    """Claude Code's `metadata.user_id` is a JSON object in a string, with a `session_id`
    (the same for every turn of a conversation); other clients send a plain id."""
    if user_id.startswith("{"):
        try:
            inner = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            return user_id
        if isinstance(inner, dict) and isinstance(inner.get("session_id"), str):
            return str(inner["session_id"])
    return user_id
