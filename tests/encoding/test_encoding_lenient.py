"""Each lenient recovery of `parse_completion` / `StreamParser` (documented in encoding/README.md)."""

from __future__ import annotations

import json

import pytest
from dsv4_agent.encoding import (
    ContentDelta,
    Done,
    ReasoningDelta,
    StreamParser,
    ToolCallDelta,
    ToolCallStart,
    assemble,
    parse_completion,
)
from dsv4_agent.encoding.tokens import BOS, DSML, EOS

D = DSML
CALL = (f'<{D}invoke name="get">\n<{D}parameter name="city" string="true">Oslo</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>')
BLOCK = f"\n\n<{D}tool_calls>\n{CALL}\n</{D}tool_calls>"
ARGS = '{"city": "Oslo", "days": 3}'


def ids(i: int) -> str:
    return f"call_{i}"


def lenient(text: str, mode: str = "thinking") -> dict:
    return parse_completion(text, mode, id_factory=ids)


def calls(message: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def test_strict_is_the_reference_and_lenient_agrees():
    text = f"r</think>c{BLOCK}{EOS}"
    strict = parse_completion(text, "thinking", strict=True)
    assert strict == {"role": "assistant", "content": "c", "reasoning_content": "r",
                      "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": ARGS}}]}
    got = lenient(text)
    assert got["tool_calls"][0] == {"id": "call_0", "type": "function", "function": {"name": "get", "arguments": ARGS}}
    assert "incomplete_tool_call" not in got


def test_missing_eos_is_end_of_text():
    assert lenient("hello", "chat")["content"] == "hello"
    assert lenient("r</think>answer")["content"] == "answer"


def test_missing_think_close_means_all_reasoning():
    got = lenient("still thinking")
    assert got["reasoning_content"] == "still thinking" and got["content"] == ""


@pytest.mark.parametrize("dsml", ["|DSML|", "｜DSML|", "|DSML｜", "｜｜DSML｜｜", "||DSML||"])
def test_pipe_lookalikes_are_tool_calls(dsml):
    got = lenient(f"r</think>{BLOCK.replace(DSML, dsml)}{EOS}")
    assert calls(got) == [("get", ARGS)] and got["content"] == ""


def test_bare_invoke_without_wrapper():
    got = lenient(f"r</think>text\n\n{CALL}{EOS}")
    assert calls(got) == [("get", ARGS)] and got["content"] == "text"


def test_text_after_bare_invoke_is_content():
    got = lenient(f"r</think>{CALL}\n\nafter{EOS}")
    assert calls(got) == [("get", ARGS)] and got["content"] == "after"


def test_dsml_inside_reasoning():
    got = lenient(f"plan{BLOCK}</think>{EOS}")
    assert got["reasoning_content"] == "plan" and calls(got) == [("get", ARGS)]
    got = lenient(f"plan{BLOCK}{EOS}")  # no </think> at all
    assert got["reasoning_content"] == "plan" and calls(got) == [("get", ARGS)]


def test_mentioning_dsml_in_text_is_not_a_call_and_leaks_nothing():
    got = lenient(f"I will write <{D}invoke> later.</think>ok{EOS}")
    assert got["reasoning_content"] == "I will write  later." and got["content"] == "ok" and not got["tool_calls"]


def test_typed_value_that_is_not_json_becomes_a_string():
    text = f'</think>\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="x" string="false">hello world</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
    assert json.loads(lenient(text)["tool_calls"][0]["function"]["arguments"]) == {"x": "hello world"}
    for raw, value in (("NaN", "NaN"), ("", ""), ("[1,", "[1,")):
        got = lenient(text.replace("hello world", raw))
        assert json.loads(got["tool_calls"][0]["function"]["arguments"]) == {"x": value}


def test_valid_typed_value_is_kept_verbatim():
    text = f'</think>\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="x" string="false"> [1,2] </{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
    assert lenient(text)["tool_calls"][0]["function"]["arguments"] == '{"x":  [1,2] }'


def test_missing_or_odd_string_attribute_is_typed():
    text = f'</think>\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="n">5</{D}parameter>\n<{D}parameter name="s" string="yes">a</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
    assert json.loads(lenient(text)["tool_calls"][0]["function"]["arguments"]) == {"n": 5, "s": "a"}


def test_duplicate_parameter_keeps_the_first():
    text = (f'</think>\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">1</{D}parameter>\n'
            f'<{D}parameter name="a" string="true">2</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>{EOS}')
    assert calls(lenient(text)) == [("f", '{"a": "1"}')]


@pytest.mark.parametrize("lead", ["\n", "", "\n\n\n"])
def test_block_without_the_blank_line(lead):
    got = lenient(f"r</think>ok{lead}<{D}tool_calls>\n{CALL}\n</{D}tool_calls>{EOS}")
    assert calls(got) == [("get", ARGS)]
    assert got["content"] == "ok" + lead[2:]  # only two LF belong to the block's lead-in


