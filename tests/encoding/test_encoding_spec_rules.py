"""Rules of ../shared/spec/encoding.md that no conformance vector exercises, pinned one by one.

Every expected prompt below is written out from the spec text (section numbers in the test names' docstrings)
and from how the vectors render the analogous cases -- never from running the encoder. The markers are
spelled out here rather than imported, so a wrong constant in `tokens.py` cannot hide.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from dsv4_agent.encoding import MessageError, encode_messages, normalize_messages
from dsv4_agent.encoding.tokens import EFFORT_MAX_PREFIX, TOOLS_PREAMBLE, TOOLS_TRAILER
from encoding_strategies import names, safe_text
from hypothesis import given, settings
from hypothesis import strategies as st

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
OPEN, CLOSE = "<think>", "</think>"
CHAT_PROMPT, THINK_PROMPT = ASSISTANT + CLOSE, ASSISTANT + OPEN

# spec 7.1 / 8: the template texts as the spec's JSON string literals
PREAMBLE = json.loads(
    r'''"## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n"''')
TRAILER = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
EFFORT_MAX = json.loads(
    r'''"Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"''')
RF_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

FN_F = {"name": "f", "description": "d", "parameters": {"type": "object"}}
FN_G = {"name": "g", "description": "é", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}
TOOLS = [{"type": "function", "function": FN_F}]
TOOLS_TEXT = PREAMBLE + '{"name": "f", "description": "d", "parameters": {"type": "object"}}' + TRAILER


def call(name: str, arguments, cid: str | None = None, **extra) -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": arguments}, **extra}
    if cid is not None:
        c["id"] = cid
    return c


def param(key: str, value: str, is_string: bool) -> str:
    return f'<｜DSML｜parameter name="{key}" string="{"true" if is_string else "false"}">{value}</｜DSML｜parameter>'


def invoke(name: str, *params: str) -> str:
    """spec 10.1: header, LF, parameters joined by LF (an empty line when there are none), LF, close."""
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def block(*invokes: str) -> str:
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


def result(text: str) -> str:
    return f"<tool_result>{text}</tool_result>"


def u(text: str, **extra) -> dict:
    return {"role": "user", "content": text, **extra}


def a(content: str | None = None, reasoning: str | None = None, calls: list | None = None, **extra) -> dict:
    m = {"role": "assistant", "content": content, **extra}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if calls is not None:
        m["tool_calls"] = calls
    return m


def tool(content, cid: str | None = None, **extra) -> dict:
    m = {"role": "tool", "content": content, **extra}
    if cid is not None:
        m["tool_call_id"] = cid
    return m


# ---------------------------------------------------------------------------------------------------------
# literal texts (spec 7.1, 8)


def test_template_texts_have_the_spec_sizes_and_digests():
    for text, size, digest in ((TOOLS_PREAMBLE, 890, "c7c9042638154a237b5d1bd48be772374a35a4d24c5cacfd1ffbd92703da329c"),
                               (TOOLS_TRAILER, 99, "690702850fe256512cb1ee67c4e436ecb3e735c71ebee77ca45ff357a75fb5a7"),
                               (EFFORT_MAX_PREFIX, 476, "f7a24f3b3050d4a83781e9b755b316aae2ec1d9dc87562541d90bcb04d7350f7")):
        data = text.encode("utf-8")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest)
    assert (TOOLS_PREAMBLE, TOOLS_TRAILER, EFFORT_MAX_PREFIX) == (PREAMBLE, TRAILER, EFFORT_MAX)


# ---------------------------------------------------------------------------------------------------------
# BOS, context, effort prefix (spec 2.1, 8, 11)


def test_empty_context_is_no_context():
    """spec 2.1/8: BOS and the max prefix are written when `context` is empty, not only when it is None."""
    assert encode_messages([u("q")], "thinking", "max", context=[]) == BOS + EFFORT_MAX + USER + "q" + THINK_PROMPT


def test_effort_prefix_precedes_the_first_message_left_after_the_drop():
    """spec 8 + 6: the prefix belongs to position 0 of the *final* list; a dropped developer is not it."""
    messages = [{"role": "developer", "content": "d"}, u("q1"), a("a1", "r1"), u("q2")]
    assert encode_messages(messages, "thinking", "max") == (
        BOS + EFFORT_MAX + USER + "q1" + CHAT_PROMPT + "a1" + EOS + USER + "q2" + THINK_PROMPT)


def test_folding_never_crosses_the_context_boundary():
    """spec 4.1 / 11: a user or tool message right after a context ending in a user turn starts its own turn."""
    assert encode_messages([u("b")], "chat", context=[u("a")]) == USER + "b" + CHAT_PROMPT
    assert encode_messages([tool("r", "x")], "chat", context=[u("a")]) == USER + result("r") + CHAT_PROMPT


def test_task_output_is_recognised_across_the_context_boundary():
    """spec 11: neighbours are looked up in context + messages, so the first message can be a task output."""
    assert encode_messages([a("ramen", "r")], "thinking", context=[u("best ramen", task="query")]) == "ramen" + EOS


def test_tools_declared_in_the_context_keep_reasoning():
    """spec 6 + 11: the effective drop flag looks at the whole conversation, context included."""
    context = [{"role": "system", "content": "S", "tools": TOOLS}]
    assert encode_messages([u("q1"), a("a1", "r1"), u("q2")], "thinking", context=context) == (
        USER + "q1" + THINK_PROMPT + "r1" + CLOSE + "a1" + EOS + USER + "q2" + THINK_PROMPT)


# ---------------------------------------------------------------------------------------------------------
# system / developer / reminder bodies (spec 5.1, 7)


def test_null_system_content_is_empty():
    assert encode_messages([{"role": "system", "content": None}, u("q")], "chat") == BOS + USER + "q" + CHAT_PROMPT


def test_response_format_without_content_starts_with_a_blank_line():
    """spec 5.1: like tools, the response-format block follows `content` (empty here) after two LF."""
    messages = [{"role": "system", "content": None, "response_format": {"type": "json_object"}}, u("q")]
    assert encode_messages(messages, "chat") == BOS + "\n\n" + RF_HEADER + '{"type": "json_object"}' + USER + "q" + CHAT_PROMPT


def test_empty_response_format_is_not_rendered():
    """spec 5.1: only a truthy response_format is rendered."""
    assert encode_messages([{"role": "system", "content": "S", "response_format": {}}, u("q")], "chat") == (
        BOS + "S" + USER + "q" + CHAT_PROMPT)


def test_only_the_function_object_of_a_tool_is_rendered():
    """spec 2.2: keys beside `function` (`type`, `strict`, ...) never reach the prompt."""
    tools = [{"type": "function", "strict": True, "function": FN_F}]
    assert encode_messages([{"role": "system", "content": "S", "tools": tools}, u("q")], "chat") == (
        BOS + "S\n\n" + TOOLS_TEXT + USER + "q" + CHAT_PROMPT)


def test_every_system_message_renders_its_own_tools():
    """spec 2.2 + 7.1: system messages may repeat; each writes its own block, schemas one per line."""
    messages = [{"role": "system", "content": "A", "tools": [{"type": "function", "function": FN_F},
                                                             {"type": "function", "function": FN_G}]},
                {"role": "system", "content": "B", "tools": [{"type": "function", "function": FN_G}]}, u("q")]
    g = '{"name": "g", "description": "é", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}'
    assert encode_messages(messages, "chat") == (
        BOS + "A\n\n" + PREAMBLE + '{"name": "f", "description": "d", "parameters": {"type": "object"}}\n' + g + TRAILER
        + "B\n\n" + PREAMBLE + g + TRAILER + USER + "q" + CHAT_PROMPT)


def test_developer_with_tools_and_response_format():
    """spec 5.1: developer = USER + content + tools block + response-format block (three LF between them)."""
    messages = [{"role": "developer", "content": "d", "tools": TOOLS, "response_format": {"type": "json_object"}}]
    assert encode_messages(messages, "thinking") == (
        BOS + USER + "d\n\n" + TOOLS_TEXT + "\n\n" + RF_HEADER + '{"type": "json_object"}' + THINK_PROMPT)


def test_null_reminder_content_renders_none():
    """spec 5.1: latest_reminder = REMINDER + content, null -> `None`."""
    assert encode_messages([{"role": "latest_reminder", "content": None}, u("q")], "chat") == (
        BOS + REMINDER + "None" + USER + "q" + CHAT_PROMPT)


def test_user_turn_before_a_reminder_in_dropped_history_closes_reasoning():
    """spec 5.2: a reminder next triggers the transition; before the last user turn (drop) it is `</think>`."""
    messages = [u("q1"), {"role": "latest_reminder", "content": "date"}, u("q2")]
    assert encode_messages(messages, "thinking") == BOS + USER + "q1" + CHAT_PROMPT + REMINDER + "date" + USER + "q2" + THINK_PROMPT


def test_assistant_first_in_chat_mode():
    """spec 5.1/5.2: no user turn before it -> no ASSISTANT marker; chat mode has no reasoning part."""
    assert encode_messages([{"role": "system", "content": "S"}, a("x", "r")], "chat") == BOS + "S" + "x" + EOS


# ---------------------------------------------------------------------------------------------------------
# folding and result order (spec 4)


def test_tool_result_joins_a_user_turn_that_has_a_task():
    """spec 4.1: a tool block joins any preceding user item (only *user text* checks for a task)."""
    assert encode_messages([u("q", task="query"), tool("r", "x")], "chat") == (
        BOS + USER + "q\n\n" + result("r") + "<｜query｜>")


def test_text_blocks_keep_their_place_while_results_are_sorted():
    """spec 4.3: sorted results are written back into the positions results occupied."""
    calls = [call("f", "{}", "a"), call("g", "{}", "b")]
    messages = [{"role": "system", "content": "S"}, u("go"), a(calls=calls), tool("rb", "b"), u("note"), tool("ra", "a")]
    assert encode_messages(messages, "chat") == (
        BOS + "S" + USER + "go" + CHAT_PROMPT + block(invoke("f", ""), invoke("g", "")) + EOS
        + USER + result("ra") + "\n\nnote\n\n" + result("rb") + CHAT_PROMPT)


def test_call_order_persists_across_an_assistant_without_calls():
    """spec 4.3: the map is only replaced by an assistant *with* tool calls."""
    calls = [call("f", "{}", "a"), call("g", "{}", "b")]
    messages = [u("go"), a(calls=calls), u("wait"), a("ok"), tool("rb", "b"), tool("ra", "a")]
    assert encode_messages(messages, "chat") == (
        BOS + USER + "go" + CHAT_PROMPT + block(invoke("f", ""), invoke("g", "")) + EOS
        + USER + "wait" + CHAT_PROMPT + "ok" + EOS + USER + result("ra") + "\n\n" + result("rb") + CHAT_PROMPT)


def test_calls_without_ids_replace_the_map_with_an_empty_one():
    """spec 4.3: an assistant whose calls have no ids empties the map, so results keep arrival order."""
    messages = [u("go"), a(calls=[call("f", "{}", "a"), call("g", "{}", "b")]), tool("ra", "a"), tool("rb", "b"),
                a(calls=[call("f", "{}"), call("g", "{}")]), tool("rb", "b"), tool("ra", "a")]
    both = block(invoke("f", ""), invoke("g", ""))
    assert encode_messages(messages, "chat") == (
        BOS + USER + "go" + CHAT_PROMPT + both + EOS + USER + result("ra") + "\n\n" + result("rb") + CHAT_PROMPT
        + both + EOS + USER + result("rb") + "\n\n" + result("ra") + CHAT_PROMPT)


def test_empty_call_id_falls_back_to_the_function_id():
    """spec 4.3: a call's id is `id`, or if that is missing *or empty* `function.id`."""
    first = {"id": "", "type": "function", "function": {"name": "f", "arguments": "{}", "id": "x"}}
    messages = [u("go"), a(calls=[first, call("g", "{}", "y")]), tool("ry", "y"), tool("rx", "x")]
    assert encode_messages(messages, "chat").endswith(USER + result("rx") + "\n\n" + result("ry") + CHAT_PROMPT)


