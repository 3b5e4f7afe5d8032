"""Anthropic Messages translated to Chat Completions for a backend that serves only Chat
(proxy/translate/messages.py): the request, the whole reply and the stream, as pure
functions; then through sluiceway over an emulated vLLM (the emulators speak Chat and
Completions only), read by the official anthropic SDK and its stream helper."""

from __future__ import annotations

import anthropic
import httpx
import orjson
import pytest

from proxy.translate.messages import StreamReshaper, to_chat, whole_reply
from tests.conftest import Launcher, backend
from tests.probes import access_records, gauges
from tests.processes import Server


def test_the_request_carries_system_prompts_tools_results_and_images() -> None:
    chat = to_chat({
        "model": "m", "max_tokens": 100, "stream": True, "temperature": 0.2,
        "stop_sequences": ["END"],
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "x"}}],
        "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "system", "content": "mid-conversation note"},  # Claude Code does this
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "tu1", "name": "weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tu1", "content": [
                    {"type": "text", "text": "18C"}]},
                {"type": "tool_result", "tool_use_id": "tu2", "content": "boom",
                 "is_error": True},
                {"type": "text", "text": "and this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "AAAA"}}]},
        ],
        "tools": [{"name": "weather", "description": "get it",
                   "input_schema": {"type": "object", "properties": {"city": {}}}},
                  {"type": "web_search_20250305", "name": "web_search"}],  # a server tool
        "tool_choice": {"type": "any"},
        "thinking": {"type": "adaptive"}, "metadata": {"user_id": "u"},
    })
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "system", "content": "mid-conversation note"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "tu1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "tu1", "content": "18C"},
        {"role": "tool", "tool_call_id": "tu2", "content": "Error: boom"},
        {"role": "user", "content": [
            {"type": "text", "text": "and this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "get it",
        "parameters": {"type": "object", "properties": {"city": {}}}}}]
    assert chat["tool_choice"] == "required"
    assert (chat["max_tokens"], chat["temperature"], chat["stop"]) == (100, 0.2, ["END"])
    assert chat["stream_options"] == {"include_usage": True}
    assert "thinking" not in chat and "metadata" not in chat


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}})])
def test_tool_choice(choice: dict[str, str], expected: object) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    assert to_chat({"model": "m", "messages": [], "tools": tools,
                    "tool_choice": choice})["tool_choice"] == expected