def test_free_whitespace_extra_attributes_misspelled_block():
    text = (f'</think>\n\n<{D}toolcalls>\n  <{D}invoke name="get" id="1">\n\t<{D}parameter string="true" name="city">Oslo'
            f'</{D}parameter>   <{D}parameter name="days" string="false">3</{D}parameter>\n  </{D}invoke>\n</{D}toolcalls>{EOS}')
    assert calls(lenient(text)) == [("get", ARGS)]


def test_unclosed_parameter_and_invoke_are_closed_by_the_next_tag():
    text = (f'</think>\n\n<{D}tool_calls>\n<{D}invoke name="a">\n<{D}parameter name="x" string="true">1\n'
            f'<{D}invoke name="b">\n</{D}invoke>\n</{D}tool_calls>')
    assert calls(lenient(text)) == [("a", '{"x": "1\\n"}'), ("b", "{}")]


def test_text_after_the_block_and_second_block():
    got = lenient(f"r</think>{BLOCK}\nDone.{BLOCK}{EOS}")
    assert got["content"] == "Done." and len(got["tool_calls"]) == 2


def test_stray_markers_are_removed():
    assert lenient(f"<think>r</think>a{BOS}b</think>c{EOS}") == {
        "role": "assistant", "content": "abc", "reasoning_content": "r", "tool_calls": []}
    assert lenient(f"x｜DSML｜y</{D}parameter>z", "chat")["content"] == "xyz"


def test_removed_marker_never_glues_into_one():
    parser = StreamParser("chat")
    events = parser.feed("x｜DSML<think>｜y") + parser.finish()
    assert [e.text for e in events if isinstance(e, ContentDelta)] == ["x｜DSML", "｜y"]


def test_text_after_eos_is_ignored():
    assert lenient(f"done{EOS}extra<｜User｜>", "chat")["content"] == "done"


@pytest.mark.parametrize("cut", [len("r</think>\n\n<" + D + "tool_calls"), len("r</think>\n\n<" + D + "tool_calls>\n<" + D + "inv")])
def test_cut_before_the_name_is_an_unnamed_incomplete_call(cut):
    got = lenient(f"r</think>{BLOCK}"[:cut])
    assert got["tool_calls"] == [] and got["incomplete_tool_call"] == {"index": 0, "id": None, "name": None, "arguments": ""}


def test_cut_inside_a_call_is_incomplete_never_complete():
    text = f"r</think>{BLOCK}"
    cut = text.index("Oslo") + 2
    parser = StreamParser("thinking", id_factory=ids)
    events = parser.feed(text[:cut]) + parser.finish("length")
    got = assemble(events)
    assert got["tool_calls"] == []
    assert got["incomplete_tool_call"] == {"index": 0, "id": "call_0", "name": "get", "arguments": '{"city": "Os'}
    assert events[-1] == Done("length", got["incomplete_tool_call"])
    # the reference would have returned a complete call for a cut right after the invoke header
    header_cut = text.index("<" + D + "parameter")
    assert parse_completion(text[:header_cut], "thinking", strict=True)["tool_calls"]
    assert lenient(text[:header_cut])["tool_calls"] == []


def test_finish_reason():
    def reason(text, given):
        parser = StreamParser("thinking")
        parser.feed(text)
        return parser.finish(given)[-1].finish_reason
    assert reason(f"r</think>{BLOCK}{EOS}", "stop") == "tool_calls"
    assert reason(f"r</think>hi{EOS}", "stop") == "stop"
    assert reason("r</think>hi", "length") == "length"


def test_streaming_emits_arguments_incrementally_and_holds_only_markup():
    parser = StreamParser("thinking", id_factory=ids)
    assert parser.feed("r</thi") == [ReasoningDelta("r")]  # `</thi` may become </think>: held back
    events = parser.feed("nk>Hello\n")
    assert [e.text for e in events if isinstance(e, ContentDelta)] == ["Hello"]  # the LF may start a block
    events = parser.feed("\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Os")
    assert ToolCallStart(0, "call_0", "get") in events
    assert "".join(e.arguments for e in events if isinstance(e, ToolCallDelta)) == '{"city": "Os'
    assert not [e for e in events if isinstance(e, ContentDelta)]


def test_bytes_split_inside_a_character():
    data = f"r</think>é中😀{EOS}".encode()
    parser = StreamParser("thinking")
    events = [e for i in range(len(data)) for e in parser.feed(data[i:i + 1])] + parser.finish()
    assert assemble(events)["content"] == "é中😀"


def test_misuse_is_reported():
    parser = StreamParser("chat")
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(ValueError):
        StreamParser("think")
    with pytest.raises(ValueError):
        parse_completion("x", "think")