@pytest.mark.parametrize(("content", "text"), [([], ""), (42, "42"), (True, "True"), (1.5, "1.5"),
                                               ([{"type": "text", "text": "a"}, {"type": "text", "text": ""}], "a\n\n")])
def test_tool_result_bodies(content, text):
    """spec 4.2: a list joins its text elements with a blank line; any other value is Python's str()."""
    assert encode_messages([u("q"), tool(content, "x")], "chat") == BOS + USER + "q\n\n" + result(text) + CHAT_PROMPT


# ---------------------------------------------------------------------------------------------------------
# drop rule and tools (spec 6)


def test_tools_on_a_reminder_keep_reasoning():
    """spec 6 (quirk): tools on a latest_reminder are not rendered but disable the drop."""
    messages = [u("q1"), a("a1", "r1"), {"role": "latest_reminder", "content": "date", "tools": TOOLS}, u("q2")]
    assert encode_messages(messages, "thinking") == (
        BOS + USER + "q1" + THINK_PROMPT + "r1" + CLOSE + "a1" + EOS + REMINDER + "date" + USER + "q2" + THINK_PROMPT)


def test_tools_on_a_tool_message_do_not_count():
    """spec 6: folding keeps only id and content of a tool message, so its `tools` never disable the drop."""
    messages = [u("q1"), a("a1", "r1"), tool("t", "x", tools=TOOLS), u("q2")]
    assert encode_messages(messages, "thinking") == (
        BOS + USER + "q1" + CHAT_PROMPT + "a1" + EOS + USER + result("t") + "\n\nq2" + THINK_PROMPT)


