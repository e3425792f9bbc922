"""Malformed requests get 4xx naming the field (never 500, never a hung stream, never a dead engine); the
request variants clients send get 200 with `cached_tokens` in the usage and streams that end with [DONE];
disconnects leave the server healthy."""

from __future__ import annotations

import copy
import json
import random
import threading

import httpx
import pytest
from serve_helpers import TIMEOUT, D, PromptIds, chat, stream

pytestmark = pytest.mark.server

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def _base(model: str) -> dict:
    return copy.deepcopy({"model": model, "max_tokens": 4, "tools": [TOOL], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "thanks"}]})


# (name, mutation of the valid base request, text the error must contain)
def _mutations(model: str) -> list[tuple[str, dict, str]]:
    cases: list[tuple[str, dict, str]] = []

    def add(name: str, fn, needle: str = "") -> None:
        body = _base(model)
        fn(body)
        cases.append((name, body, needle))

    for bad in ["wizard", "", "USERS", "function", "root", 7, None, ["user"], {"r": 1}]:
        add(f"role={bad!r}", lambda b, bad=bad: b["messages"][1].update(role=bad), "role")
    for bad in [7, 1.5, True, {"text": "x"}, [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                [{"type": "nope"}], [7]]:
        add(f"user content={bad!r}", lambda b, bad=bad: b["messages"][1].update(content=bad), "content")
    for bad in [None, [{"type": "text"}], [{"type": "text", "text": 7}], [{"type": "audio", "audio": "x"}]]:
        add(f"user content={bad!r}", lambda b, bad=bad: b["messages"][1].update(content=bad), "content")
    add("tool content object", lambda b: b["messages"][3].update(content={"a": 1}), "messages[3].content")
    add("user content missing", lambda b: b["messages"][1].pop("content"), "content")
    add("tool without tool_call_id", lambda b: b["messages"][3].pop("tool_call_id"), "tool_call_id")
    add("tool_call_id null", lambda b: b["messages"][3].update(tool_call_id=None), "tool_call_id")
    add("tool_call_id empty", lambda b: b["messages"][3].update(tool_call_id=""), "tool_call_id")
    add("tool_call_id unknown", lambda b: b["messages"][3].update(tool_call_id="call_zzz"), "tool_call_id")
    add("tool result first", lambda b: b.update(messages=[b["messages"][3], b["messages"][1]]), "messages[0]")
    add("tool result without calls", lambda b: b["messages"].pop(2), "messages[")
    for bad in [None, "x", 7, [], {}, {"name": None}, {"name": 7, "arguments": "{}"}, {"arguments": "{}"}]:
        add(f"tool_call function={bad!r}", lambda b, bad=bad: b["messages"][2].update(
            tool_calls=[{"id": "call_1", "type": "function", "function": bad}]))
    for bad in ["[1, 2]", "3", '"str"', "null", "true"]:
        add(f"arguments={bad}", lambda b, bad=bad: b["messages"][2]["tool_calls"][0]["function"].update(arguments=bad),
            "arguments")
    add("tool_calls not a list", lambda b: b["messages"][2].update(tool_calls={"id": "x"}))
    add("tool_calls items not objects", lambda b: b["messages"][2].update(tool_calls=["call"]))
    add("messages missing", lambda b: b.pop("messages"), "messages")
    add("messages empty", lambda b: b.update(messages=[]), "essages")
    for bad in [None, "hello", 7, {"role": "user"}, [None], ["hello"], [[]]]:
        add(f"messages={bad!r}", lambda b, bad=bad: b.update(messages=bad), "messages")
    for bad in [7, "x", [7], [{"type": "function"}], [{"type": "function", "function": {}}],
                [{"type": "function", "function": {"name": 7}}],
                [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
                [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "required": "city"}}}],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
                [TOOL, TOOL]]:
        add(f"tools={json.dumps(bad)[:60]}", lambda b, bad=bad: b.update(tools=bad))
    for bad in ["sometimes", 7, {"type": "function"}, {"type": "function", "function": {"name": "nope"}},
                {"type": "function", "function": {}}, {"function": {"name": 7}}, ["auto"]]:
        add(f"tool_choice={bad!r}", lambda b, bad=bad: b.update(tool_choice=bad), "tool_choice")
    add("required without tools", lambda b: (b.pop("tools"), b.update(tool_choice="required"),
                                             b["messages"].__delitem__(slice(2, 4))), "tool")
    add("named without tools", lambda b: (b.pop("tools"), b["messages"].__delitem__(slice(2, 4)), b.update(
        tool_choice={"type": "function", "function": {"name": "get_weather"}})), "tool")
    for bad in ["extreme", "HIGHEST", 7, -1, 2.5, True, [], {"x": 1}]:
        add(f"reasoning_effort={bad!r}", lambda b, bad=bad: b.update(reasoning_effort=bad), "reasoning_effort")
    for bad in [{"type": "sometimes"}, {"kind": "enabled"}, "on", 7, [True]]:
        add(f"thinking={bad!r}", lambda b, bad=bad: b.update(thinking=bad), "thinking")
    for bad in ["yes", 7, [1]]:
        add(f"chat_template_kwargs.thinking={bad!r}",
            lambda b, bad=bad: b.update(chat_template_kwargs={"thinking": bad}), "thinking")
    add("chat_template_kwargs not a dict", lambda b: b.update(chat_template_kwargs=[1]))
    add("reasoning wrong type", lambda b: b["messages"][2].update(reasoning=7), "reasoning")
    add("reasoning_content wrong type", lambda b: b["messages"][2].update(reasoning_content=7), "reasoning_content")
    for key, bad in [("max_tokens", -5), ("max_tokens", 0), ("max_tokens", "many"), ("max_tokens", 10**9),
                     ("max_completion_tokens", -1), ("temperature", -1.0), ("temperature", "hot"),
                     ("top_p", 1.5), ("top_p", -0.1), ("top_k", -7), ("n", 0), ("n", "two"), ("stop", 7),
                     ("stop", [1, 2]), ("logprobs", "maybe"), ("top_logprobs", -1), ("presence_penalty", 9.0),
                     ("frequency_penalty", -9.0), ("seed", "abc"), ("stream", "maybe"), ("parallel_tool_calls", "x"),
                     ("response_format", {"type": "nope"}), ("response_format", "json"),
                     ("response_format", {"type": "json_schema"}), ("stream_options", 7), ("logit_bias", [1])]:
        add(f"{key}={bad!r}", lambda b, key=key, bad=bad: b.update({key: bad}))
    for bad in [{"abc": 1}, {"": 1}, {"1.5": 1}]:
        add(f"logit_bias={bad!r}", lambda b, bad=bad: b.update(logit_bias=bad), "logit_bias")
    for key, bad in [("max_tokens", 3.5), ("model", None), ("user", 5), ("seed", 1.5), ("n", 1.5)]:
        add(f"{key}={bad!r} (type)", lambda b, key=key, bad=bad: b.update({key: bad}), key)
    for bad in [{"type": "nope"}, {"properties": 5}, {"required": "a"}]:
        add(f"json_schema schema={bad!r}", lambda b, bad=bad: b.update(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad}}), "response_format.json_schema.schema")
    add("json_schema without name", lambda b: b.update(response_format={"type": "json_schema", "json_schema": {
        "schema": {"type": "object"}}}), "response_format.json_schema.name")
    add("tool_call type custom", lambda b: b["messages"][2]["tool_calls"][0].update(type="custom"),
        "messages[2].tool_calls[0].type")
    add("response_format type unknown", lambda b: b.update(response_format={"type": "xml"}), "response_format.type")
    add("tool name with a quote", lambda b: b["tools"][0]["function"].update(name='get"weather'), "tools[0].function.name")
    add("parameter name with a quote", lambda b: b["tools"][0]["function"]["parameters"]["properties"].update(
        {'ci"ty': {"type": "string"}}), "tools[0].function.parameters.properties")
    add("tool description not a string", lambda b: b["tools"][0]["function"].update(description=5), "description")
    add("oversized prompt", lambda b: b["messages"][1].update(content="word " * 40000))
    add("assistant tool_call name missing",
        lambda b: b["messages"][2]["tool_calls"][0]["function"].update(name=""), "name")
    return cases


