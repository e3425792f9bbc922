"""The SGLang-facing detectors: stream == non-stream under any chunking, no markup in text, swallow mode."""

from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip("sglang")

from dsv4_agent.encoding import parse_completion  # noqa: E402
from dsv4_agent.encoding.tokens import THINK_CLOSE  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from sglang.srt.entrypoints.openai.protocol import Function, Tool  # noqa: E402
from sglang.srt.function_call.function_call_parser import FunctionCallParser  # noqa: E402
from sglang.srt.parser.reasoning_parser import ReasoningParser  # noqa: E402

from dsv4_agent.serve import REASONING_PARSER, TOOL_PARSER  # noqa: E402
from dsv4_agent.serve.plugin import ENABLE_ENV, register  # noqa: E402

D = "｜DSML｜"
TOOLS = [Tool(function=Function(name=n, parameters={"type": "object", "properties": {}})) for n in ("get_weather", "add")]


def _call(name: str, params: list[tuple[str, str, bool]]) -> str:
    body = "".join(f'<{D}parameter name="{k}" string="{"true" if s else "false"}">{v}</{D}parameter>\n'
                   for k, v, s in params)
    return f'<{D}invoke name="{name}">\n{body}</{D}invoke>\n'


def _block(*calls: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "".join(calls) + f"</{D}tool_calls>"


TWO_CALLS = "Checking both." + _block(_call("get_weather", [("city", "Paris", True), ("days", "3", False)]),
                                      _call("add", [("a", "1", False), ("b", "[1, 2]", False)]))


@pytest.fixture(scope="module", autouse=True)
def registered():
    old = os.environ.get(ENABLE_ENV)
    os.environ[ENABLE_ENV] = "1"
    register()
    yield
    if old is None:
        os.environ.pop(ENABLE_ENV, None)


def _stream(text: str, cuts: list[int], tools: list[Tool]) -> tuple[str, dict[int, dict[str, str]]]:
    parser = FunctionCallParser(tools, TOOL_PARSER)
    pieces, prev = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        pieces.append(text[prev:c])
        prev = c
    content, calls = [], {}
    for piece in pieces:
        normal, items = parser.parse_stream_chunk(piece)
        content.append(normal)
        for it in items:
            call = calls.setdefault(it.tool_index, {"name": "", "arguments": ""})
            call["name"] += it.name or ""
            call["arguments"] += it.parameters
    normal, items = parser.parse_stream_end()
    content.append(normal)
    for it in items:
        call = calls.setdefault(it.tool_index, {"name": "", "arguments": ""})
        call["name"] += it.name or ""
        call["arguments"] += it.parameters
    return "".join(content), calls


def test_non_stream_two_calls():
    parser = FunctionCallParser(TOOLS, TOOL_PARSER)
    assert parser.has_tool_call(TWO_CALLS)
    text, calls = parser.parse_non_stream(TWO_CALLS)
    assert text == "Checking both."
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert [json.loads(c.parameters) for c in calls] == [{"city": "Paris", "days": 3}, {"a": 1, "b": [1, 2]}]
    assert [c.tool_index for c in calls] == [0, 1]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TWO_CALLS)), max_size=12))
def test_stream_equals_non_stream_any_chunking(cuts):
    text, calls = _stream(TWO_CALLS, cuts, TOOLS)
    assert text == "Checking both."
    assert D not in text and "DSML" not in text
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "add"]
    assert [json.loads(calls[i]["arguments"]) for i in sorted(calls)] == [{"city": "Paris", "days": 3},
                                                                          {"a": 1, "b": [1, 2]}]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([*'ab<>/|｜DSML\n "=', D, "tool_calls", "invoke", "parameter"]),
                max_size=40).map("".join),
       st.lists(st.integers(min_value=0, max_value=80), max_size=6))
def test_no_markup_reaches_text_on_garbage(text, cuts):
    cuts = [c for c in cuts if c <= len(text)]
    content, _ = _stream(text, cuts, TOOLS)
    assert D not in content
    parser = FunctionCallParser(TOOLS, TOOL_PARSER)
    normal, _ = parser.parse_non_stream(text)
    assert D not in normal


def test_without_tools_markup_is_swallowed():
    parser = FunctionCallParser([], TOOL_PARSER)
    text, calls = parser.parse_non_stream(TWO_CALLS)
    assert (text, calls) == ("Checking both.", [])
    content, calls = _stream(TWO_CALLS, [3, 20, 40], [])
    assert (content, calls) == ("Checking both.", {})