# ---------------------------------------------------------------------------------------------------------
# tasks (spec 5.2, 9)


def test_action_transition_ignores_the_drop_rule():
    """spec 9: `action` writes `<think>` in thinking mode, also before the last user turn (drop enabled);
    its answer has no reasoning part."""
    messages = [u("q1", task="action"), a("Search", "r"), u("q2")]
    assert encode_messages(messages, "thinking") == (
        BOS + USER + "q1" + THINK_PROMPT + "<｜action｜>Search" + EOS + USER + "q2" + THINK_PROMPT)


def test_task_output_has_no_reasoning_even_when_reasoning_is_kept():
    """spec 5.1 / 6: the answer to a task never renders reasoning, not even with drop disabled."""
    messages = [u("best ramen", task="query"), a("ramen", "r")]
    expected = BOS + USER + "best ramen<｜query｜>ramen" + EOS
    assert encode_messages(messages, "thinking", drop_thinking=False) == expected
    assert encode_messages([{"role": "system", "content": "", "tools": TOOLS}, *messages], "thinking") == (
        BOS + "\n\n" + TOOLS_TEXT + expected[len(BOS):])


@pytest.mark.parametrize("task", ["query", "authority", "domain", "read_url"])
@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_user_task_token_follows_the_text_in_every_mode(task, mode):
    """spec 9: these tasks put their token right after the user text, no ASSISTANT, whatever the mode and drop."""
    for drop in (True, False):
        assert encode_messages([u("t", task=task)], mode, drop_thinking=drop) == BOS + USER + f"t<｜{task}｜>"


