"""Streaming parser properties (issue 2, point 5) for every chunking of a completion.

(a) events assemble to exactly the lenient non-streaming parse; (b) no DSML byte or special marker in any
content/reasoning delta; (c) a call's argument deltas concatenate to its final arguments, valid JSON;
(d) a completion cut inside a marker's bytes (U+FFFD for the cut character) leaves no trace of the marker.
"""

from __future__ import annotations

import json

import pytest
from dsv4_agent.encoding import (
    ContentDelta,
    Done,
    ReasoningDelta,
    StreamParser,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    assemble,
    parse_completion,
    render_assistant,
)
from dsv4_agent.encoding.tokens import BOS, DSML, EOS, THINK_CLOSE, THINK_OPEN
from encoding_strategies import assistant_messages, completions, cut_inside_marker, ends_in_marker_head, split
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

FORBIDDEN = (DSML, "|DSML|", "｜DSML|", "|DSML｜", EOS, BOS, THINK_OPEN, THINK_CLOSE)
PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ids(i: int) -> str:
    return f"call_{i}"


def stream(chunks, mode: str, reason: str = "stop") -> list:
    parser = StreamParser(mode, id_factory=ids)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish(reason)


def check_events(events: list, expected: dict) -> None:
    assert assemble(events) == expected  # (a)
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    args: dict[int, str] = {}
    started, ended = [], []
    for ev in events:
        if isinstance(ev, ContentDelta | ReasoningDelta):
            assert ev.text
            for marker in FORBIDDEN:  # (b)
                assert marker not in ev.text, (marker, ev.text)
        elif isinstance(ev, ToolCallStart):
            started.append(ev.index)
            args[ev.index] = ""
        elif isinstance(ev, ToolCallDelta):
            assert ev.index in args and ev.index not in ended
            args[ev.index] += ev.arguments
        elif isinstance(ev, ToolCallEnd):
            ended.append(ev.index)
            assert args[ev.index] == ev.arguments  # (c)
            assert isinstance(json.loads(ev.arguments), dict)
    assert started == list(range(len(started))) and ended == sorted(ended)
    cut = events[-1].incomplete_tool_call
    open_calls = [i for i in started if i not in ended]
    assert open_calls == ([cut["index"]] if cut and cut["id"] is not None else [])
    if cut and cut["id"] is not None:
        assert cut["arguments"] == args[cut["index"]]


@PROPERTY
@given(completions(), st.lists(st.integers(0, 400), max_size=12))
def test_any_text_chunking(case, points):
    text, mode = case
    expected = parse_completion(text, mode, id_factory=ids)
    check_events(stream(split(text, points), mode), expected)


@PROPERTY
@given(completions(), st.lists(st.integers(0, 600), max_size=12))
def test_any_byte_chunking(case, points):
    """Chunks of UTF-8 bytes, cut anywhere, including inside multi-byte characters."""
    text, mode = case
    expected = parse_completion(text, mode, id_factory=ids)
    check_events(stream(split(text.encode("utf-8"), points), mode), expected)


@settings(max_examples=200, deadline=None)
@given(completions())
def test_char_by_char(case):
    text, mode = case
    check_events(stream(list(text), mode), parse_completion(text, mode, id_factory=ids))


@PROPERTY
@given(assistant_messages(True), st.sampled_from(["chat", "thinking"]), st.data())
def test_cut_completion_never_yields_a_partial_call(message, mode, data):
    """A completion cut anywhere (finish by length) reports only the calls that were closed before the cut,
    each exactly as in the whole completion; the call being written is `incomplete_tool_call`."""
    if mode == "chat":
        message = {**message, "reasoning_content": ""}
    text = render_assistant(message, mode)
    full = parse_completion(text, mode, id_factory=ids)
    cut_at = data.draw(st.integers(0, len(text)))
    events = stream(split(text[:cut_at], data.draw(st.lists(st.integers(0, cut_at), max_size=6))), mode, "length")
    got = assemble(events)
    assert got["tool_calls"] == full["tool_calls"][:len(got["tool_calls"])]
    cut = got.get("incomplete_tool_call")
    if cut is not None:
        assert events[-1].finish_reason == "length"
        assert cut["index"] == len(got["tool_calls"]) < len(full["tool_calls"])
        if cut["name"] is not None:
            assert cut["name"] == full["tool_calls"][cut["index"]]["function"]["name"]
            assert full["tool_calls"][cut["index"]]["function"]["arguments"].startswith(cut["arguments"])


CUT = "\ufffd"  # what a UTF-8 decoder (errors="replace") writes for a cut character