def test_truncated_call_is_not_returned():
    cut = TWO_CALLS[: TWO_CALLS.index("</｜DSML｜invoke>")]
    parser = FunctionCallParser(TOOLS, TOOL_PARSER)
    text, calls = parser.parse_non_stream(cut)
    assert calls == [] and D not in text


@pytest.mark.parametrize("cuts", [[], [1], [5, 9], list(range(0, 60, 3))])
def test_reasoning_split_stream_and_non_stream(cuts):
    text = "I should call a tool.</think>" + TWO_CALLS
    one = ReasoningParser(REASONING_PARSER, stream_reasoning=False, force_reasoning=True)
    reasoning, normal = one.parse_non_stream(text)
    assert reasoning == "I should call a tool." and normal == TWO_CALLS
    streamed = ReasoningParser(REASONING_PARSER, stream_reasoning=True, force_reasoning=True)
    parts_r, parts_n, prev = [], [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        r, n = streamed.parse_stream_chunk(text[prev:c])
        parts_r.append(r or "")
        parts_n.append(n or "")
        prev = c
    r, n = streamed.parse_stream_end()
    parts_r.append(r or "")
    parts_n.append(n or "")
    assert "".join(parts_r) == reasoning and "".join(parts_n) == normal


def test_tool_block_inside_reasoning_ends_it():
    text = "thinking" + TWO_CALLS
    reasoning, normal = ReasoningParser(REASONING_PARSER, stream_reasoning=False,
                                        force_reasoning=True).parse_non_stream(text)
    assert reasoning.rstrip("\n") == "thinkingChecking both."
    assert normal.startswith(f"<{D}tool_calls>")


@pytest.mark.parametrize("text", ["Hello</think> world<think>!", "<｜begin▁of▁sentence｜>Hi", "plain DSML talk"])
def test_stray_markers_cleaned_alike_in_both_paths(text):
    parser = FunctionCallParser(TOOLS, TOOL_PARSER)
    normal, calls = parser.parse_non_stream(text)
    streamed, streamed_calls = _stream(text, [2, 7], TOOLS)
    assert normal == streamed and calls == [] and streamed_calls == {}
    assert "<think>" not in normal and "</think>" not in normal and "begin▁of▁sentence" not in normal


CUT = "\ufffd"  # what the detokenizer writes for a character cut by max_tokens
MARKER = re.compile(f"</?{D}|{re.escape(THINK_CLOSE)}")


def _cuts_inside_markers(text: str) -> list[str]:
    """`text` cut at every byte inside each marker from its second byte on (a lone `<` is text), decoded
    with errors="replace" as SGLang's detokenizer does."""
    raw, out = text.encode(), []
    for m in MARKER.finditer(text):
        start, end = len(text[:m.start()].encode()), len(text[:m.end()].encode())
        out += [raw[:cut].decode(errors="replace") for cut in range(start + 2, end)]
    return out


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_cuts_inside_markers(TWO_CALLS)), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_tool_detector_cut_inside_a_marker(text, cuts):
    """Cut inside a marker (e.g. `\\n\\n<｜DSML` + U+FFFD under a forced call): no markup or U+FFFD in content,
    no cut call, and the one-shot path (has_tool_call, detect_and_parse) agrees with the streaming one."""
    parser = FunctionCallParser(TOOLS, TOOL_PARSER)
    assert parser.has_tool_call(text)
    normal, calls = parser.parse_non_stream(text)
    content, streamed = _stream(text, [c for c in cuts if c <= len(text)], TOOLS)
    assert normal == content and normal.rstrip("\n") == "Checking both."
    done = [json.loads(c.parameters) for c in calls]
    assert done == [json.loads(streamed[i]["arguments"]) for i in range(len(calls))]
    assert done == [{"city": "Paris", "days": 3}, {"a": 1, "b": [1, 2]}][:len(done)]


@pytest.mark.parametrize("text", [f"Sure<{CUT}", f"Sure<｜end{CUT}", "Sure<｜DS", f"Sure｜DSML{CUT}{CUT}", "Sure ||"])
def test_tool_detector_drops_a_cut_marker_without_dsml_alike(text):
    """No whole marker in the text: has_tool_call still sends it through the parser, so the one-shot path
    drops the cut marker at the end as the streaming path does."""
    parser = FunctionCallParser(TOOLS, TOOL_PARSER)
    assert parser.has_tool_call(text)
    assert parser.parse_non_stream(text)[0].rstrip() == "Sure" == _stream(text, [3], TOOLS)[0].rstrip()
    assert not parser.has_tool_call(f"Sure {CUT} <b> a|b ｜ <") and not parser.has_tool_call("")


