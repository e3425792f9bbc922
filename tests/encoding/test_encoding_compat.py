"""Client compatibility (issue 2, point 3) and input validation of the encoder."""

from __future__ import annotations

import json

import pytest
from dsv4_agent.encoding import MessageError, encode_messages, normalize_messages, resolve_reasoning
from dsv4_agent.encoding.compat import EFFORT_MODES
from encoding_strategies import safe_text
from hypothesis import given, settings
from hypothesis import strategies as st

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_content_parts_are_flattened():
    messages = [{"role": "system", "content": [{"type": "text", "text": "S"}]},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert encode_messages(normalize_messages(messages), "chat") == encode_messages(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}], "chat")


def test_non_text_part_is_refused_with_index_and_field():
    with pytest.raises(MessageError) as err:
        normalize_messages([{"role": "user", "content": "x"},
                            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}])
    assert err.value.index == 1 and err.value.field == "content[0]" and "messages[1].content[0]" in str(err.value)


def test_reasoning_alias():
    base = [{"role": "user", "content": "q"}]
    aliased = normalize_messages([*base, {"role": "assistant", "reasoning": "R", "content": "A"}])
    assert aliased[1] == {"role": "assistant", "reasoning_content": "R", "content": "A"}
    assert "R</think>A" in encode_messages(aliased, "thinking", drop_thinking=False)
    both = normalize_messages([*base, {"role": "assistant", "reasoning": "x", "reasoning_content": "R"}])
    assert both[1]["reasoning_content"] == "R"


def test_dict_arguments_render_as_parameters_never_nested():
    call = {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "n": 2}}}
    as_string = {**call, "function": {**call["function"], "arguments": '{"city": "Oslo", "n": 2}'}}
    conv = lambda c: [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "q"},  # noqa: E731
                      {"role": "assistant", "content": "", "tool_calls": [c]}]
    prompt = encode_messages(conv(call), "chat")
    assert prompt == encode_messages(conv(as_string), "chat")
    assert 'parameter name="city" string="true">Oslo<' in prompt and 'name="arguments"' not in prompt


def test_empty_arguments_mean_no_arguments():
    messages = normalize_messages([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": ""}}]}])
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert 'name="arguments"' not in encode_messages(messages, "chat")


def test_tool_messages_matched_by_id():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "b", "content": {"ok": True}},
                {"role": "tool", "tool_call_id": "a", "content": None}]
    prompt = encode_messages(normalize_messages(messages), "chat")
    assert prompt.endswith('<tool_result></tool_result>\n\n<tool_result>{"ok": true}</tool_result><｜Assistant｜></think>')
    with pytest.raises(MessageError) as err:
        normalize_messages([*messages[:2], {"role": "tool", "tool_call_id": "zzz", "content": "r"}])
    assert err.value.index == 2 and err.value.field == "tool_call_id"


def test_developer_role_and_request_level_tools():
    messages = normalize_messages([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "q"}],
                                  tools=TOOLS, response_format={"type": "json_object"})
    assert messages[0] == {"role": "system", "content": "Be brief.", "tools": TOOLS, "response_format": {"type": "json_object"}}
    inserted = normalize_messages([{"role": "user", "content": "q"}], tools=TOOLS)
    assert inserted[0] == {"role": "system", "content": "", "tools": TOOLS}
    kept = normalize_messages([{"role": "developer", "content": "d"}], developer_as_system=False)
    assert kept[0]["role"] == "developer"


def test_normalize_does_not_mutate():
    messages = [{"role": "assistant", "reasoning": "r", "tool_calls": [{"function": {"name": "f", "arguments": ""}}]}]
    normalize_messages(messages)
    assert messages == [{"role": "assistant", "reasoning": "r", "tool_calls": [{"function": {"name": "f", "arguments": ""}}]}]


@pytest.mark.parametrize(("effort", "expected"), [
    ("none", ("chat", None)), ("minimal", ("chat", None)), ("low", ("thinking", "high")),
    ("medium", ("thinking", "high")), ("high", ("thinking", "high")), ("xhigh", ("thinking", "max")),
    ("max", ("thinking", "max")), ("HIGH", ("thinking", "high"))])
def test_reasoning_effort_table(effort, expected):
    assert resolve_reasoning(effort) == expected
    mode, v4_effort = expected
    encode_messages([{"role": "user", "content": "q"}], mode, v4_effort)  # always valid encoder input


def test_reasoning_defaults_and_switch():
    assert set(EFFORT_MODES) == {"none", "minimal", "low", "medium", "high", "xhigh", "max"}
    assert resolve_reasoning() == ("thinking", "high")
    assert resolve_reasoning(default_thinking=False) == ("chat", None)
    assert resolve_reasoning("max", thinking=False) == ("chat", None)
    assert resolve_reasoning(thinking=True) == ("thinking", "high")
    with pytest.raises(ValueError, match="reasoning_effort"):
        resolve_reasoning("extreme")
    with pytest.raises(ValueError):
        resolve_reasoning("none", thinking=True)