def test_task_suffix_before_a_reminder():
    """spec 5.2: a following latest_reminder triggers the task suffix like an assistant does."""
    assert encode_messages([u("q", task="query"), {"role": "latest_reminder", "content": "d"}], "chat") == (
        BOS + USER + "q<｜query｜>" + REMINDER + "d")


def test_developer_task():
    """spec 5.2: developer messages keep their task (they are not folded)."""
    assert encode_messages([{"role": "developer", "content": "d", "task": "action"}], "thinking") == (
        BOS + USER + "d" + THINK_PROMPT + "<｜action｜>")


# ---------------------------------------------------------------------------------------------------------
# wo_eos (spec 12)


def test_user_wo_eos_has_no_effect():
    assert encode_messages([u("q", wo_eos=True)], "chat") == BOS + USER + "q" + CHAT_PROMPT


def test_assistant_wo_eos_mid_conversation():
    """spec 12: the EOS is omitted wherever the assistant message stands."""
    assert encode_messages([u("q"), a("x", wo_eos=True), u("q2")], "chat") == (
        BOS + USER + "q" + CHAT_PROMPT + "x" + USER + "q2" + CHAT_PROMPT)


# ---------------------------------------------------------------------------------------------------------
# arguments -> parameters (spec 7.2, 10)


