"""`dsv4-agent serve` with no arguments: the embedded tiny random DeepSeek-V4 on our model class (real weights
path: official-format checkpoint, routed architecture, our encoding and parsers)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from serve_helpers import chat, stream

pytestmark = pytest.mark.server

PICK = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                     "bright": {"type": "boolean"}},
    "required": ["color", "bright"], "additionalProperties": False}}}
NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}


def test_no_args_server_answers_chat(tiny_server):
    model = tiny_server.model_name()
    assert "deepseek" in model
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8,
            "temperature": 0}
    r = chat(tiny_server.base_url, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert r.json()["usage"]["completion_tokens"] >= 1
    events, msg = stream(tiny_server.base_url, body)
    assert events and msg["finish_reason"] in ("stop", "length")
    # Greedy decoding: the streamed text equals the non-streamed one.
    m = choice["message"]
    assert (msg["reasoning_content"], msg["content"]) == (m["reasoning_content"] or "", m["content"] or "")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "pick"}}])
def test_forced_tool_choice_schema_valid_from_random_tiny_v4(tiny_server, choice):
    body = {"model": tiny_server.model_name(), "messages": [{"role": "user", "content": "Pick a color."}],
            "tools": [PICK, NOOP], "tool_choice": choice, "thinking": {"type": "disabled"}, "max_tokens": 200,
            "parallel_tool_calls": False}
    r = chat(tiny_server.base_url, body)
    assert r.status_code == 200, r.text
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert calls
    for call in calls:
        name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
        if isinstance(choice, dict):
            assert name == "pick"
        jsonschema.validate(args, {"pick": PICK, "noop": NOOP}[name]["function"]["parameters"])
