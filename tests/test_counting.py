"""Counts right for any valid JSON and any valid SSE (property tests).

Streams of each API are drawn with arbitrary JSON formatting (compact, spaced, pretty,
keys reordered or spelled with escapes, non-ASCII escaped or not), every SSE variant
(LF / CRLF / CR line ends, `data:` with or without the space, data over several lines,
comments, `event:` lines), generated text of any characters (quotes, backslashes, "data:",
`"usage":{`), with or without usage, and cut into reads at random points. The bench's
stream reader and the proxy's observer must both count exactly what was sent.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadgen.client import StreamTally
from loadgen.record import RequestRecord
from proxy.sse import CHAT, MESSAGES, RESPONSES, Framer, StreamObserver, token_counts
from tests.api_shapes import Shape
from tests.sse_styles import Style, dump, event

styles = st.builds(
    Style,
    json=st.sampled_from(["compact", "spaced", "pretty"]),
    ascii=st.booleans(),
    escape_keys=st.booleans(),
    reverse_keys=st.booleans(),
    line_end=st.sampled_from(["\n", "\r\n", "\r"]),
    data_space=st.booleans(),
    comments=st.booleans(),
    split_data=st.booleans(),
    usage=st.booleans(),
)
# generated text: any characters but surrogates, including the ones that matter to a parser
pieces = st.lists(
    st.one_of(st.text(min_size=1, max_size=12),
              st.sampled_from(['"', "\\", 'data: {"usage":{', "\n\n", "\r", '"content":"x"',
                               "\u2028", "é", "😀", '\\u0063'])),
    min_size=1, max_size=24)
PATHS = {"/v1/chat/completions": CHAT, "/v1/completions": CHAT,
         "/v1/responses": RESPONSES, "/v1/messages": MESSAGES}


@st.composite
def streams(draw: st.DrawFn, paths: tuple[str, ...] = tuple(PATHS)) -> tuple[
        str, Style, list[str], int, list[bytes]]:
    """(path, style, pieces, prompt tokens, the stream cut into reads)."""
    path = draw(st.sampled_from(paths))
    style = draw(styles)
    text = draw(pieces)
    prompt = draw(st.integers(1, 100_000))
    req = {"model": "m", "stream_options": {"include_usage": True}}
    shape = Shape(path, req, prompt, text, style)
    parts = [*shape.opening(), *(shape.token(i) for i in range(len(text))), *shape.closing()]
    whole = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=12)))
    reads = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    return path, style, text, prompt, [r for r in reads if r]


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(streams())
def test_the_proxy_counts_exactly_what_was_sent(case: tuple[Any, ...]) -> None:
    path, style, text, prompt, reads = case
    observer = StreamObserver(False, PATHS[path])
    out = b"".join(observer.feed(r, float(i)) for i, r in enumerate(reads))
    assert out + observer.flush() == b"".join(reads)  # passed on byte for byte
    assert observer.content_events == len(text)
    assert observer.first_content_at is not None
    assert observer.ended  # the last event ([DONE], response.completed, message_stop) seen
    got = token_counts(observer.usage())
    if style.usage:
        assert got == (prompt, len(text), 0)
    else:
        assert got[1] == 0  # none sent: the proxy then counts the content events


@FAST
@given(streams(("/v1/chat/completions", "/v1/completions")))
def test_the_proxy_strips_only_its_own_usage_event(case: tuple[Any, ...]) -> None:
    path, style, text, prompt, reads = case
    observer = StreamObserver(True, PATHS[path])
    out = b"".join(observer.feed(r, float(i)) for i, r in enumerate(reads)) + observer.flush()
    sent = [e.data for e in _events(b"".join(reads))]
    seen = [e.data for e in _events(out)]
    assert seen == [d for d in sent if not _usage_only(d)]
    expected = (prompt, len(text), 0) if style.usage else (0, 0, 0)
    assert token_counts(observer.usage()) == expected


@FAST
@given(streams(("/v1/chat/completions", "/v1/completions")))
def test_the_bench_counts_exactly_what_was_sent(case: tuple[Any, ...]) -> None:
    _, style, text, prompt, reads = case
    record = RequestRecord(arrival=0.0)
    tally = StreamTally(record)
    for i, raw in enumerate(reads):
        assert tally.feed(raw, 1.0 + i)
    tally.finish()
    assert record.ok, record.detail
    assert record.output_tokens == len(text)
    assert record.estimated is not style.usage
    assert record.prompt_tokens == (prompt if style.usage else 0)
    assert len(record.itl) == len(text) - 1  # one choices message per token, as vLLM
    assert record.first_content is not None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1), styles,
       st.lists(st.integers(0, 400), max_size=10))
def test_framing_follows_the_spec_whatever_the_line_ends(
        ends: list[str], style: Style, cuts: list[int]) -> None:
    values = [{"i": i, "text": "a\nb\r\"c"} for i in range(len(ends))]
    whole = b"".join(event(v, replace(style, line_end=e), name="x")
                     for v, e in zip(values, ends, strict=True))
    cuts = sorted(c for c in cuts if c <= len(whole))
    framer = Framer()
    got = [e for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)
           for e in framer.feed(whole[a:b])]
    import orjson
    assert [orjson.loads(e.data or b"") for e in got if e.data] == values
    assert all(e.name == b"x" for e in got if e.data)


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_a_name_read_apart_from_its_data_still_names_the_event(end: str) -> None:
    """A read may end just after an `event:` line (the property test above found it: the
    one-line fast path took the next read for a whole unnamed event); until the blank
    line the framer is inside that event, so a relay that ends the stream there closes
    it first."""
    framer = Framer()
    assert framer.feed(f"event: content_block_delta{end}".encode()) == []
    assert framer.inside_event
    got = framer.feed(b'data: {"a": 1}\n\n')
    assert [(e.name, e.data) for e in got] == [(b"content_block_delta", b'{"a": 1}')]
    assert not framer.inside_event


def _events(stream: bytes) -> list[Any]:
    return [e for e in Framer().feed(stream) if e.data is not None]


def _usage_only(data: bytes | None) -> bool:
    import orjson
    try:
        event = orjson.loads(data or b"")
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and event.get("choices") == [] and "usage" in event


def test_a_style_is_valid_json_and_sse() -> None:
    """The writer itself: every named style parses back to the same value."""
    import orjson

    from tests.sse_styles import STYLES
    value = {"a": [1, {"b": "x\"y\\z\u00e9"}], "c": None, "d": True, "e": 1.5}
    for name, style in STYLES.items():
        assert orjson.loads(dump(value, style)) == value, name
        framed = Framer().feed(event(value, style, "n"))
        assert [orjson.loads(e.data or b"") for e in framed if e.data] == [value], name