def _one_call(arguments, name="f") -> str:
    return encode_messages([u("q"), a(calls=[call(name, arguments, "c")])], "chat")


def _expected(*params: str, name="f") -> str:
    return BOS + USER + "q" + CHAT_PROMPT + block(invoke(name, *params)) + EOS


def test_typed_values_use_python_json_number_forms():
    """spec 7.2: shortest round-trip floats, exponent below 1e-4 and from 1e16, big ints exact, NaN/Infinity."""
    arguments = ('{"a": 1e-7, "b": 1e21, "c": -0.0, "d": NaN, "e": -Infinity, "f": 12345678901234567890, '
                 '"g": 2.5e-05, "h": 1e16, "i": 0.0001, "j": 100.0}')
    assert _one_call(arguments) == _expected(
        param("a", "1e-07", False), param("b", "1e+21", False), param("c", "-0.0", False), param("d", "NaN", False),
        param("e", "-Infinity", False), param("f", "12345678901234567890", False), param("g", "2.5e-05", False),
        param("h", "1e+16", False), param("i", "0.0001", False), param("j", "100.0", False))


def test_typed_values_escape_strings_inside_json_but_keep_non_ascii_raw():
    """spec 7.2: inside a typed value strings are JSON (control characters, quote, backslash escaped)."""
    arguments = json.dumps({"o": {"k": 'é\n"q"\\\x01', "n": [True, None, 1.5, {}]}, "s": 'é\n"q"\\', "e": ""})
    assert _one_call(arguments) == _expected(
        param("o", '{"k": "é\\n\\"q\\"\\\\\\u0001", "n": [true, null, 1.5, {}]}', False),
        param("s", 'é\n"q"\\', True), param("e", "", True))


def test_whitespace_around_the_arguments_object_is_json():
    """spec 10.2: `arguments` is parsed as JSON text, which may be surrounded by whitespace."""
    assert _one_call(' \n{"a": 1}\t') == _expected(param("a", "1", False))


def test_nothing_in_names_keys_or_values_is_escaped():
    """spec 10.1: names, keys and string values are written raw."""
    arguments = json.dumps({'a"b': "x</｜DSML｜parameter>", "<k>": "&amp;"}, ensure_ascii=False)
    assert _one_call(arguments, name='we"ird<') == _expected(
        param('a"b', "x</｜DSML｜parameter>", True), param("<k>", "&amp;", True), name='we"ird<')


def test_null_tool_name_renders_none():
    """spec 10.2: `name` is written as given, null as `None`."""
    assert _one_call("{}", name=None) == _expected("", name="None")


@pytest.mark.parametrize(("arguments", "value"), [(None, "null"), ([1, "é"], '[1, "é"]'), (5, "5"), (True, "true")])
def test_non_string_non_object_arguments_are_one_typed_parameter(arguments, value):
    """spec 10.2: `arguments` that is not a string (and, project decision, not an object) is wrapped in one
    parameter named `arguments` holding its JSON."""
    assert _one_call(arguments) == _expected(param("arguments", value, False))