@settings(PROPERTY, max_examples=300)  # four parses each
@given(cut_inside_marker(), st.lists(st.integers(0, 600), max_size=8))
def test_cut_inside_a_marker_leaves_no_trace(case, points):
    """Cut by max_tokens inside a marker's bytes and decoded with errors="replace" (as SGLang's detokenizer
    does), in every parser state: the result is that of the text cut right before the marker, from the str
    and from the bytes in any chunking, and no delta holds DSML or the U+FFFD of the cut."""
    data, before, mode = case
    # Text that ends in a marker head itself (`a<｜b`, `a</`, `||`; in a value a lone `<`) is cut there too,
    # so it is no reference.
    assume(not ends_in_marker_head(before))
    text = data.decode("utf-8", errors="replace")
    expected = parse_completion(before, mode, id_factory=ids)
    assert parse_completion(text, mode, id_factory=ids) == expected
    for chunks in (split(text, points), split(data, points)):
        events = stream(chunks, mode, "length")
        check_events(events, expected)
        for ev in events:
            piece = ev.text if isinstance(ev, ContentDelta | ReasoningDelta) else getattr(ev, "arguments", "")
            assert "DSML" not in piece and CUT not in piece, (ev, text)


@PROPERTY
@given(completions(), st.data())
def test_bytes_cut_anywhere_equal_their_replaced_text(case, data):
    """Bytes cut at any byte, in any chunking, parse as their text decoded with errors="replace"."""
    text, mode = case
    raw = text.encode("utf-8")
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    expected = parse_completion(raw.decode("utf-8", errors="replace"), mode, id_factory=ids)
    check_events(stream(split(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=8))), mode, "length"),
                 expected)


D = DSML
CALL = f'<{D}invoke name="f">\n<{D}parameter name="x" string="true">v'


@pytest.mark.parametrize(("text", "mode", "content", "reasoning", "arguments"), [
    # text / reasoning: a cut `｜` or `▁` (one U+FFFD, or two from byte-fallback decoders) after a marker head
    (f"hi\n\n<｜DSML{CUT}", "chat", "hi\n\n", "", None),
    (f"hi<{CUT}", "chat", "hi", "", None),
    (f"hi</{CUT}{CUT}", "chat", "hi", "", None),
    (f"hi<｜end{CUT}", "chat", "hi", "", None),
    (f"hi<｜end▁of▁sentence{CUT}{CUT}", "chat", "hi", "", None),
    (f"hi｜DSML{CUT}", "chat", "hi", "", None),
    (f"hi<｜DSML｜{CUT}", "chat", "hi", "", None),  # doubled closing pipe
    (f"hi｜{CUT}", "chat", "hi", "", None),
    (f"think<｜DSML{CUT}", "thinking", "", "think", None),
    (f"think</think>answer<｜begin{CUT}", "thinking", "answer", "think", None),
    # inside a tool block, a header, a value
    (f"\n\n<{D}tool_calls>\n<｜DSML{CUT}", "chat", "", "", ""),
    (f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{CUT}", "chat", "", "", ""),
    (f"{CALL}</｜DSML{CUT}", "chat", "", "", '{"x": "v'),
    (f"{CALL}<{CUT}{CUT}", "chat", "", "", '{"x": "v'),
    # cut without U+FFFD: a tag head leaves no `<`; in a block the call is still reported as cut
    ("hi<｜DS", "chat", "hi", "", None),
    (f"\n\n<{D}tool_calls>\n<｜DS", "chat", "", "", ""),
    (f'<{D}invoke name="f">\n<{D}parameter name="n" string="false">1</{D}', "chat", "", "", '{"n": '),  # no name yet
    # U+FFFD that does not continue a marker head is text
    (f"a{CUT}b{CUT}", "chat", f"a{CUT}b{CUT}", "", None),
    (f"{CUT}", "chat", CUT, "", None),
    (f"中<a{CUT}", "chat", f"中<a{CUT}", "", None),
    (f"<｜DSML{CUT}x", "chat", f"<｜DSML{CUT}x", "", None),
    (f"<｜DSML{CUT}{CUT}{CUT}", "chat", f"<｜DSML{CUT}{CUT}{CUT}", "", None),  # more than a cut character leaves
    (f"{CALL}{CUT}", "chat", "", "", f'{{"x": "v{CUT}'),
])
def test_cut_marker_cases(text, mode, content, reasoning, arguments):
    """`arguments`: those of the call cut by the end (None: no call was cut)."""
    for chunks in ([text], list(text), [text.encode("utf-8")]):
        message = assemble(stream(chunks, mode, "length"))
        assert (message["content"], message["reasoning_content"]) == (content, reasoning)
        cut = message.get("incomplete_tool_call")
        assert (None if cut is None else cut["arguments"]) == arguments


def test_cut_marker_is_held_back_while_streaming():
    parser = StreamParser("chat", id_factory=ids)
    assert parser.feed("ok ") == [ContentDelta("ok ")]
    assert parser.feed(f"<｜DSML{CUT}") == []  # maybe cut, maybe text: undecided
    assert parser.feed("!") == [ContentDelta(f"<｜DSML{CUT}!")]
    assert parser.feed(b"<\xef\xbd") == []
    assert parser.finish("length") == [Done("length")]
