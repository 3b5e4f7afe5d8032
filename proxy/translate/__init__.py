"""Protocol translation: an API request routed to a backend that does not serve that API
is sent as a Chat Completions request and its reply is translated back (streamed or
whole, errors included). One module per client API (`messages`, `responses`), each with
the same four parts; `TRANSLATIONS` maps an endpoint name to its translation. Which APIs
a backend serves is `BackendConfig.apis`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.translate import messages, responses

CHAT_PATH = "/v1/chat/completions"


class Reshaper(Protocol):
    """A Chat stream in, the client API's stream out."""

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def error(self, body: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Translation:
    """The client's API spoken to a Chat-only backend."""

    api: str
    to_chat: Callable[[dict[str, Any]], dict[str, Any]]
    whole_reply: Callable[[dict[str, Any], str], dict[str, Any]]
    error_reply: Callable[[bytes], bytes]
    reshaper: Callable[[str], Reshaper]  # for the model the client asked for

    def body(self, payload: dict[str, Any], model: str, max_tokens: int | None) -> bytes:
        chat = self.to_chat(payload)
        chat["model"] = model
        if max_tokens is not None:
            chat["max_tokens"] = max_tokens
        return orjson.dumps(chat)

    def whole(self, status: int, body: bytes, model: str) -> bytes:
        """A whole Chat reply (or error) as the client's API answers it."""
        if status != 200:
            return self.error_reply(body)
        try:
            chat = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self.error_reply(body)
        return orjson.dumps(self.whole_reply(chat, model))


TRANSLATIONS: dict[str, Translation] = {
    "messages": Translation("messages", messages.to_chat, messages.whole_reply,
                            messages.error_reply, messages.StreamReshaper),
    "responses": Translation("responses", responses.to_chat, responses.whole_reply,
                             responses.error_reply, responses.StreamReshaper),
}