@pytest.mark.parametrize("arguments", ["null", "5", '"x"', "true", "[]", " [1] "])
def test_json_arguments_that_are_not_an_object_are_rejected(arguments):
    """spec 10.2: parse succeeds and gives a non-object -> error."""
    with pytest.raises(MessageError, match=r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: "):
        _one_call(arguments)


# ---------------------------------------------------------------------------------------------------------
# errors name the field (never a KeyError / AttributeError / TypeError from deep inside)

NEST = {}
_inner = NEST
for _ in range(3000):
    _inner["a"] = {}
    _inner = _inner["a"]


@pytest.mark.parametrize(("messages", "context", "where"), [
    ([u("q"), {"content": "x"}], None, "messages[1].role"),
    ([u("q"), a(calls=[{"id": "", "function": "f"}])], None, "messages[1].tool_calls[0].function"),
    ([u("q"), a(calls=5)], None, "messages[1].tool_calls"),
    ([u("q")], [u("p"), a(calls=5)], "context[1].tool_calls"),
    ([u("q")], [u("p"), a(calls=["f"])], "context[1].tool_calls[0]"),
    ([u("q"), a(calls=[call("f", "{}", ["a"])])], None, "messages[1].tool_calls[0].id"),
    ([u("q"), a(calls=[call("f", "{}", "a"), call("g", "{}", "b")]), tool("r", ["a"]), tool("r", "b")], None,
     "messages[2].tool_call_id"),
    ([u("q"), a(calls=[call("f", {"x": {1, 2}})])], None, "messages[1].tool_calls[0].function.arguments"),
    ([u("q"), a(calls=[call("f", NEST)])], None, "messages[1].tool_calls[0].function.arguments"),
    ([u("q"), a(calls=[call("f", b"{}")])], None, "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "system", "tools": [{"function": {"x": {1}}}]}], None, "messages[0].tools[0].function"),
    ([{"role": "system", "response_format": {"x": object()}}], None, "messages[0].response_format"),
    ([u("q", task=["action"])], None, "messages[0].task"),
    ([u("q"), a(calls=[{"function": {"arguments": "{}"}}])], None, "messages[1].tool_calls[0].function.name"),
    # spec 2.2: a tool entry without `function` is an error whatever message carries it (the reference reads
    # `tools` / `tool_calls` of every message it renders, though only system/developer tools are written)
    ([u("q"), a("x", tools=[{"name": "f"}])], None, "messages[1].tools[0]"),
    ([{"role": "latest_reminder", "content": "d", "tools": {"a": 1}}, u("q")], None, "messages[0].tools"),
    ([{"role": "system", "content": "s", "tool_calls": [{"function": {"name": "f"}}]}, u("q")], None,
     "messages[0].tool_calls[0].function.arguments"),
    ([u("q")], [u("p"), a(calls=[{"id": "", "function": 3}])], "context[1].tool_calls[0].function"),
])
def test_malformed_input_names_the_field(messages, context, where):
    for mode in ("chat", "thinking"):
        with pytest.raises(MessageError) as err:
            encode_messages(messages, mode, context=context)
        assert str(err.value).startswith(where + ":")


@pytest.mark.parametrize(("messages", "kwargs", "where"), [
    (None, {}, "messages"),
    ([u("q"), a(calls=5)], {}, "messages[1].tool_calls"),
    ([u("q"), a(calls=[call("f", "{}", ["a"])])], {}, "messages[1].tool_calls[0].id"),
    ([u("q"), a(calls=[call("f", "{}", "a")]), tool("r", ["a"])], {}, "messages[2].tool_call_id"),
    ([u("q"), tool("r", "x")], {}, "messages[1].tool_call_id"),  # a result with no call before it
    ([u("q"), a(calls=[call("f", "{}", "a")]), tool({1, 2}, "a")], {}, "messages[2].content"),
    ([u("q")], {"tools": {"function": FN_F}}, "tools"),
    ([u("q")], {"tools": [FN_F]}, "tools[0]"),
    ([u("q")], {"response_format": ["json"]}, "response_format"),
    ([{"role": "system", "content": "s", "tools": {"a": 1}}, u("q")], {"tools": TOOLS}, "messages[0].tools"),
])
def test_client_input_errors_name_the_field(messages, kwargs, where):
    with pytest.raises(MessageError) as err:
        normalize_messages(messages, **kwargs)
    assert str(err.value).startswith(where + ":")


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), safe_text),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(safe_text, inner, max_size=3)), max_leaves=8)
field_names = st.sampled_from(["role", "content", "tools", "tool_calls", "tool_call_id", "task", "wo_eos",
                               "reasoning_content", "reasoning", "response_format", "id", "function", "name",
                               "arguments", "type", "text"])
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "latest_reminder", "bot"])


