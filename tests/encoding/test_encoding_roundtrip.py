"""Round trip and prefix stability (issue 2, point 6)."""

from __future__ import annotations

import json

from dsv4_agent.encoding import encode_messages, parse_completion, render_assistant
from dsv4_agent.encoding.tokens import DSML, EOS
from encoding_strategies import assistant_messages, names, safe_text
from hypothesis import given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=500, deadline=None)
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]


def ids(i: int) -> str:
    return f"call_{i}"


def strip_ids(message: dict) -> dict:
    return {**message, "tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in message["tool_calls"]]}


@PROPERTY
@given(st.sampled_from(["chat", "thinking"]), st.data())
def test_parse_of_render_is_the_message(mode, data):
    message = data.draw(assistant_messages(mode == "thinking"))
    text = render_assistant(message, mode)
    assert parse_completion(text, mode, strict=True) == message
    assert strip_ids(parse_completion(text, mode, id_factory=ids)) == message


@st.composite
def agent_setups(draw):
    """(mode, drop_thinking, system message): the append-only settings of spec section 11."""
    mode = draw(st.sampled_from(["chat", "thinking"]))
    tools = draw(st.booleans())
    drop = draw(st.booleans()) if tools or mode == "chat" else False
    system = {"role": "system", "content": draw(safe_text)}
    if tools:
        system["tools"] = TOOLS
    return mode, drop, system


@PROPERTY
@given(agent_setups(), st.data())
def test_reencoding_parsed_turns_reproduces_the_prompt(setup, data):
    """Each turn: prompt P, model writes C, the parsed C goes back into the conversation; the next prompt
    starts with P + C byte for byte (what lets the prefix cache hit on the next agent step)."""
    mode, drop, system = setup
    conversation = [system, {"role": "user", "content": data.draw(safe_text)}]
    for _ in range(data.draw(st.integers(1, 3))):
        prompt = encode_messages(conversation, mode, drop_thinking=drop)
        completion = render_assistant(data.draw(assistant_messages(mode == "thinking")), mode)
        parsed = parse_completion(completion, mode, id_factory=ids)
        conversation.append(parsed)
        results = [{"role": "tool", "tool_call_id": c["id"], "content": data.draw(safe_text)} for c in parsed["tool_calls"]]
        conversation += data.draw(st.permutations(results)) if results else [{"role": "user", "content": "next"}]
        assert encode_messages(conversation, mode, drop_thinking=drop).startswith(prompt + completion)


def typed_completion(raw_values: list[str]) -> str:
    params = "\n".join(f'<{DSML}parameter name="p{i}" string="false">{raw}</{DSML}parameter>'
                       for i, raw in enumerate(raw_values))
    return (f'</think>\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n{params}\n</{DSML}invoke>\n'
            f"</{DSML}tool_calls>{EOS}")


# JSON as a model might write it: any spacing, number spellings the encoder would normalise.
raw_json = st.one_of(
    st.sampled_from(["[1,2]", "[1, 2]", "1.50", "1e2", "100.0", "-0", '{"a":1}', '{"a": 1}', "true", " true ",
                     "null", '"x"', '"\\u00e9"', "\n[\n  1\n]\n", "0.1", "1E+2", "[]", "{}"]),
    st.integers().map(str),
    st.lists(st.integers(-5, 5), max_size=3).map(lambda xs: "[" + ",".join(map(str, xs)) + "]"),
)


@PROPERTY
@given(st.lists(raw_json, min_size=1, max_size=4))
def test_verbatim_arguments_keep_what_the_model_wrote(raws):
    """Re-serialised arguments reproduce the model's bytes only for canonical JSON; `verbatim_arguments=True`
    reproduces any valid typed value (the parser keeps it verbatim in `arguments`) except a JSON string
    under string="false", which `arguments` cannot tell from a string="true" parameter."""
    completion = typed_completion(raws)
    conversation = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "q"}]
    prompt = encode_messages(conversation, "thinking")
    parsed = parse_completion(completion, "thinking", id_factory=ids)
    history = [*conversation, parsed, {"role": "tool", "tool_call_id": "call_0", "content": "r"}]
    representable = not any(isinstance(json.loads(r), str) for r in raws)
    canonical = representable and all(json.dumps(json.loads(r), ensure_ascii=False) == r for r in raws)
    assert encode_messages(history, "thinking", verbatim_arguments=True).startswith(prompt + completion) == representable
    assert encode_messages(history, "thinking").startswith(prompt + completion) == canonical


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(names, st.one_of(st.integers(), st.floats(allow_nan=False), safe_text), max_size=4))
def test_verbatim_is_identity_on_canonical_arguments(args):
    message = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": json.dumps(args, ensure_ascii=False)}}]}
    assert render_assistant(message, "chat", verbatim_arguments=True) == render_assistant(message, "chat")
