"""The event sequences and bodies of each generation API, as vLLM 0.32 sends them
(reference/vllm-cpu.md lists the event names), for the test upstream.

A stream is an opening (events before the first token), one event per token, and a closing;
`Shape.events` gives the SSE bytes of each part. Chat and completions end with the optional
usage chunk and `data: [DONE]`; Responses and Messages name their events (`event:` lines)
and carry usage in their last events: Responses in `response.completed` (with the whole
output text beside it), Messages in `message_start` (input) and `message_delta` (output).
"""

from __future__ import annotations

import json
from typing import Any

from tests.sse_styles import Style, event


class Shape:
    """One API's stream and whole reply for a request of `prompt` tokens and `pieces`,
    its events written in `style` (tests/sse_styles.py)."""

    def __init__(self, path: str, req: dict[str, Any], prompt: int, pieces: list[str],
                 style: Style | None = None) -> None:
        self.path, self.req, self.prompt, self.pieces = path, req, prompt, pieces
        self.model = req["model"]
        self.style = style or Style()
        # Chat with tools and a tool_choice that demands a call: the reply is one call to
        # the chosen (or first) tool, its arguments streamed a few characters at a time
        self.call = _forced_call(req) if path == "/v1/chat/completions" else None
        if self.call is not None:
            args = self.call["function"]["arguments"]
            self.pieces = [args[i:i + 4] for i in range(0, len(args), 4)]
        self.n = len(self.pieces)

    def sse(self, data: Any, name: str | None = None) -> bytes:
        return event(data, self.style, name)

    # ---- streams ------------------------------------------------------------------------

    def opening(self) -> list[bytes]:
        if self.path == "/v1/responses":
            shell = self._response("in_progress", with_output=False)
            item = {"id": "msg_1", "type": "message", "role": "assistant", "status":
                    "in_progress", "content": []}
            return [self.sse({"type": "response.created", "response": shell},
                             "response.created"),
                    self.sse({"type": "response.in_progress", "response": shell},
                        "response.in_progress"),
                    self.sse({"type": "response.output_item.added", "output_index": 0,
                         "item": item}, "response.output_item.added"),
                    self.sse({"type": "response.content_part.added", "item_id": "msg_1",
                         "output_index": 0, "content_index": 0,
                         "part": {"type": "output_text", "text": "", "annotations": []}},
                        "response.content_part.added")]
        if self.path == "/v1/messages":
            message = {"id": "msg_1", "type": "message", "role": "assistant", "model":
                       self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                       "usage": {"input_tokens": self.prompt, "output_tokens": 0}}
            if not self.style.usage:
                del message["usage"]
            return [self.sse({"type": "message_start", "message": message}, "message_start"),
                    self.sse({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}},
                        "content_block_start")]
        return []

    def token(self, i: int) -> bytes:
        piece = self.pieces[i]
        if self.path == "/v1/responses":
            return self.sse({"type": "response.output_text.delta", "item_id": "msg_1",
                        "output_index": 0, "content_index": 0, "delta": piece},
                       "response.output_text.delta")
        if self.path == "/v1/messages":
            return self.sse({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
        if self.path == "/v1/chat/completions":
            delta: dict[str, Any] = {"content": piece}
            if self.call is not None:
                function = {"arguments": piece}
                if i == 0:
                    function["name"] = self.call["function"]["name"]
                delta = {"tool_calls": [{"index": 0, "function": function, **(
                    {"id": self.call["id"], "type": "function"} if i == 0 else {})}]}
            if i == 0:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        else:
            choice = {"index": 0, "text": piece, "finish_reason": None}
        return self.sse({"id": "c1", "object": self._chunk_object, "created": 0,
                         "model": self.model, "choices": [choice]})

    def closing(self) -> list[bytes]:
        if self.path == "/v1/responses":
            text = "".join(self.pieces)
            return [self.sse({"type": "response.output_text.done", "item_id": "msg_1",
                         "output_index": 0, "content_index": 0, "text": text},
                        "response.output_text.done"),
                    self.sse({"type": "response.completed",
                         "response": self._response("completed")}, "response.completed")]
        if self.path == "/v1/messages":
            ending: dict[str, Any] = {"type": "message_delta", "delta": {
                "stop_reason": "max_tokens", "stop_sequence": None}}
            if self.style.usage:
                ending["usage"] = {"output_tokens": self.n}
            return [self.sse({"type": "content_block_stop", "index": 0},
                             "content_block_stop"),
                    self.sse(ending, "message_delta"),
                    self.sse({"type": "message_stop"}, "message_stop")]
        out = []
        if self.call is not None:
            out.append(self.sse({"id": "c1", "object": self._chunk_object, "created": 0,
                                 "model": self.model, "choices": [
                                     {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
        wants_usage = (self.req.get("stream_options") or {}).get("include_usage") \
            and self.style.usage
        if not self.style.done:  # transformers serve: one last chunk, no [DONE]
            last: dict[str, Any] = {"id": "c1", "object": self._chunk_object, "created": 0,
                                    "model": self.model, "choices": [{
                                        "index": 0, "finish_reason": "length",
                                        **({"delta": {}} if self.path == "/v1/chat/completions"
                                           else {"text": ""})}]}
            if wants_usage:
                last["usage"] = self._openai_usage()
            return [*out, self.sse(last)]
        if wants_usage:
            out.append(self.sse({"id": "c1", "object": self._chunk_object, "created": 0,
                                 "model": self.model, "choices": [],
                                 "usage": self._openai_usage()}))
        return [*out, self.sse("[DONE]")]

    # ---- whole replies ------------------------------------------------------------------

    def whole(self, served_by: str) -> dict[str, Any]:
        text = "".join(self.pieces).rstrip(" ")
        if self.path == "/v1/responses":
            return self._response("completed")
        if self.path == "/v1/messages":
            return {"id": "msg_1", "type": "message", "role": "assistant", "model": self.model,
                    "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens",
                    "stop_sequence": None,
                    "usage": {"input_tokens": self.prompt, "output_tokens": self.n}}
        chat = self.path == "/v1/chat/completions"
        if self.call is not None:
            return {"id": "cmpl-1", "object": "chat.completion", "model": self.model,
                    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                        "role": "assistant", "content": None, "tool_calls": [self.call]}}],
                    "usage": self._openai_usage(), "served_by": served_by}
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "length"} if chat else
            {"index": 0, "text": text, "finish_reason": "length"})
        return {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
                "model": self.model, "choices": [choice], "usage": self._openai_usage(),
                "served_by": served_by}

    @property
    def _chunk_object(self) -> str:
        return ("chat.completion.chunk" if self.path == "/v1/chat/completions"
                else "text_completion")

    def _openai_usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.n,
                "total_tokens": self.prompt + self.n}

    def _response(self, status: str, with_output: bool = True) -> dict[str, Any]:
        output = [{"id": "msg_1", "type": "message", "role": "assistant", "status": status,
                   "content": [{"type": "output_text", "text": "".join(self.pieces),
                                "annotations": []}]}] if with_output else []
        usage = ({"input_tokens": self.prompt, "output_tokens": self.n,
                  "total_tokens": self.prompt + self.n,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}}
                 if status == "completed" and self.style.usage else None)
        return {"id": "resp_1", "object": "response", "created_at": 0, "model": self.model,
                "status": status, "output": output, "usage": usage}


def _forced_call(req: dict[str, Any]) -> dict[str, Any] | None:
    """The tool call a request with `tool_choice` "required" or a named function gets: its
    required arguments (else its first property) all set to "Paris"."""
    tools = [t.get("function") or {} for t in req.get("tools") or []]
    choice = req.get("tool_choice")
    if not tools or not (choice == "required" or isinstance(choice, dict)):
        return None
    name = choice["function"]["name"] if isinstance(choice, dict) else tools[0].get("name")
    tool = next((t for t in tools if t.get("name") == name), tools[0])
    schema = tool.get("parameters") or {}
    keys = schema.get("required") or list(schema.get("properties") or {})[:1]
    arguments = json.dumps(dict.fromkeys(keys, "Paris"))
    return {"id": "call_1", "type": "function", "function": {"name": name,
                                                            "arguments": arguments}}