@st.composite
def json_messages(draw) -> dict:
    """A message as JSON could carry it: a real role and arbitrary JSON in (mostly) real field names,
    with nested call / tool / content-part shapes so that deep fields get malformed too."""
    m = draw(st.dictionaries(field_names, json_values, max_size=4))
    if draw(st.booleans()):
        m["role"] = draw(roles)
    if draw(st.booleans()):
        m["tool_calls"] = draw(st.lists(st.dictionaries(field_names, st.one_of(
            json_values, st.dictionaries(field_names, json_values, max_size=3)), max_size=3), max_size=2))
    if draw(st.booleans()):
        m["tools"] = draw(st.lists(st.dictionaries(field_names, json_values, max_size=2), max_size=2))
    return m


@settings(max_examples=200, deadline=None)
@given(st.lists(json_messages(), max_size=5), st.lists(json_messages(), max_size=3),
       st.sampled_from(["chat", "thinking"]), st.sampled_from([None, "high", "max"]), st.booleans())
def test_any_json_input_renders_or_raises_message_error(messages, context, mode, effort, drop):
    """Whatever JSON arrives, the encoder renders it or raises MessageError -- never another exception."""
    try:
        encode_messages(messages, mode, effort, context=context, drop_thinking=drop)
    except MessageError:
        pass
    try:
        encode_messages(normalize_messages(messages), mode, effort, drop_thinking=drop)
    except MessageError:
        pass


# ---------------------------------------------------------------------------------------------------------
# properties over valid conversations


@st.composite
def conversations(draw, max_turns: int = 6) -> list[dict]:
    """Valid conversations over every role: tool loops with ids, shuffled results, reminders, developers."""
    out: list[dict] = []
    if draw(st.booleans()):
        out.append({"role": "system", "content": draw(safe_text), **({"tools": TOOLS} if draw(st.booleans()) else {})})
    for k in range(draw(st.integers(1, max_turns))):
        kind = draw(st.sampled_from(["user", "user", "assistant", "calls", "reminder", "developer", "system"]))
        if kind == "user":
            out.append(u(draw(safe_text)))
        elif kind == "assistant":
            out.append(a(draw(safe_text), draw(st.one_of(st.none(), safe_text))))
        elif kind == "calls":
            n = draw(st.integers(1, 3))
            ids = [f"c{k}_{j}" for j in range(n)]
            out.append(a(draw(safe_text), draw(safe_text), [call(draw(names), json.dumps({"x": draw(safe_text)}), cid)
                                                               for cid in ids]))
            out += [tool(draw(safe_text), cid) for cid in draw(st.permutations(ids))]
        elif kind == "reminder":
            out.append({"role": "latest_reminder", "content": draw(safe_text)})
        elif kind == "developer":
            out.append({"role": "developer", "content": draw(safe_text.filter(bool))})
        else:
            out.append({"role": "system", "content": draw(safe_text)})
    return out


PROPERTY = settings(max_examples=300, deadline=None)


@PROPERTY
@given(conversations(), st.sampled_from(["chat", "thinking"]), st.booleans())
def test_high_effort_is_no_effort(messages, mode, drop):
    """spec 2.1: None and "high" produce identical prompts."""
    assert encode_messages(messages, mode, "high", drop_thinking=drop) == encode_messages(messages, mode, drop_thinking=drop)