@pytest.mark.parametrize(("messages", "where"), [
    ([{"role": "user", "content": "q"}, {"role": "user", "content": None}], "messages[1].content"),
    ([{"role": "bot", "content": "q"}], "messages[0].role"),
    ([{"role": "developer", "content": ""}], "messages[0].content"),
    ([{"role": "user", "content": "q", "task": "nope"}], "messages[0].task"),
    ([{"role": "system", "tools": [{"name": "f"}]}], "messages[0].tools[0]"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "tool", "content": [{"type": "text", "text": None}]}], "messages[0].content[0].text"),
])
def test_errors_name_the_message_and_field(messages, where):
    with pytest.raises(MessageError) as err:
        encode_messages(messages, "chat")
    assert str(err.value).startswith(where + ":")


def test_context_errors_say_context_and_unrendered_messages_are_not_checked():
    with pytest.raises(MessageError, match=r"^context\[1\]: a message must be a dict"):
        encode_messages([{"role": "user", "content": "q"}], "chat", context=[{"role": "user", "content": "a"}, 42])
    # like the reference: context is never rendered, so its content is not validated
    assert encode_messages([{"role": "user", "content": "q"}], "chat", context=[{"role": "x"}]) == (
        "<｜User｜>q<｜Assistant｜></think>")
    # a task is only checked when its transition is reached (here the next user turn follows)
    encode_messages([{"role": "user", "content": "q", "task": "nope"}, {"role": "system", "content": "s"}], "chat")
    # a user turn folded into another reports the message the bad text came from
    with pytest.raises(MessageError, match=r"^messages\[2\]\.content"):
        encode_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"},
                         {"role": "user", "content": 5}], "chat")


def test_bad_mode_and_effort():
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([], "think")
    with pytest.raises(ValueError, match="resolve_reasoning"):
        encode_messages([{"role": "user", "content": "q"}], "chat", "low")


def test_encoder_does_not_mutate_its_input():
    import copy
    messages = [{"role": "system", "content": "s", "tools": TOOLS}, {"role": "user", "content": "q"},
                {"role": "assistant", "reasoning_content": "r", "tool_calls": [
                    {"id": "b", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                    {"id": "a", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": "2"}, {"role": "tool", "tool_call_id": "b", "content": "1"}]
    before = copy.deepcopy(messages)
    prompt = encode_messages(messages[3:], "thinking", context=messages[:3])
    assert messages == before
    assert prompt == "<｜User｜><tool_result>1</tool_result>\n\n<tool_result>2</tool_result><｜Assistant｜><think>"


def test_reasoning_alias_is_left_to_normalize_messages():
    """The encoder is byte-exact with the reference, which ignores `reasoning` (empty reasoning is rendered);
    `normalize_messages` is where the alias becomes `reasoning_content`."""
    conv = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "q"}]
    aliased = [*conv, {"role": "assistant", "reasoning": "R", "content": "A"}]
    assert encode_messages(aliased, "thinking") == encode_messages([*conv, {"role": "assistant", "content": "A"}],
                                                                   "thinking")
    assert encode_messages(normalize_messages(aliased), "thinking") == encode_messages(
        [*conv, {"role": "assistant", "reasoning_content": "R", "content": "A"}], "thinking")


def _parts(text: str) -> list[dict]:
    return [{"type": "text", "text": piece} for piece in text.split("|")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant_call", "assistant", "system"]), safe_text), max_size=6),
       st.sampled_from(["chat", "thinking"]))
def test_client_shaped_conversations_always_encode(turns, mode):
    """Content parts, `reasoning`, dict / empty arguments and object tool results never reach the prompt as
    Python reprs or an `arguments` wrapper, and the result equals the hand-normalised conversation."""
    client, manual = [{"role": "user", "content": "start"}], [{"role": "user", "content": "start"}]
    for k, (kind, text) in enumerate(turns):
        if kind == "user":
            client.append({"role": "user", "content": _parts(text)})
            manual.append({"role": "user", "content": "\n".join(text.split("|"))})
        elif kind == "system":
            client.append({"role": "developer", "content": _parts(text)})
            manual.append({"role": "system", "content": "\n".join(text.split("|"))})
        elif kind == "assistant":
            client.append({"role": "assistant", "content": _parts(text), "reasoning": text})
            manual.append({"role": "assistant", "content": "\n".join(text.split("|")), "reasoning_content": text})
        else:
            args = {"q": text, "n": k} if k % 2 else ""
            client += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{k}", "type": "function", "function": {"name": "f", "arguments": args}}]},
                {"role": "tool", "tool_call_id": f"c{k}", "content": {"r": text}}]
            manual += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{k}", "type": "function", "function": {"name": "f", "arguments": json.dumps(args) if args else "{}"}}]},
                {"role": "tool", "tool_call_id": f"c{k}", "content": json.dumps({"r": text}, ensure_ascii=False)}]
    prompt = encode_messages(normalize_messages(client, tools=TOOLS), mode)
    assert prompt == encode_messages([{"role": "system", "content": "", "tools": TOOLS}, *manual], mode)
    assert 'name="arguments"' not in prompt and "<tool_result>{'" not in prompt
