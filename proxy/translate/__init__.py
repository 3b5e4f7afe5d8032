"""Protocol translation: an API request routed to a backend that does not serve that API
is sent as a Chat Completions request and its reply is translated back (streamed or
whole, errors included). One module per client API; `TRANSLATIONS` maps an endpoint name
to its translation. Which APIs a backend serves is `BackendConfig.apis`."""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from proxy.translate import messages

CHAT_PATH = "/v1/chat/completions"


class Reshaper(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def error(self, body: bytes) -> bytes: ...


class Translation:
    """The client's API spoken to a Chat-only backend."""

    def __init__(self, api: str) -> None:
        self.api = api

    def body(self, payload: dict[str, Any], model: str, max_tokens: int | None) -> bytes:
        chat = messages.to_chat(payload)
        chat["model"] = model
        if max_tokens is not None:
            chat["max_tokens"] = max_tokens
        return orjson.dumps(chat)

    def reshaper(self, model: str) -> Reshaper:
        return messages.StreamReshaper(model)

    def whole(self, status: int, body: bytes, model: str) -> bytes:
        """A whole Chat reply (or error) as the client's API answers it."""
        if status != 200:
            return messages.error_reply(body)
        try:
            chat = orjson.loads(body)
        except orjson.JSONDecodeError:
            return messages.error_reply(body)
        return orjson.dumps(messages.whole_reply(chat, model))


TRANSLATIONS: dict[str, Translation] = {"messages": Translation("messages")}
