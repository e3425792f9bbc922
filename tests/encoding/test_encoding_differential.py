"""Differential test against the official encoder, when its file is available.

Set DSV4_OFFICIAL_ENCODER to the checkpoint's `encoding/encoding_dsv4.py`; skipped otherwise (the file is
not redistributed here). Random conversations over every role and field: both encoders must produce the
same prompt or both reject the input; the strict parser must agree with the official one on mutated
completions.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from dsv4_agent.encoding import encode_messages, parse_completion
from encoding_strategies import completions, names, safe_text
from hypothesis import given, settings
from hypothesis import strategies as st

PATH = os.environ.get("DSV4_OFFICIAL_ENCODER")
pytestmark = pytest.mark.skipif(not PATH, reason="DSV4_OFFICIAL_ENCODER not set")


@pytest.fixture(scope="module")
def official():
    spec = importlib.util.spec_from_file_location("encoding_dsv4", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maybe_text = st.one_of(st.none(), safe_text)
call_ids = st.sampled_from(["a", "b", "c", "", None])
tools = st.lists(st.just({"type": "function", "function": {"name": "f", "description": "é"}}), max_size=2)


@st.composite
def message(draw) -> dict:
    role = draw(st.sampled_from(["system", "developer", "user", "user", "assistant", "assistant", "tool", "tool",
                                 "latest_reminder"]))
    m: dict = {"role": role}
    if role == "developer":
        m["content"] = draw(safe_text.filter(bool))
    elif role == "user":
        m["content"] = draw(safe_text)
    elif role == "tool":
        m["content"] = draw(st.one_of(safe_text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                                  "text": safe_text}), max_size=2)))
        if draw(st.booleans()):
            m["tool_call_id"] = draw(call_ids)
    else:
        m["content"] = draw(maybe_text)
    if role == "assistant":
        if draw(st.booleans()):
            m["reasoning_content"] = draw(maybe_text)
        calls = []
        for _ in range(draw(st.integers(0, 3))):
            args = draw(st.one_of(st.dictionaries(names, st.one_of(safe_text, st.integers(), st.lists(st.booleans())),
                                                  max_size=3).map(json.dumps), safe_text))
            call = {"type": "function", "function": {"name": draw(names), "arguments": args}}
            if (cid := draw(call_ids)) is not None:
                call["id"] = cid
            calls.append(call)
        if calls or draw(st.booleans()):
            m["tool_calls"] = calls
        if draw(st.integers(0, 5)) == 0:
            m["wo_eos"] = True
    if role in ("system", "developer", "assistant", "user") and draw(st.integers(0, 3)) == 0:
        m["tools"] = draw(tools)
    if role in ("system", "developer") and draw(st.integers(0, 4)) == 0:
        m["response_format"] = {"type": "json_object"}
    if draw(st.integers(0, 8)) == 0:
        m["task"] = draw(st.sampled_from(["action", "query", "authority", "domain", "title", "read_url"]))
    return m


@settings(max_examples=1000, deadline=None)
@given(st.lists(message(), max_size=8), st.integers(0, 8), st.sampled_from(["chat", "thinking"]),
       st.sampled_from([None, "high", "max"]), st.booleans(), st.booleans())
def test_encoder_matches_official(official, conv, split, mode, effort, drop, bos):
    context, messages = conv[:split], conv[split:]
    kwargs = {"context": context, "drop_thinking": drop, "add_default_bos_token": bos}
    try:
        expected = official.encode_messages(messages, mode, reasoning_effort=effort, **kwargs)
    except Exception:
        expected = None
    try:
        got = encode_messages(messages, mode, effort, **kwargs)
    except ValueError:
        got = None
    assert got == expected


@settings(max_examples=1000, deadline=None)
@given(completions())
def test_strict_parser_matches_official(official, case):
    text, mode = case
    try:
        expected = official.parse_message_from_completion_text(text, mode)
    except (AssertionError, ValueError):
        expected = None
    try:
        got = parse_completion(text, mode, strict=True)
    except ValueError:
        got = None
    assert got == expected
