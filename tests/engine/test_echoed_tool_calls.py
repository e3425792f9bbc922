"""Echoed tool-call turns keep the generated ids (issue 6, point 2), no server:
`DSV4EncodingAdapter` with the tiny V4 tokenizer, completions recorded as the model would have written them
(text pieces in a non-canonical split, control tokens as themselves)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("tokenizers")

from dsv4_agent.encoding import encode_segments, normalize_messages, render_assistant  # noqa: E402
from dsv4_agent.encoding.tokens import EOS, SPECIAL_TOKENS  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from dsv4_agent.serve.embedded import ensure_tokenizer  # noqa: E402
from dsv4_agent.serve.encoding_adapter import DSV4EncodingAdapter  # noqa: E402

TOOL = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "start_line": {"type": "integer"}, "lines": {"type": "array"},
    "strict": {"type": "boolean"}}}}}
# What the model wrote (declared order, json.dumps spacing): the official rendering of these arguments.
MODEL_ARGS = '{"path": "src/café.py", "start_line": 120, "lines": [1, 2.5, null], "strict": false}'
CONTENT = "Reading the parser first."
HISTORY = [{"role": "system", "content": "You are a coding agent."},
           {"role": "user", "content": "Fix the crash on empty sections."}]
_CONTROL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def adapter() -> DSV4EncodingAdapter:
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ensure_tokenizer() / "tokenizer.json"))
    return DSV4EncodingAdapter(hf)


def request(thinking: bool = False) -> SimpleNamespace:
    return SimpleNamespace(tools=[SimpleNamespace(model_dump=lambda **_: TOOL)], response_format=None,
                           chat_template_kwargs={"thinking": thinking}, reasoning_effort="high" if thinking else "none")


def model_ids(adapter: DSV4EncodingAdapter, text: str) -> list[int]:
    """Ids a model may generate for `text`: control tokens as themselves, the rest in 2-character bits (a
    split its tokenization would not produce)."""
    tok, ids, pos = adapter.tokenizer, [], 0
    for m in [*_CONTROL.finditer(text), None]:
        plain = text[pos:m.start() if m else len(text)]
        ids += [i for k in range(0, len(plain), 2) for i in tok.piece_ids(plain[k:k + 2], False)]
        if m:
            ids.append(tok.token_id(m.group()))
            pos = m.end()
    assert tok.decode(ids) == text
    return ids


def reply(arguments: str, call_id: str = "call_1", content: str = CONTENT, reasoning: str | None = None) -> dict:
    msg = {"role": "assistant", "content": content,
           "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "read_file", "arguments": arguments}}]}
    return msg if reasoning is None else {**msg, "reasoning_content": reasoning}


def turn(echoed: dict) -> list[dict]:
    """The history, the echoed assistant turn and its tool result."""
    return [*HISTORY, echoed, {"role": "tool", "tool_call_id": echoed["tool_calls"][0]["id"], "content": "x = 1"}]


def encode(adapter: DSV4EncodingAdapter, messages: list[dict], thinking: bool = False) -> list[int]:
    return adapter.encode_messages(messages=messages, request=request(thinking), tools=None, thinking=thinking,
                                   image_data=[])


def official_ids(adapter: DSV4EncodingAdapter, messages: list[dict], thinking: bool = False) -> list[int]:
    mode, effort = ("thinking", "high") if thinking else ("chat", None)
    return adapter.tokenizer.encode(encode_segments(normalize_messages(messages, tools=[TOOL]), mode, effort))


def rewrites(args: str) -> list[str]:
    """What clients send back: json.dumps of their own dict with other spacing and key orders."""
    value = json.loads(args)
    return [json.dumps(value, sort_keys=True), json.dumps(value, separators=(",", ":")),
            json.dumps(dict(reversed(value.items())), indent=2), json.dumps(value, ensure_ascii=True)]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("variant", range(4))
def test_reserialised_arguments_get_generated_ids(adapter, thinking, variant):
    mode = "thinking" if thinking else "chat"
    produced = reply(MODEL_ARGS, reasoning="Look at the parser." if thinking else None)
    text = render_assistant(produced, mode)
    generated = model_ids(adapter, text)
    adapter.remember_completion(generated[:-1] + [adapter.tokenizer.token_id(EOS)])
    prompt1 = official_ids(adapter, HISTORY, thinking)

    client = reply(rewrites(MODEL_ARGS)[variant], call_id="call_client", reasoning=produced.get("reasoning_content"))
    messages = turn(client)
    ids = encode(adapter, messages, thinking)
    assert ids[:len(prompt1) + len(generated)] == prompt1 + generated  # resumes after the whole reply
    # the prompt is the official rendering of the messages with the turn the model actually produced
    produced_messages = turn({**produced, "tool_calls": [{**produced["tool_calls"][0], "id": "call_client"}]})
    assert adapter.tokenizer.decode(ids) == adapter.tokenizer.decode(official_ids(adapter, produced_messages, thinking))
    if variant in (0, 2):  # another key order renders another DSML block: the plain path would miss it
        assert adapter.tokenizer.decode(official_ids(adapter, messages, thinking)) != adapter.tokenizer.decode(ids)


@pytest.mark.parametrize("change", [
    lambda a: a.replace("120", "121"),            # another value
    lambda a: a.replace("120", "120.0"),          # JSON-equal in Python (120 == 120.0), not as JSON
    lambda a: a.replace("false", "0"),            # false == 0 in Python, not in JSON
    lambda a: a.replace('"strict": false', '"strict": false, "x": 1'),
])
def test_other_arguments_fall_back(adapter, change):
    generated = model_ids(adapter, render_assistant(reply(MODEL_ARGS), "chat"))
    adapter.remember_completion(generated)
    messages = turn(reply(change(MODEL_ARGS)))
    assert encode(adapter, messages) == official_ids(adapter, messages)


def test_other_content_or_name_falls_back(adapter):
    adapter.remember_completion(model_ids(adapter, render_assistant(reply(MODEL_ARGS), "chat")))
    for echoed in (reply(MODEL_ARGS, content=CONTENT + " "), {**reply(MODEL_ARGS), "content": None}):
        messages = turn(echoed)
        assert encode(adapter, messages) == official_ids(adapter, messages)


def test_non_canonical_typed_value_is_not_spliced(adapter):
    """The model wrote `[1,2]`: the official encoder renders `[1, 2]`, so the turn cannot be the model's
    text in an official prompt; it is tokenized as usual."""
    text = render_assistant(reply('{"lines": [1, 2]}'), "chat").replace("[1, 2]", "[1,2]")
    adapter.remember_completion(model_ids(adapter, text))
    messages = turn(reply('{"lines": [1,2]}'))
    assert encode(adapter, messages) == official_ids(adapter, messages)


def test_unchanged_echo_gets_its_own_reply_when_another_had_the_same_meaning(adapter):
    """Two sessions' replies equal as JSON but written in other key orders: each echoed unchanged gets its own
    generated ids (found by its exact rendering), not the later reply's."""
    first = render_assistant(reply(MODEL_ARGS), "chat")
    other_order = json.dumps(dict(reversed(json.loads(MODEL_ARGS).items())), ensure_ascii=False)
    second = render_assistant(reply(other_order), "chat")
    assert first != second
    first_ids, second_ids = model_ids(adapter, first), model_ids(adapter, second)
    adapter.remember_completion(first_ids)
    adapter.remember_completion(second_ids)  # same meaning: replaces the first under the meaning key
    prompt1 = official_ids(adapter, HISTORY)
    for args, generated in ((MODEL_ARGS, first_ids), (other_order, second_ids)):
        messages = turn(reply(args))
        ids = encode(adapter, messages)
        assert ids[:len(prompt1) + len(generated)] == prompt1 + generated
        assert adapter.tokenizer.decode(ids) == adapter.tokenizer.decode(official_ids(adapter, messages))
