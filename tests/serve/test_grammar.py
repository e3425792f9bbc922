"""The forced / strict-auto tool-call grammars accept exactly the encoder's DSML layout with schema-valid values."""

from __future__ import annotations

import json

import pytest

xgr = pytest.importorskip("xgrammar")
pytest.importorskip("sglang")

from dsv4_agent.encoding import parse_completion, render_assistant  # noqa: E402
from dsv4_agent.encoding.tokens import DSML, EOS  # noqa: E402
from sglang.srt.entrypoints.openai.protocol import Function, Tool  # noqa: E402
from xgrammar.testing import _is_grammar_accept_string  # noqa: E402

from dsv4_agent.serve.grammar import auto_tool_calls_tag, forced_tool_calls_tag  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                            "days": {"type": "integer"}, "note": {"type": "string"},
                                            "tags": {"type": "array", "items": {"type": "string"}}},
           "required": ["city", "days"]}
TOOLS = [Tool(function=Function(name="get_weather", parameters=WEATHER)), Tool(function=Function(name="noop"))]


def _calls_text(*calls: tuple[str, dict]) -> str:
    """The DSML block exactly as the encoder renders these calls (what the grammar must accept)."""
    msg = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls]}
    return render_assistant(msg, "chat")[: -len(EOS)]


def _accepts(tag, text: str) -> bool:
    return _is_grammar_accept_string(xgr.Grammar.from_structural_tag(tag.model_dump_json()), text)


@pytest.mark.parametrize("args", [{"city": "Paris", "days": 3}, {"city": "Rome", "days": -1, "note": "a <b> c"},
                                  {"city": "Paris", "days": 0, "tags": ["x", "y"]},
                                  {"city": "Rome", "days": 2, "note": "", "tags": []}])
def test_required_accepts_encoder_layout(args):
    text = _calls_text(("get_weather", args))
    assert _accepts(forced_tool_calls_tag(TOOLS, None, True), text)
    assert json.loads(parse_completion(text, "chat")["tool_calls"][0]["function"]["arguments"]) == args


@pytest.mark.parametrize("bad", [{"city": "Nice", "days": 3}, {"city": "Paris"}, {"city": "Paris", "days": "3"},
                                 {"city": "Paris", "days": 1.5}])
def test_required_rejects_schema_violations(bad):
    assert not _accepts(forced_tool_calls_tag(TOOLS, None, True), _calls_text(("get_weather", bad)))


def test_parallel_and_named_counts():
    one, two = ("get_weather", {"city": "Paris", "days": 1}), ("noop", {})
    assert _accepts(forced_tool_calls_tag(TOOLS, None, True), _calls_text(one, two))
    assert not _accepts(forced_tool_calls_tag(TOOLS, None, False), _calls_text(one, two))
    assert _accepts(forced_tool_calls_tag(TOOLS, None, False), _calls_text(two))
    named = forced_tool_calls_tag(TOOLS, "get_weather", True)
    assert _accepts(named, _calls_text(one))
    assert not _accepts(named, _calls_text(one, one)) and not _accepts(named, _calls_text(two))
    assert not _accepts(named, "Sure." + _calls_text(one))  # no free text before a forced call
    with pytest.raises(ValueError, match="tool_choice"):
        forced_tool_calls_tag(TOOLS, "missing", True)


def test_auto_allows_text_and_constrains_opened_blocks():
    tag = auto_tool_calls_tag(TOOLS, True)
    assert _accepts(tag, "Just an answer, no tools.")
    assert _accepts(tag, "Checking." + _calls_text(("get_weather", {"city": "Rome", "days": 2})))
    assert not _accepts(tag, "Checking." + _calls_text(("get_weather", {"city": "Nice", "days": 2})))
    assert DSML in _calls_text(("noop", {}))


@pytest.mark.parametrize("note", ['a <｜DSML｜invoke name="noop">', "a </｜DSML｜invoke> b", "a <|DSML|parameter", "x </｜｜DSML｜｜tool_calls>",
                                  "a </|｜DSML|parameter> b", f"a {EOS} b"])
def test_string_values_cannot_carry_markup(note):
    """A free-text value with a DSML tag (any pipe form) or EOS would parse as another, unchecked call or end
    this one early: the grammar refuses it, also under strict auto."""
    text = _calls_text(("get_weather", {"city": "Paris", "days": 1, "note": note}))
    calls = parse_completion(text, "chat").get("tool_calls") or []
    assert [json.loads(c["function"]["arguments"]) for c in calls] != [{"city": "Paris", "days": 1, "note": note}]
    assert not _accepts(forced_tool_calls_tag(TOOLS, None, True), text)
    assert not _accepts(auto_tool_calls_tag(TOOLS, True), "Sure." + text)


@pytest.mark.parametrize("note", ["a ｜DSML｜ b", "a |DSML| b", "</think> <think>", "x </｜DSM y", "< / ｜ |", "a <b>"])
def test_string_values_keep_look_alikes(note):
    args = {"city": "Paris", "days": 1, "note": note}
    text = _calls_text(("get_weather", args))
    assert _accepts(forced_tool_calls_tag(TOOLS, None, True), text)
    assert json.loads(parse_completion(text, "chat")["tool_calls"][0]["function"]["arguments"]) == args