def test_a_whole_reply_with_text_and_tool_calls() -> None:
    reply = whole_reply({"id": "c1", "choices": [{"finish_reason": "tool_calls", "message": {
        "content": "Checking.", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Oslo"}'}}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7}}, "m")
    assert reply["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}}]
    assert reply["stop_reason"] == "tool_use" and reply["role"] == "assistant"
    assert reply["usage"] == {"input_tokens": 12, "output_tokens": 7}
    assert whole_reply({"choices": [{"finish_reason": "length", "message": {"content": "x"}}]},
                       "m")["stop_reason"] == "max_tokens"


def chat_stream() -> bytes:
    def sse(data: dict[str, object]) -> bytes:
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def delta(d: dict[str, object], finish: str | None = None) -> bytes:
        return sse({"id": "c9", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]})

    call = {"index": 0, "id": "call_7", "type": "function",
            "function": {"name": "weather", "arguments": ""}}
    return b"".join([
        delta({"role": "assistant", "content": ""}), delta({"content": "Hel"}),
        delta({"content": "lo"}), delta({"tool_calls": [call]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]}),
        delta({}, "tool_calls"),
        sse({"id": "c9", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 9}}),
        b"data: [DONE]\n\n"])


@pytest.mark.parametrize("cut", [1, 7, 64, 10_000])
def test_a_stream_becomes_the_messages_event_sequence_wherever_reads_end(cut: int) -> None:
    raw, reshaper, out = chat_stream(), StreamReshaper("m"), b""
    for i in range(0, len(raw), cut):
        out += reshaper.feed(raw[i:i + cut])
    out += reshaper.finish()
    events = [(block.split(b"\n")[0][7:].decode(), orjson.loads(block.split(b"\n")[1][6:]))
              for block in out.split(b"\n\n") if block]
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["delta"].get("text", "") for _, d in events if "delta" in d
                   and isinstance(d["delta"], dict))
    assert text == "Hello"
    tool_start = events[5][1]["content_block"]
    assert tool_start == {"type": "tool_use", "id": "call_7", "name": "weather", "input": {}}
    args = "".join(d["delta"]["partial_json"] for _, d in events[6:8])
    assert orjson.loads(args) == {"city": "Rome"}
    assert events[9][1]["delta"]["stop_reason"] == "tool_use"
    assert events[9][1]["usage"] == {"input_tokens": 30, "output_tokens": 9}


@pytest.fixture
def chat_only(launch: Launcher) -> Server:
    emulator = launch.emulator("vllm", "vllm-fp8-aiter", speed=8, model="m")
    return launch.proxy([backend("emu", emulator, kind="vllm", apis=["chat", "completions"])])


def test_the_anthropic_sdk_through_a_chat_only_backend(chat_only: Server) -> None:
    client = anthropic.Anthropic(base_url=chat_only.url, api_key="unused", max_retries=0)
    prompt = [{"role": "user", "content": "tell me a story"}]
    whole = client.messages.create(model="m", max_tokens=24, messages=prompt,
                                   system="you are terse")
    assert whole.content[0].type == "text" and whole.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert whole.usage.output_tokens > 0 and whole.usage.input_tokens > 0
    with client.messages.stream(model="m", max_tokens=24, messages=prompt) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text  # the helper checked the event order
    assert final.usage.output_tokens > 0
    # a backend's error comes back in Anthropic's shape
    resp = httpx.post(chat_only.url + "/v1/messages", timeout=10, json={
        "model": "m", "max_tokens": -5, "messages": prompt})
    assert resp.status_code == 400 and resp.json()["type"] == "error"
    g = gauges(chat_only)
    assert g["sluiceway_translated_requests_total"] == 3
    records = [r for r in access_records(chat_only) if r["endpoint"] == "messages"]
    assert [r["status"] for r in records] == [200, 200, 400]
    assert records[1]["ttft_ms"] is not None and records[1]["output_tokens"] > 0
    assert not records[1].get("output_tokens_estimated")


WEATHER = {"name": "weather", "description": "the weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


def test_tool_use_and_tool_results_through_a_chat_only_backend(launch: Launcher) -> None:
    """A generic backend (kind openai) serves Chat only: Claude Code's tool loop goes
    through translation both ways, read by the SDK (the test upstream calls the tool a
    request demands, in vLLM's shape)."""
    up = launch.upstream("up", model="m")
    proxy = launch.proxy([backend("up", up)])
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    whole = client.messages.create(model="m", max_tokens=64, messages=ask, tools=[WEATHER],
                                   tool_choice={"type": "any"})
    assert whole.stop_reason == "tool_use"
    (call,) = whole.content
    assert call.type == "tool_use" and call.name == "weather" and call.input == {"city": "Paris"}
    sent = up.get("/_stats")["last_body"]
    assert sent["tool_choice"] == "required" and sent["tools"][0]["function"]["name"] == "weather"
    with client.messages.stream(model="m", max_tokens=64, messages=ask, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "weather"}) as stream:
        final = stream.get_final_message()
    (streamed,) = final.content
    assert streamed.type == "tool_use" and streamed.input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    # the result goes back as a tool message after the assistant's call
    reply = client.messages.create(model="m", max_tokens=4, tools=[WEATHER], messages=[
        *ask, {"role": "assistant", "content": whole.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "18C and sunny"}]}])
    assert reply.content[0].type == "text" and reply.stop_reason == "max_tokens"
    sent = up.get("/_stats")["last_body"]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id,
                                   "content": "18C and sunny"}
    assert gauges(proxy)["sluiceway_translated_requests_total"] == 3
