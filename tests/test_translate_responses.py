"""The Responses API translated to Chat Completions for a backend that serves only Chat
(proxy/translate/responses.py): request, whole reply and stream as pure functions; then
through sluiceway with the official openai SDK (its stream helper checks the events)."""

from __future__ import annotations

import orjson
import pytest
from openai import OpenAI

from proxy.translate.responses import StreamReshaper, to_chat, whole_reply
from tests.conftest import Launcher, backend
from tests.probes import access_records, gauges
from tests.processes import Server
from tests.test_translate_messages import chat_stream


def test_the_request_carries_instructions_items_calls_and_outputs() -> None:
    chat = to_chat({
        "model": "m", "instructions": "be brief", "max_output_tokens": 50, "stream": True,
        "store": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k",
        "input": [
            {"type": "message", "role": "developer", "content": [
                {"type": "input_text", "text": "rules"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "reasoning", "summary": [], "encrypted_content": "x"},
            {"type": "function_call", "call_id": "c1", "name": "weather",
             "arguments": '{"city":"Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "weather",
             "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "5C"},
            {"type": "function_call_output", "call_id": "c2", "output": "20C"},
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "Oslo 5C, Rome 20C"}]},
        ],
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}},
                  {"type": "web_search"}, {"type": "namespace", "name": "x"}],
        "tool_choice": "auto", "parallel_tool_calls": True,
    })
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5C"},
        {"role": "tool", "tool_call_id": "c2", "content": "20C"},
        {"role": "assistant", "content": "Oslo 5C, Rome 20C"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object"}}}]
    assert (chat["tool_choice"], chat["max_tokens"], chat["parallel_tool_calls"]) == (
        "auto", 50, True)
    assert chat["stream_options"] == {"include_usage": True}
    assert not {"store", "include", "prompt_cache_key", "input"} & set(chat)
    assert to_chat({"model": "m", "input": "hi"})["messages"] == [
        {"role": "user", "content": "hi"}]


def test_a_whole_reply_and_an_incomplete_one() -> None:
    reply = whole_reply({"id": "c1", "created": 5, "choices": [{
        "finish_reason": "tool_calls", "message": {"content": "Checking.", "tool_calls": [
            {"id": "call_1", "function": {"name": "weather", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7}}, "m")
    assert [i["type"] for i in reply["output"]] == ["message", "function_call"]
    assert reply["output"][0]["content"][0]["text"] == "Checking."
    assert reply["output"][1]["call_id"] == "call_1" and reply["status"] == "completed"
    assert reply["usage"]["total_tokens"] == 19
    cut = whole_reply({"choices": [{"finish_reason": "length", "message": {"content": "x"}}]},
                      "m")
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize("cut", [1, 9, 10_000])
def test_a_stream_becomes_the_responses_event_sequence(cut: int) -> None:
    raw, reshaper, out = chat_stream(), StreamReshaper("m"), b""
    for i in range(0, len(raw), cut):
        out += reshaper.feed(raw[i:i + cut])
    out += reshaper.finish()
    events = [orjson.loads(block.split(b"\n")[1][6:]) for block in out.split(b"\n\n") if block]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = events[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == "Hello"
    assert done["output"][1]["call_id"] == "call_7"
    assert orjson.loads(done["output"][1]["arguments"]) == {"city": "Rome"}
    assert done["usage"]["input_tokens"] == 30 and done["usage"]["output_tokens"] == 9


@pytest.fixture
def chat_only(launch: Launcher) -> Server:
    emulator = launch.emulator("vllm", "vllm-fp8-aiter", speed=8, model="m")
    return launch.proxy([backend("emu", emulator, kind="vllm", apis=["chat", "completions"])])


def client(proxy: Server) -> OpenAI:
    return OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_the_openai_sdk_responses_through_a_chat_only_backend(chat_only: Server) -> None:
    whole = client(chat_only).responses.create(model="m", input="tell me a story",
                                               instructions="be terse", max_output_tokens=24)
    assert whole.output_text and whole.usage is not None and whole.usage.output_tokens > 0
    with client(chat_only).responses.stream(model="m", input="tell me a story",
                                            max_output_tokens=24) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.output_text
    assert final.usage is not None and final.usage.output_tokens > 0
    records = [r for r in access_records(chat_only) if r["endpoint"] == "responses"]
    assert [r["status"] for r in records] == [200, 200]
    assert records[1]["ttft_ms"] is not None and records[1]["output_tokens"] > 0
    assert gauges(chat_only)["sluiceway_translated_requests_total"] == 2


def test_function_calls_and_their_outputs_through_a_chat_only_backend(
        launch: Launcher) -> None:
    up = launch.upstream("up", model="m")
    proxy = launch.proxy([backend("up", up)])
    weather = {"type": "function", "name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    first = client(proxy).responses.create(model="m", input="weather in Paris?",
                                           tools=[weather], tool_choice="required")
    (call,) = first.output
    assert call.type == "function_call" and call.name == "weather"
    assert orjson.loads(call.arguments) == {"city": "Paris"}
    with client(proxy).responses.stream(model="m", input="weather in Paris?", tools=[weather],
                                        tool_choice="required") as stream:
        final = stream.get_final_response()
    assert final.output[0].type == "function_call"
    assert orjson.loads(final.output[0].arguments) == {"city": "Paris"}
    client(proxy).responses.create(model="m", max_output_tokens=4, tools=[weather], input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": "weather",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    sent = up.get("/_stats")["last_body"]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.call_id,
                                   "content": "18C"}
