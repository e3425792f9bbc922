"""Unmodified client libraries against the server: the openai SDK and litellm (`openai/`, `hosted_vllm/`)."""

from __future__ import annotations

import json

import pytest
from serve_helpers import invoke, tool_block

pytestmark = pytest.mark.server

TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up.", "parameters": {
    "type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}
REPLY = "The user wants a definition.</think>" + tool_block(invoke("lookup", word="serendipity"))


@pytest.fixture(scope="module")
def server(scripted_server):
    scripted_server.script([{"when": "define serendipity", "reply": REPLY},
                            {"when": "thanks", "reply": "Done.</think>You are welcome."}])
    return scripted_server


def _check_call(name: str, arguments: str) -> None:
    assert name == "lookup" and json.loads(arguments) == {"word": "serendipity"}


def test_openai_sdk_tool_loop_and_stream(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Please define serendipity."}]
    r = client.chat.completions.create(model=server.model, messages=messages, tools=[TOOL], max_tokens=100)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    _check_call(msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments)
    assert msg.model_extra["reasoning_content"] == "The user wants a definition."

    chunks = list(client.chat.completions.create(model=server.model, messages=messages, tools=[TOOL],
                                                 max_tokens=100, stream=True))
    args = "".join(tc.function.arguments or "" for c in chunks for tc in (c.choices[0].delta.tool_calls or [])
                   if c.choices)
    names = [tc.function.name for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
             if tc.function.name]
    _check_call(names[0], args)

    # Second turn, sent back the way the SDK hands it over (no reasoning field).
    messages += [msg.model_dump(exclude_none=True, exclude={"reasoning_content", "reasoning"}),
                 {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "a happy accident"},
                 {"role": "user", "content": "thanks"}]
    r2 = client.chat.completions.create(model=server.model, messages=messages, tools=[TOOL], max_tokens=50)
    assert r2.choices[0].message.content == "You are welcome."


@pytest.mark.parametrize("prefix", ["openai/", "hosted_vllm/"])
def test_litellm_prefixes(server, prefix):
    litellm = pytest.importorskip("litellm")
    kw = {"model": prefix + server.model, "api_base": server.base_url + "/v1", "api_key": "unused"}
    messages = [{"role": "user", "content": "define serendipity"}]
    r = litellm.completion(messages=messages, tools=[TOOL], max_tokens=100, **kw)
    call = r.choices[0].message.tool_calls[0]
    _check_call(call.function.name, call.function.arguments)
    assert "definition" in (r.choices[0].message.reasoning_content or "")

    chunks = list(litellm.completion(messages=messages, tools=[TOOL], max_tokens=100, stream=True, **kw))
    args = "".join(tc.function.arguments or "" for c in chunks for tc in (c.choices[0].delta.tool_calls or []))
    assert json.loads(args) == {"word": "serendipity"}

    messages += [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "a happy accident"},
                 {"role": "user", "content": "thanks"}]
    r2 = litellm.completion(messages=messages, tools=[TOOL], max_tokens=50, **kw)
    assert r2.choices[0].message.content == "You are welcome."