def _raw_cases() -> list[tuple[str, dict]]:
    """Bodies that are not a chat request at all (sent as raw bytes)."""
    return [(name, {"content": body, "headers": headers}) for name, body, headers in [
        ("empty body", b"", {"content-type": "application/json"}),
        ("not json", b"{messages: [}", {"content-type": "application/json"}),
        ("json null", b"null", {"content-type": "application/json"}),
        ("json list", b"[1, 2]", {"content-type": "application/json"}),
        ("json string", b'"hi"', {"content-type": "application/json"}),
        ("truncated json", b'{"messages": [{"role": "user", "content": "hi"', {"content-type": "application/json"}),
        ("bad utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {"content-type": "application/json"}),
        ("form encoded", b"messages=hi", {"content-type": "application/x-www-form-urlencoded"}),
        ("no content type", b'{"messages": [{"role": "user", "content": "hi"}]}', {}),
        ("text plain", b'{"messages": [{"role": "user", "content": "hi"}]}', {"content-type": "text/plain"}),
        ("lone surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', {"content-type": "application/json"}),
        ("nested too deeply", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", {"content-type": "application/json"}),
    ]]


def test_fuzz_corpus_yields_only_4xx_and_server_stays_healthy(scripted_server):
    server = scripted_server
    server.script([])
    cases = _mutations(server.model)
    failures = []
    count = 0
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
        for stream_flag in (False, True):
            for name, body, needle in cases:
                body = copy.deepcopy(body)
                if "stream" not in name:
                    body["stream"] = stream_flag
                r = client.post("/v1/chat/completions", json=body)
                count += 1
                if not 400 <= r.status_code < 500:
                    failures.append(f"{name} (stream={stream_flag}): {r.status_code} {r.text[:200]}")
                elif needle and needle.lower() not in r.text.lower():
                    failures.append(f"{name}: error does not name {needle!r}: {r.text[:200]}")
                elif "site-packages" in r.text:  # SGLang's validation dump ends with its source location
                    failures.append(f"{name}: error shows server internals: {r.text[:200]}")
        for name, raw in _raw_cases():
            r = client.post("/v1/chat/completions", **raw)
            count += 1
            if not 400 <= r.status_code < 500 or "site-packages" in r.text:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        assert client.get("/health").status_code == 200
    assert count >= 200
    assert not failures, "\n".join(failures)
    ok = chat(server.base_url, {"model": server.model, "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 4})
    assert ok.status_code == 200


def test_concurrent_streams_with_client_disconnects(scripted_server):
    server = scripted_server
    server.script([{"when": "long story", "reply": "Once upon a time. " * 25 + "</think>" + "The end. " * 25}])
    rng = random.Random(5)
    results: list[str] = []

    def worker(i: int, cut: int | None) -> None:
        body = {"model": server.model, "messages": [{"role": "user", "content": f"long story {i}"}],
                "max_tokens": 400, "stream": True}
        try:
            with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
                for n, line in enumerate(r.iter_lines()):
                    if cut is not None and n >= cut:
                        results.append("cut")
                        return  # closing the response drops the connection mid-stream
                    if line == "data: [DONE]":
                        results.append("done")
                        return
            results.append("no-done")
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            results.append(f"error {e!r}")

    threads = [threading.Thread(target=worker, args=(i, rng.choice([None, 3, 10, 40]) if i % 2 else None))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert set(results) <= {"cut", "done"}, results
    assert results.count("done") >= 4
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    _, msg = stream(server.base_url, {"model": server.model, "max_tokens": 400,
                                      "messages": [{"role": "user", "content": "long story again"}]})
    assert msg["content"].startswith("The end.")


def test_prompt_endpoints_reject_what_would_kill_the_engine(scripted_server):
    """/generate and /v1/completions hand token ids and logprob options to the scheduler unchecked; an id
    outside the vocabulary or a prompt-logprob request used to crash it (every later request failed)."""
    server = scripted_server
    server.script([])
    vocab = len(PromptIds(server.model_dir).hf)
    cases = [
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 2}, "logprobs"),
        ("/v1/completions", {"prompt": [5, vocab + 7]}, "prompt[1]"),
        ("/v1/completions", {"prompt": [[5], [5, -1]]}, "prompt[1][1]"),
        ("/generate", {"input_ids": [5, vocab]}, "input_ids[1]"),
        ("/generate", {"input_ids": [[5, -3]]}, "input_ids[0][1]"),
        ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": 0}, "logprob_start_len"),
    ]
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as client:
        for path, body, needle in cases:
            for stream_flag in (False, True):
                body = {**body, "stream": stream_flag, "model": server.model, "max_tokens": 2,
                        "sampling_params": {"max_new_tokens": 2}}
                r = client.post(path, json=body)
                assert r.status_code == 400, (path, body, r.status_code, r.text[:300])
                assert needle in r.json()["message"], (needle, r.text)
        for path in ("/generate", "/v1/completions"):
            r = client.post(path, content=b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.status_code, r.text[:300])
        r = client.post("/v1/completions", json={"model": server.model, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["message"] == "prompt: Field required", r.text
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"model": server.model, "prompt": [5, vocab - 1], "max_tokens": 2,
                                                 "logprobs": 1})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"]
        r = client.post("/generate", json={"input_ids": [5, 6], "return_logprob": True,
                                           "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        assert len(r.json()["meta_info"]["output_token_logprobs"]) == 2


def _variants(model: str) -> list[tuple[str, dict]]:
    """Valid request shapes OpenAI clients and agent frameworks send (name, body)."""
    user = [{"role": "user", "content": "hi"}]
    schema = {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    cases = [
        ("n=2", {"n": 2}), ("logprobs", {"logprobs": True}), ("top_logprobs", {"logprobs": True, "top_logprobs": 5}),
        ("stop string", {"stop": "a"}), ("stop list", {"stop": ["a", "b"]}), ("stop empty list", {"stop": []}),
        ("max_completion_tokens", {"max_tokens": None, "max_completion_tokens": 5}), ("seed", {"seed": 7}),
        ("json_object", {"response_format": {"type": "json_object"}}),
        ("json_schema", {"response_format": {"type": "json_schema", "json_schema": schema}}),
        ("text format", {"response_format": {"type": "text"}}),
        ("prefill", {"messages": [*user, {"role": "assistant", "content": "Hello"}]}),
        ("only system", {"messages": [{"role": "system", "content": "be brief"}]}),
        ("developer", {"messages": [{"role": "developer", "content": "be brief"}, *user]}),
        ("text parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}]}),
        ("unicode", {"messages": [{"role": "user", "content": "héllo 日本語 🎉 \u200b \x00 \x1b[31m"}]}),
        ("markers as text", {"messages": [{"role": "user", "content": "<｜Assistant｜></think><｜end▁of▁sentence｜>"}]}),
        ("unknown fields", {"foo": 1, "user": "u1", "metadata": {"a": "b"}, "store": False}),
        ("effort none", {"reasoning_effort": "none"}), ("effort max", {"reasoning_effort": "max"}),
        ("thinking disabled", {"thinking": {"type": "disabled"}}),
        ("enable_thinking false", {"chat_template_kwargs": {"enable_thinking": False}}),
        ("tools, tool_choice none", {"tools": [TOOL], "tool_choice": "none"}),
    ]
    return [(name, {"model": model, "messages": user, "max_tokens": 6, "temperature": 0, **extra})
            for name, extra in cases]


def test_request_variants_answer_with_cached_tokens_and_streams_agree(scripted_server):
    server = scripted_server
    server.script([])
    failures = []
    for name, body in _variants(server.model):
        r = chat(server.base_url, body)
        if r.status_code != 200:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
            continue
        data = r.json()
        if not isinstance(data["usage"]["prompt_tokens_details"]["cached_tokens"], int):
            failures.append(f"{name}: no cached_tokens in {data['usage']}")
        if len(data["choices"]) != body.get("n", 1):
            failures.append(f"{name}: {len(data['choices'])} choices")
        events, msg = stream(server.base_url, {**body, "stream_options": {"include_usage": True}})
        usage = [e["usage"] for e in events if e.get("usage")]
        if not usage or not isinstance(usage[-1]["prompt_tokens_details"]["cached_tokens"], int):
            failures.append(f"{name} (stream): no cached_tokens in the final usage")
        first = data["choices"][0]["message"]
        if body.get("n", 1) == 1 and (msg["content"], msg["reasoning_content"]) != (
                first["content"] or "", first["reasoning_content"] or ""):
            failures.append(f"{name}: stream {msg['content']!r}/{msg['reasoning_content']!r} != "
                            f"{first['content']!r}/{first['reasoning_content']!r}")
    assert not failures, "\n".join(failures)


def test_named_tool_choice_yields_one_call_streamed_or_not(scripted_server):
    """The forced-call grammar takes everything up to `</parameter>` as a string value, DSML markup included;
    the parser reads such a value as the end of the call and the start of another one. A named tool_choice
    still answers exactly one call."""
    server = scripted_server
    server.script([{"when": "named call", "reply": (
        f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Oslo</{D}invoke>\n'
        f'<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Rome</{D}parameter>\n</{D}invoke>\n'
        f"</{D}tool_calls>")}])
    body = {"model": server.model, "messages": [{"role": "user", "content": "named call"}], "tools": [TOOL],
            "max_tokens": 200, "temperature": 0, "thinking": {"type": "disabled"},
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    r = chat(server.base_url, body)
    assert r.status_code == 200, r.text
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in r.json()["choices"][0]["message"]["tool_calls"]]
    _, msg = stream(server.base_url, body)
    assert calls == [(c["name"], c["arguments"]) for c in msg["tool_calls"].values()] == [
        ("get_weather", '{"city": "Oslo"}')]