def _reason(text: str, pieces: list[int]) -> tuple[tuple[str, str], tuple[str, str]]:
    """(one-shot, streamed in the given pieces) (reasoning, normal) of the reasoning detector."""
    one = ReasoningParser(REASONING_PARSER, stream_reasoning=False, force_reasoning=True).parse_non_stream(text)
    streamed = ReasoningParser(REASONING_PARSER, stream_reasoning=True, force_reasoning=True)
    parts, prev = [], 0
    for c in [*pieces, len(text)]:
        parts.append(streamed.parse_stream_chunk(text[prev:c]))
        prev = c
    parts.append(streamed.parse_stream_end())
    return (one[0] or "", one[1] or ""), ("".join(r or "" for r, _ in parts), "".join(n or "" for _, n in parts))


@pytest.mark.parametrize(("before", "after"), [
    ("I think", "</think>The answer."),
    ("I think\n\n", f"<{D}tool_calls>\n"),  # a block at a line start: the detector hands it to the tool parser
    ("I think about ", f"<{D}tool_calls>\n"),
])
def test_reasoning_cut_inside_a_marker(before, after):
    """Reasoning cut inside `</think>` or a tool-block start, also inside `｜` (U+FFFD): the cut markup
    never reaches reasoning_content, streamed (also char by char, with the U+FFFD alone) or not."""
    for text in _cuts_inside_markers(before + after):
        for pieces in ([], list(range(1, len(text))), [len(text) - 1]):
            one, streamed = _reason(text, pieces)
            assert one == streamed == (before, ""), (text, pieces)


def test_reasoning_holds_a_cut_marker_back_until_it_is_text():
    parser = ReasoningParser(REASONING_PARSER, stream_reasoning=True, force_reasoning=True)
    assert parser.parse_stream_chunk("Hmm <｜DSML")[0] == "Hmm "
    assert parser.parse_stream_chunk(CUT)[0] == ""  # a cut tool-block start, or a real U+FFFD
    assert parser.parse_stream_chunk("!")[0] == f"<｜DSML{CUT}!"
    assert parser.parse_stream_chunk(f" and <{CUT}")[0] == " and "
    assert parser.parse_stream_end() == ("", "")


REASONING_PIECES = [*'ab <>/|｜\n"=', "\n\n", D, "|DSML|", "｜｜DSML｜｜", f"<{D}", f"</{D}", "tool_calls>", "invoke",
                    ' name="f">', "parameter", ' name="k" string="true">', "1", "<｜end▁of▁sentence｜>"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(REASONING_PIECES), max_size=30).map("".join), st.data())
def test_reasoning_never_carries_markup(text, data):
    """Reasoning soup (bare invokes, blocks inside a line, stray tags, EOS), cut at any byte and decoded with
    errors="replace": reasoning_content, streamed in any pieces or not, is what the encoding's parser makes
    of the reasoning part (whose deltas never hold a marker, tests/encoding); the rest, from a tool_calls
    block at a line start, goes to the tool parser."""
    raw = text.encode()
    text = raw[:data.draw(st.integers(0, len(raw)))].decode(errors="replace")
    (reasoning, normal), streamed = _reason(text, sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8))))
    assert (reasoning, normal) == streamed
    head = text[:len(text) - len(normal)]
    assert text.endswith(normal) and (not normal or normal.startswith(f"<{D}tool_calls>"))
    assert reasoning == parse_completion(head, "thinking")["reasoning_content"]
    assert not any(marker in reasoning for marker in ("<think>", "</think>", "<｜end▁of▁sentence｜>", f"<{D}", f"</{D}"))


def test_reasoning_drops_a_bare_invoke():
    """A bare invoke block in reasoning is not handed to the tool parser (only a tool_calls block at a line
    start is): it is swallowed, its call is not made, and no markup reaches reasoning_content."""
    text = f'Let me call.\n\n<{D}invoke name="f">\n<{D}parameter name="x" string="true">1</{D}parameter>\n</{D}invoke>\nDone.'
    assert _reason(text, [5, 30, 31]) == (("Let me call.Done.", ""),) * 2


def test_tool_block_before_think_close_ends_reasoning_in_both_paths():
    """A tool_calls block at a line start ends the reasoning also when a `</think>` follows it: the block (and
    what follows) goes to the tool parser one-shot as when streaming, instead of being swallowed as reasoning."""
    block = f'<{D}tool_calls>\n<{D}invoke name="f">\n</{D}invoke>\n</{D}tool_calls>'
    text = f"line\n{block}\nafter</think>ans"
    one, streamed = _reason(text, [3, 9, 40])
    assert one == streamed == ("line\n", f"{block}\nafter</think>ans")
