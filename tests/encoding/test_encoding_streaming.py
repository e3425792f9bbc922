"""Streaming parser properties (issue 2, point 5) for every chunking of a completion.

(a) events assemble to exactly the lenient non-streaming parse; (b) no DSML byte or special marker in any
content/reasoning delta; (c) a call's argument deltas concatenate to its final arguments, valid JSON.
"""

from __future__ import annotations

import json

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
from encoding_strategies import assistant_messages, completions, split
from hypothesis import HealthCheck, given, settings
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
