from __future__ import annotations

import pytest

from proxy.sse import CHAT, MESSAGES, RESPONSES, StreamObserver, token_counts, usage_in

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
DONE = b"data: [DONE]\n\n"


def run(observer: StreamObserver, chunks: list[bytes]) -> bytes:
    out = b"".join(observer.feed(c, float(i)) for i, c in enumerate(chunks))
    return out + observer.flush()


def test_passthrough_is_byte_for_byte_and_reads_usage() -> None:
    stream = [ROLE, TOKEN, USAGE, DONE]
    observer = StreamObserver(strip_usage=False)
    assert run(observer, stream) == b"".join(stream)
    assert observer.first_content_at == 1.0  # the role-only chunk is not content
    assert token_counts(observer.usage()) == (7, 3, 0)


@pytest.mark.parametrize("cut", [1, 5, 17, 40, 61, 90])
def test_strip_removes_only_the_usage_event_whatever_the_chunking(cut: int) -> None:
    whole = ROLE + TOKEN + USAGE + DONE
    # split the stream at an arbitrary byte, twice, so events straddle chunks
    chunks = [whole[:cut], whole[cut : cut * 2], whole[cut * 2 :]]
    observer = StreamObserver(strip_usage=True)
    assert run(observer, chunks) == ROLE + TOKEN + DONE
    assert token_counts(observer.usage()) == (7, 3, 0)


def test_content_markers_of_every_shape() -> None:
    for rule, chunk in ((CHAT, b'{"text":"a"}'), (CHAT, b'{"reasoning_content":"x"}'),
                        (CHAT, b'{"tool_calls":[{"id":1}]}'),
                        (RESPONSES, b'{"type":"response.output_text.delta","delta":"x"}'),
                        (MESSAGES, b'{"type":"content_block_delta","delta":{"text":"x"}}')):
        observer = StreamObserver(False, rule)
        observer.feed(b"data: " + chunk + b"\n\n", 5.0)
        assert observer.first_content_at == 5.0 and observer.content_events == 1, chunk
    observer = StreamObserver(strip_usage=False)
    observer.feed(b'data: {"delta":{"content":""}}\n\n', 1.0)
    assert observer.first_content_at is None and observer.content_events == 0
    # Responses repeats the whole text in its *.done events: not content again
    observer = StreamObserver(False, RESPONSES)
    observer.feed(b'event: response.output_text.done\n'
                  b'data: {"type":"response.output_text.done","text":"xy"}\n\n', 1.0)
    assert observer.content_events == 0


def test_usage_of_whole_bodies() -> None:
    assert token_counts(usage_in(b'{"usage":{"prompt_tokens":2,"completion_tokens":9}}')) == (
        2, 9, 0)
    anthropic = b'{"type":"message","usage":{"input_tokens":4,"output_tokens":6}}'
    assert token_counts(usage_in(anthropic)) == (4, 6, 0)
    # cached prompt tokens: OpenAI / llama.cpp / vLLM details, Responses, Anthropic
    openai = (b'{"usage":{"prompt_tokens":900,"completion_tokens":9,'
              b'"prompt_tokens_details":{"cached_tokens":640}}}')
    assert token_counts(usage_in(openai)) == (900, 9, 640)
    responses = (b'{"usage":{"input_tokens":50,"output_tokens":5,'
                 b'"input_tokens_details":{"cached_tokens":32}}}')
    assert token_counts(usage_in(responses)) == (50, 5, 32)
    cached = (b'{"type":"message","usage":{"input_tokens":4,"output_tokens":6,'
              b'"cache_read_input_tokens":1200}}')
    assert token_counts(usage_in(cached)) == (1204, 6, 1200)
    assert token_counts({"prompt_tokens": 3, "completion_tokens": None,
                         "prompt_tokens_details": None}) == (3, 0, 0)
    assert usage_in(b"not json") is None


FINISH = (b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],'
          b'"object":"chat.completion.chunk"}\n\n')
LLAMA_USAGE = (b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3},'
               b'"timings":{"cache_n":5,"predicted_n":3}}\n\n')


@pytest.mark.parametrize("cut", [0, 30, 60, 100, 150])
def test_llamacpp_timings_move_back_to_the_finish_chunk(cut: int) -> None:
    import orjson

    whole = TOKEN + FINISH + LLAMA_USAGE + DONE
    observer = StreamObserver(strip_usage=True)
    out = run(observer, [whole[:cut], whole[cut:]] if cut else [whole])
    events = [e for e in out.split(b"\n\n") if e]
    assert events[0] + b"\n\n" == TOKEN and events[-1] + b"\n\n" == DONE
    finish = orjson.loads(events[1][6:])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["timings"] == {"cache_n": 5, "predicted_n": 3}
    assert len(events) == 3 and b'"usage"' not in out


def test_broken_stream_keeps_whole_held_events_only() -> None:
    observer = StreamObserver(strip_usage=True)
    assert observer.feed(TOKEN + FINISH + b'data: {"cho', 0.0) == TOKEN
    assert observer.complete_events() == FINISH


def _crlf(event: bytes) -> bytes:
    return event.replace(b"\n\n", b"\r\n\r\n")


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("cut", [0, 7, 500, 3000, 3100])
def test_strip_in_long_reads_looks_at_the_end_of_each_read(crlf: bool, cut: int) -> None:
    """Reads that carry many events (a fast upstream, a busy proxy): the usage event is
    still removed and the timings still moved, in LF and CRLF streams, however split."""
    import orjson

    events = [ROLE, *[TOKEN] * 50, FINISH, LLAMA_USAGE, DONE]
    if crlf:
        events = [_crlf(e) for e in events]
    whole = b"".join(events)
    observer = StreamObserver(strip_usage=True)
    out = run(observer, [whole[:cut], whole[cut:]] if cut else [whole])
    separator = b"\r\n\r\n" if crlf else b"\n\n"
    got = [e + separator for e in out.split(separator) if e]
    assert got[:51] == events[:51] and got[-1] == events[-1] and len(got) == 53
    finish = orjson.loads(got[51][6:])
    assert finish["timings"] == {"cache_n": 5, "predicted_n": 3}
    assert b'"usage"' not in out
    assert token_counts(observer.usage()) == (7, 3, 0)


def test_an_earlier_finish_in_a_read_passes_on_in_order() -> None:
    """With several choices, one finishes while another goes on: its finish event is not
    the one the usage event follows, and leaves in its place."""
    other = FINISH.replace(b'"index":0', b'"index":1')
    events = [TOKEN, other, *[TOKEN] * 5, FINISH, USAGE, DONE]
    observer = StreamObserver(strip_usage=True)
    assert run(observer, [b"".join(events)]) == b"".join(e for e in events if e != USAGE)
