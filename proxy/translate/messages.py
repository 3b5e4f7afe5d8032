"""Anthropic Messages <-> OpenAI Chat Completions, for backends that serve only Chat.

`to_chat` turns a Messages request into a Chat request; `whole_reply` turns a Chat reply
into a Messages reply; `StreamReshaper` turns a Chat SSE stream into the Messages event
sequence (`message_start`, per block `content_block_start` / `_delta` / `_stop`,
`message_delta` with the stop reason and usage, `message_stop`), the order the official
SDK's stream helper checks. Text, tool use and tool results, system prompts (the
top-level `system` and Claude Code's `role: "system"` messages), images, stop sequences,
stop reasons and usage are carried; extended thinking, cache control and server tools
(which Chat has no words for) are dropped.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.sse.framing import Framer
from proxy.translate.chat_stream import chunks

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}


def to_chat(payload: dict[str, Any]) -> dict[str, Any]:
    """The Chat Completions request for a Messages request (model and limits unchanged)."""
    messages: list[dict[str, Any]] = []
    system = _text(payload.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in payload.get("messages") or []:
        messages.extend(_chat_messages(message))
    chat: dict[str, Any] = {"model": payload.get("model"), "messages": messages}
    for source, target in (("max_tokens", "max_tokens"), ("temperature", "temperature"),
                           ("top_p", "top_p"), ("top_k", "top_k"),
                           ("stop_sequences", "stop")):
        if payload.get(source) is not None:
            chat[target] = payload[source]
    if payload.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    tools = [_chat_tool(t) for t in payload.get("tools") or []
             if isinstance(t, dict) and "input_schema" in t]
    if tools:
        chat["tools"] = tools
        choice = _tool_choice(payload.get("tool_choice"))
        if choice is not None:
            chat["tool_choice"] = choice
    return chat


def _text(content: Any) -> str:
    """A string, or the text of a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content
                         if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _chat_messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    role, content = message.get("role"), message.get("content")
    if role == "system":
        return [{"role": "system", "content": _text(content)}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = [b for b in content or [] if isinstance(b, dict)]
    if role == "assistant":
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        calls = [{"id": b.get("id"), "type": "function",
                  "function": {"name": b.get("name"),
                               "arguments": orjson.dumps(b.get("input") or {}).decode()}}
                 for b in blocks if b.get("type") == "tool_use"]
        out: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    # a user turn: tool results become tool messages (they answer the previous assistant
    # turn's calls, so they come first), the rest one user message
    results = [{"role": "tool", "tool_call_id": b.get("tool_use_id"),
                "content": _tool_result_text(b)}
               for b in blocks if b.get("type") == "tool_result"]
    parts = [_chat_part(b) for b in blocks if b.get("type") in ("text", "image")]
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        results.append({"role": "user", "content": "\n".join(p["text"] for p in parts)
                        if only_text else parts})
    return results


def _tool_result_text(block: dict[str, Any]) -> str:
    text = _text(block.get("content"))
    return f"Error: {text}" if block.get("is_error") else text


def _chat_part(block: dict[str, Any]) -> dict[str, Any]:
    if block.get("type") == "text":
        return {"type": "text", "text": block.get("text", "")}
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    else:
        url = source.get("url", "")
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    return {"input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0)}


def whole_reply(chat: dict[str, Any], model: str) -> dict[str, Any]:
    """The Messages reply for a whole Chat reply."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                        "input": _arguments(function.get("arguments"))})
    return {"id": _message_id(chat.get("id")), "type": "message", "role": "assistant",
            "model": model, "content": content,
            "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": _usage(chat.get("usage"))}


def error_reply(body: bytes) -> bytes:
    """A backend's error in the OpenAI shape, in Anthropic's."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    message = error.get("message") if isinstance(error, dict) else error
    return orjson.dumps({"type": "error", "error": {
        "type": "invalid_request_error",
        "message": message if isinstance(message, str) else body.decode("utf-8", "replace")}})


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"_raw": arguments}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def _message_id(chat_id: Any) -> str:
    return f"msg_{chat_id}" if chat_id else "msg_sluiceway"


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class StreamReshaper:
    """Feed a Chat SSE stream's bytes, get the Messages stream's bytes."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._framer = Framer()
        self._started = False
        self._index = -1  # the open content block, -1: none
        self._block: str | None = None  # "text", or "tool:<chat tool index>"
        self._stop_reason = "end_turn"
        self._usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        self._finished = False

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for data in chunks(self._framer, chunk):
            self._chunk(data, out)
        return b"".join(out)

    def _chunk(self, data: dict[str, Any], out: list[bytes]) -> None:
        if "error" in data:  # an in-band error from the backend
            out.append(_event("error", orjson.loads(error_reply(orjson.dumps(data)))))
            return
        if not self._started:
            self._started = True
            out.append(_event("message_start", {"type": "message_start", "message": {
                "id": _message_id(data.get("id")), "type": "message", "role": "assistant",
                "model": self._model, "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": dict(self._usage)}}))
        if data.get("usage"):
            self._usage = _usage(data["usage"])
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._open("text", {"type": "text", "text": ""}, out)
                out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                key = f"tool:{call.get('index', 0)}"
                if self._block != key:
                    self._open(key, {"type": "tool_use", "id": call.get("id") or key,
                                     "name": function.get("name") or "", "input": {}}, out)
                if function.get("arguments"):
                    out.append(self._delta({"type": "input_json_delta",
                                            "partial_json": function["arguments"]}))
            if choice.get("finish_reason"):
                self._stop_reason = STOP_REASONS.get(choice["finish_reason"], "end_turn")

    def _open(self, block: str, start: dict[str, Any], out: list[bytes]) -> None:
        if self._block == block:
            return
        self._close(out)
        self._index += 1
        self._block = block
        out.append(_event("content_block_start", {"type": "content_block_start",
                                                  "index": self._index,
                                                  "content_block": start}))

    def _close(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                     "index": self._index}))
            self._block = None

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta",
                                              "index": self._index, "delta": delta})

    def finish(self) -> bytes:
        """The stream's end: close the open block, the stop reason and usage, the stop."""
        if self._finished:
            return b""
        self._finished = True
        out: list[bytes] = []
        if not self._started:
            self._chunk({}, out)
        self._close(out)
        out.append(_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason, "stop_sequence": None},
            "usage": self._usage}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def error(self, body: bytes) -> bytes:
        """An in-band error (the backend failed mid-stream), in Anthropic's shape; `body`
        is already in it."""
        self._finished = True
        return b"event: error\ndata: " + body + b"\n\n"
