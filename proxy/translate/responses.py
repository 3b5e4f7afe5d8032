"""OpenAI Responses <-> Chat Completions, for backends that serve only Chat (Codex CLI
speaks nothing but Responses).

`to_chat` turns a Responses request (instructions, input items: messages, function calls
and their outputs; function tools) into a Chat request; `whole_reply` turns a Chat reply
into a Response object; `StreamReshaper` turns a Chat stream into the Responses event
sequence (`response.created`, `response.in_progress`, per output item `added`, its deltas,
`done`, then `response.completed` with the whole response and its usage: Codex reads the
usage there and, without that event, sends the request again). Reasoning items, non-function
tools (web search, namespaces, shells), `store`, `include` and `prompt_cache_key` have no
Chat counterpart and are dropped; `previous_response_id` cannot be served statelessly.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson

from proxy.sse.framing import Framer
from proxy.translate.chat_stream import chunks


def to_chat(payload: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if isinstance(payload.get("instructions"), str) and payload["instructions"]:
        messages.append({"role": "system", "content": payload["instructions"]})
    items = payload.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            _add_item(item, messages)
    chat: dict[str, Any] = {"model": payload.get("model"), "messages": messages}
    for source, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                           ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls")):
        if payload.get(source) is not None:
            chat[target] = payload[source]
    if payload.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    tools = [{"type": "function", "function": {
        k: v for k, v in (("name", t.get("name")), ("description", t.get("description")),
                          ("parameters", t.get("parameters") or {"type": "object"}))
        if v is not None}}
        for t in payload.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        chat["tools"] = tools
        choice = payload.get("tool_choice")
        if choice in ("auto", "none", "required"):
            chat["tool_choice"] = choice
        elif isinstance(choice, dict) and choice.get("type") == "function":
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    return chat


def _add_item(item: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role", "user")
        role = "system" if role == "developer" else role
        messages.append({"role": role, "content": _content(item.get("content"), role)})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and \
                (last.get("tool_calls") or not last.get("content")):
            last.setdefault("tool_calls", []).append(call)  # parallel calls: one message
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": output if isinstance(output, str) else _text(output)})


def _text(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    return "".join(p.get("text", "") for p in parts or [] if isinstance(p, dict))


def _content(content: Any, role: str) -> Any:
    if isinstance(content, str) or role != "user":
        return _text(content)
    parts = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "input_image" and part.get("image_url"):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _usage(usage: Any) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    prompt, output = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens")
                                                               or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output}


def _response(rid: str, model: str, status: str, output: list[dict[str, Any]],
              usage: dict[str, Any] | None, created: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [], "error": None, "incomplete_details": None, "metadata": {},
        "usage": usage}
    if status == "incomplete":
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    return response


def _message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]
            if status == "completed" else []}


def _call_item(fid: str, call_id: str, name: str, arguments: str, status: str
               ) -> dict[str, Any]:
    return {"type": "function_call", "id": fid, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def whole_reply(chat: dict[str, Any], model: str) -> dict[str, Any]:
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    rid = str(chat.get("id") or "sluiceway")
    output = []
    if message.get("content"):
        output.append(_message_item(f"msg_{rid}", message["content"], "completed"))
    for n, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        output.append(_call_item(f"fc_{rid}_{n}", call.get("id") or f"call_{n}",
                                 function.get("name") or "", function.get("arguments") or "",
                                 "completed"))
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    return _response(f"resp_{rid}", model, status, output, _usage(chat.get("usage")),
                     int(chat.get("created") or time.time()))


def error_reply(body: bytes) -> bytes:
    """Errors are in the OpenAI shape on both APIs: as they came."""
    return body


class StreamReshaper:
    """Feed a Chat SSE stream's bytes, get the Responses stream's bytes."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._framer = Framer()
        self._seq = itertools.count()
        self._rid = "resp_sluiceway"
        self._created = int(time.time())
        self._started = False
        self._finished = False
        self._output: list[dict[str, Any]] = []  # finished items, for response.completed
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._text = ""
        self._status = "completed"
        self._usage: dict[str, Any] | None = None

    def _event(self, name: str, data: dict[str, Any]) -> bytes:
        data = {"type": name, "sequence_number": next(self._seq), **data}
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for data in chunks(self._framer, chunk):
            self._chunk(data, out)
        return b"".join(out)

    def _start(self, data: dict[str, Any], out: list[bytes]) -> None:
        self._started = True
        if data.get("id"):
            self._rid = f"resp_{data['id']}"
        shell = _response(self._rid, self._model, "in_progress", [], None, self._created)
        out.append(self._event("response.created", {"response": shell}))
        out.append(self._event("response.in_progress", {"response": shell}))

    def _chunk(self, data: dict[str, Any], out: list[bytes]) -> None:
        if "error" in data:
            out.append(self.error(orjson.dumps(data)))
            return
        if not self._started:
            self._start(data, out)
        if data.get("usage"):
            self._usage = _usage(data["usage"])
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self._open is None or self._open["type"] != "message":
                    self._close(out)
                    self._begin(_message_item(f"msg_{self._rid}_{len(self._output)}", "",
                                              "in_progress"), out)
                    out.append(self._event("response.content_part.added", {
                        **self._where(), "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}}))
                self._text += delta["content"]
                out.append(self._event("response.output_text.delta", {
                    **self._where(), "content_index": 0, "delta": delta["content"],
                    "logprobs": []}))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                if call.get("id") or self._open is None or self._open["type"] != "function_call":
                    self._close(out)
                    n = len(self._output)
                    self._begin(_call_item(f"fc_{self._rid}_{n}", call.get("id") or f"call_{n}",
                                           function.get("name") or "", "", "in_progress"), out)
                if function.get("arguments"):
                    self._text += function["arguments"]
                    out.append(self._event("response.function_call_arguments.delta", {
                        **self._where(), "delta": function["arguments"]}))
            if choice.get("finish_reason") == "length":
                self._status = "incomplete"

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._output)}

    def _begin(self, item: dict[str, Any], out: list[bytes]) -> None:
        self._open, self._text = item, ""
        out.append(self._event("response.output_item.added", {
            "output_index": len(self._output), "item": item}))

    def _close(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        where = self._where()
        if item["type"] == "message":
            part = {"type": "output_text", "text": self._text, "annotations": []}
            out.append(self._event("response.output_text.done", {
                **where, "content_index": 0, "text": self._text, "logprobs": []}))
            out.append(self._event("response.content_part.done", {
                **where, "content_index": 0, "part": part}))
            done = _message_item(item["id"], self._text, "completed")
        else:
            out.append(self._event("response.function_call_arguments.done", {
                **where, "arguments": self._text}))
            done = {**item, "arguments": self._text, "status": "completed"}
        out.append(self._event("response.output_item.done", {
            "output_index": where["output_index"], "item": done}))
        self._output.append(done)
        self._open = None

    def finish(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        out: list[bytes] = []
        if not self._started:
            self._start({}, out)
        self._close(out)
        response = _response(self._rid, self._model, self._status, self._output,
                             self._usage, self._created)
        out.append(self._event("response.completed", {"response": response}))
        return b"".join(out)

    def error(self, body: bytes) -> bytes:
        """An in-band error (OpenAI's shape in `body`) as the Responses `error` event."""
        self._finished = True
        try:
            error = orjson.loads(body).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = {}
        return self._event("error", {"code": error.get("code"),
                                     "message": error.get("message") or "upstream error",
                                     "param": error.get("param")})