@PROPERTY
@given(conversations(), st.booleans())
def test_chat_mode_ignores_drop_and_max(messages, drop):
    """spec 6 / 8: in chat mode neither drop_thinking nor "max" changes anything, and no reasoning appears."""
    prompt = encode_messages(messages, "chat", drop_thinking=drop)
    assert prompt == encode_messages(messages, "chat", "max", drop_thinking=not drop)
    assert OPEN not in prompt.replace(PREAMBLE, "")


@PROPERTY
@given(conversations(), st.booleans(), st.booleans())
def test_max_effort_is_the_prefix_after_bos(messages, drop, bos):
    """spec 8: Think Max = Think High with EFFORT_MAX right after BOS (or at the start without BOS)."""
    high = encode_messages(messages, "thinking", "high", drop_thinking=drop, add_default_bos_token=bos)
    lead = BOS if bos else ""
    assert encode_messages(messages, "thinking", "max", drop_thinking=drop, add_default_bos_token=bos) == (
        lead + EFFORT_MAX + high[len(lead):])


@PROPERTY
@given(conversations(), st.sampled_from(["chat", "thinking"]), st.sampled_from([None, "max"]), st.booleans())
def test_bos_flag_only_removes_the_bos(messages, mode, effort, drop):
    """spec 2.1: add_default_bos_token only decides the leading BOS; the encoder writes no CR of its own."""
    with_bos = encode_messages(messages, mode, effort, drop_thinking=drop)
    assert with_bos.startswith(BOS)
    assert encode_messages(messages, mode, effort, drop_thinking=drop, add_default_bos_token=False) == with_bos[len(BOS):]
    assert "\r" not in with_bos


@PROPERTY
@given(conversations(), st.sampled_from(["chat", "thinking"]), st.data())
def test_result_arrival_order_does_not_matter(messages, mode, data):
    """spec 4.3: results answering calls with distinct ids render in call order whatever order they arrive in."""
    shuffled, k = [], 0
    while k < len(messages):
        j = k
        while j < len(messages) and messages[j]["role"] == "tool":
            j += 1
        if j > k:
            shuffled += data.draw(st.permutations(messages[k:j]))
            k = j
        else:
            shuffled.append(messages[k])
            k += 1
    for drop in (True, False):
        assert encode_messages(shuffled, mode, drop_thinking=drop) == encode_messages(messages, mode, drop_thinking=drop)


@PROPERTY
@given(conversations(), st.sampled_from(["chat", "thinking"]), st.data())
def test_context_split_before_an_assistant_is_append_only(messages, mode, data):
    """spec 11: with a split before an assistant/latest_reminder, encode(C) + encode(M, context=C) ==
    encode(C + M) wherever rendering is append-only (chat; thinking with drop disabled)."""
    cuts = [k for k in range(1, len(messages)) if messages[k]["role"] in ("assistant", "latest_reminder")]
    if not cuts:
        return
    k = data.draw(st.sampled_from(cuts))
    context, rest = messages[:k], messages[k:]
    drop = mode == "chat" and data.draw(st.booleans())
    whole = encode_messages(messages, mode, "max", drop_thinking=drop)
    assert encode_messages(context, mode, "max", drop_thinking=drop) + encode_messages(
        rest, mode, "max", context=context, drop_thinking=drop) == whole


@PROPERTY
@given(st.lists(safe_text, min_size=1, max_size=4), conversations(3), st.sampled_from(["chat", "thinking"]))
def test_consecutive_user_messages_are_one_turn(texts, history, mode):
    """spec 4.1/4.2: consecutive user messages (no task) render as one user message holding their texts joined
    by a blank line, wherever they stand."""
    split = [*history, *(u(t) for t in texts)]
    joined = [*history, u("\n\n".join(texts))]
    for drop in (True, False):
        assert encode_messages(split, mode, drop_thinking=drop) == encode_messages(joined, mode, drop_thinking=drop)
