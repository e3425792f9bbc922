"""Exact prefix reuse inside SGLang (issue 6, points 2, 3 and 6): real servers, the tiny V4 model in fp32.

Two servers serve the same embedded tiny checkpoint, one with our radix cache (``v4tail``) and one with
``--disable-radix-cache``, both with a pool small enough that sessions evict each other's pages and states. Multi-turn sessions (each turn's prompt = previous prompt + completion + new
tokens, like an agent re-sending its history) run interleaved on both; greedy outputs must be identical
token for token, while the cached server resumes at non-page-aligned, non-4-aligned points and reports
them in ``cached_tokens``. A plain-PyTorch greedy run of the same model checks one session end to end.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random

import httpx
import pytest
import torch
from dsv4_agent.encoding import encode_segments, normalize_messages
from dsv4_agent.encoding.tokens import DSML, EOS
from transformers import PreTrainedTokenizerFast

from dsv4_agent.model import PagePool, Step, load_model
from dsv4_agent.serve.embedded import ensure_tiny_model, ensure_tokenizer
from dsv4_agent.serve.encoding_adapter import SegmentTokenizer
from dsv4_agent.serve.testing import ServerProcess

pytestmark = pytest.mark.server

# A small pool (16 pages) so that the interleaved sessions force evictions of pages and resume states.
COMMON = ["--dtype", "float32", "--max-total-tokens", "2048", "--max-running-requests", "4",
          "--chunked-prefill-size", "256", "--skip-server-warmup"]
NEW = 8  # tokens generated per turn


@pytest.fixture(scope="module")
def servers():
    on = ServerProcess(COMMON + ["--enable-cache-report"])
    off = ServerProcess(COMMON + ["--disable-radix-cache"])
    with cf.ThreadPoolExecutor(2) as ex:  # the two startups overlap
        list(ex.map(lambda s: s.start(), (on, off)))
    yield on, off
    on.stop()
    off.stop()


def generate(server: ServerProcess, ids: list[int], n: int = NEW) -> tuple[list[int], int]:
    r = httpx.post(server.base_url + "/generate", timeout=300, json={
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}})
    r.raise_for_status()
    body = r.json()
    return body["output_ids"], body["meta_info"]["cached_tokens"]


def session(server: ServerProcess, seed: int, first: list[int], growth: list[int]) -> list[tuple[list[int], int, list[int]]]:
    """Turns (output ids, cached tokens, prompt); prompt_k = prompt_{k-1} + completion_{k-1} + new tokens."""
    rng = random.Random(seed)
    prompt, turns = list(first), []
    for k, extra in enumerate([0, *growth]):
        if k:
            prompt = next_prompt(prompt, turns[-1][0], extra, rng)
        out, cached = generate(server, prompt)
        turns.append((out, cached, prompt))
    return turns


def next_prompt(prompt: list[int], completion: list[int], extra: int, rng: random.Random) -> list[int]:
    return prompt + completion + [rng.randrange(2, 2000) for _ in range(extra)]


def test_multi_turn_sessions_equal_uncached(servers):
    on, off = servers
    rng = random.Random(0)
    system = [rng.randrange(2, 2000) for _ in range(200)]  # shared "system prompt" (not page-aligned)
    plans = [  # (seed, first prompt, new tokens per later turn)
        (1, system + [rng.randrange(2, 2000) for _ in range(101)], [57, 3, 130, 1]),
        (2, system + [rng.randrange(2, 2000) for _ in range(9)], [250, 77]),
        (3, system[:150] + [rng.randrange(2, 2000) for _ in range(5)], [1, 1]),
    ]
    results = {}
    for name, server in (("on", on), ("off", off)):
        with cf.ThreadPoolExecutor(3) as ex:  # interleaved sessions
            results[name] = list(ex.map(lambda p, s=server: session(s, *p), plans))
    for s_on, s_off in zip(results["on"], results["off"], strict=True):
        assert [t[0] for t in s_on] == [t[0] for t in s_off]
        for k in range(1, len(s_on)):
            prev_len = len(s_on[k - 1][2]) + NEW - 1  # the last generated token was never fed to the model
            assert s_on[k][1] >= prev_len, f"turn {k}: cached {s_on[k][1]} < previous prompt+completion {prev_len}"
        assert all(t[1] == 0 for t in s_off)
    cached = [t[1] for s in results["on"] for t in s[1:]]
    assert any(c % 4 and c % 128 for c in cached), cached  # hits at positions not aligned to 4 / 128

    # Other traffic fills the pool: pages and resume states of the sessions get evicted. A further turn of
    # every session must still come out exactly as without the cache.
    for n in (600, 610, 620, 630):
        generate(on, [rng.randrange(2, 2000) for _ in range(n)], 2)
    for s_on in results["on"]:
        more = next_prompt(s_on[-1][2], s_on[-1][0], 3, rng)
        assert generate(on, more)[0] == generate(off, more)[0]
    log = on.log_path.read_text(errors="replace")
    assert "v4tail: evicted" in log and "v4tail: rid=" in log  # eviction happened; per-request recompute log
    assert "memory leak" not in log


def test_matches_plain_model(servers):
    """The served (cached) greedy continuation equals the plain PyTorch model's."""
    on, _ = servers
    model = load_model(ensure_tiny_model(), cache=True)
    torch.set_num_threads(1)
    rng = random.Random(5)
    prompt = [rng.randrange(2, 2000) for _ in range(133)]
    first, _ = generate(on, prompt)
    second_prompt = prompt + first + [rng.randrange(2, 2000) for _ in range(6)]
    second, cached = generate(on, second_prompt)
    assert cached == len(prompt) + NEW - 1
    for ids, out in ((prompt, first), (second_prompt, second)):
        seq = model.new_sequence(PagePool(model.config, 8))
        logits = model.forward([Step(seq, torch.tensor(ids))], numerics="fp32")[0].logits[-1]
        ref = []
        for _ in range(NEW):
            ref.append(int(logits.argmax()))
            logits = model.forward([Step(seq, torch.tensor(ref[-1:]))], numerics="fp32")[0].logits[-1]
        assert out == ref


def test_chat_usage_reports_cached_tokens(servers):
    """OpenAI chat: a second turn reports its reused prompt in usage.prompt_tokens_details.cached_tokens."""
    on, _ = servers
    model = httpx.get(on.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    history = [{"role": "system", "content": "You are a careful assistant. " * 40},
               {"role": "user", "content": "Summarize the design of a radix cache in three sentences."}]

    def chat(messages, **extra):
        r = httpx.post(on.base_url + "/v1/chat/completions", timeout=300, json={
            "model": model, "messages": messages, "max_tokens": 6, "temperature": 0, **extra})
        r.raise_for_status()
        return r.json()

    first = chat(history)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    second = chat(history + [{"role": "assistant", "content": "A radix cache shares prefixes."},
                             {"role": "user", "content": "And eviction?"}], logprobs=True, top_logprobs=2)
    # everything up to the end of the first prompt's last complete page is reused at least
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] // 128 * 128 > 0
    assert second["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_echoed_reply_resumes_after_it(servers, stream):
    """A client sending the previous reply back as text gets the ids the model generated for it (not the
    text's own tokenization), so the next turn resumes exactly after the previous prompt + reply; the
    outputs equal those of the server without a radix cache. The first turn is streamed or not."""
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ensure_tokenizer() / "tokenizer.json"))
    tok = SegmentTokenizer(hf)
    on, off = servers
    model = httpx.get(on.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 24, "temperature": 0, "thinking": {"type": "disabled"}}

    def chat(server, messages):
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=300,
                       json={**body, "messages": messages, "return_token_ids": True})
        r.raise_for_status()
        return r.json()["choices"][0], r.json()["usage"]

    def streamed_content(server, messages):
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=300,
                          json={**body, "messages": messages, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])

    # The random tiny model may write control tokens (which the parser drops or the encoder would not
    # write as control tokens: such replies are tokenized as text); take a system prompt whose reply has none.
    # The first turn runs on `off` first, so `on` stores only what its own first turn (stream or not) gives.
    question = "Name three prefix-sharing data structures." + " Stream it." * stream
    for system in ("You answer in one line. " * 9, "Be brief. " * 20, "Answer as a poet. " * 12):
        history = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        first, _ = chat(off, history)
        if not tok.control_ids(first["response_token_ids"]):
            break
    else:
        pytest.fail("no reply without control tokens")
    prompt1, reply1 = first["prompt_token_ids"], first["response_token_ids"]
    content = streamed_content(on, history) if stream else chat(on, history)[0]["message"]["content"]
    assert content == first["message"]["content"]
    messages = history + [{"role": "assistant", "content": content},
                          {"role": "user", "content": "Which one evicts best?"}]
    plain = tok.encode(encode_segments(normalize_messages(messages), "chat"))
    assert plain[:len(prompt1) + len(reply1)] != prompt1 + reply1  # re-tokenizing the reply differs

    second, usage = chat(on, messages)
    assert second["prompt_token_ids"][:len(prompt1) + len(reply1)] == prompt1 + reply1
    assert tok.decode(second["prompt_token_ids"]) == tok.decode(plain)
    # cut at max_tokens: the last reply token was never fed to the model; the EOS after it is new
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(prompt1) + len(reply1) - 1

    second_off, _ = chat(off, messages)
    assert second_off["prompt_token_ids"] == second["prompt_token_ids"]
    assert second_off["response_token_ids"] == second["response_token_ids"]


def test_chat_echoed_tool_call_with_reserialised_arguments(servers):
    """An agent client sends the tool call back with arguments it re-serialised (other key order, compact
    separators): the turn is matched by meaning and rendered from the model's own arguments, so the prompt
    holds the generated ids and the next turn resumes after the whole reply; outputs equal the uncached server."""
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ensure_tokenizer() / "tokenizer.json"))
    tok = SegmentTokenizer(hf)
    on, off = servers
    model = httpx.get(on.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {
        "mode": {"type": "string", "enum": ["head", "tail", "all"]}, "start_line": {"type": "integer"},
        "strict": {"type": "boolean"}}, "required": ["mode", "start_line", "strict"]}}}]
    body = {"model": model, "max_tokens": 300, "temperature": 0, "thinking": {"type": "disabled"}, "tools": tools,
            "return_token_ids": True}

    def chat(server, messages, **extra):
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=300,
                       json={**body, "messages": messages, **extra})
        r.raise_for_status()
        return r.json()["choices"][0], r.json()["usage"]

    # The grammar forces a call; take a system prompt under which the random model completes it within
    # max_tokens. The grammar also lets it spell `｜DSML｜` in text tokens, which is not the control token the
    # encoder writes (such a turn is tokenized as usual); a bias makes it write the control token, as a
    # trained model does.
    forced = {"tool_choice": {"type": "function", "function": {"name": "read_file"}},
              "logit_bias": {str(tok.token_id(DSML)): 100.0}}
    finished = []
    for system in ("Read files carefully. " * 8, "You are a coding agent. " * 6, "Inspect the code. " * 10):
        history = [{"role": "system", "content": system}, {"role": "user", "content": "Fix the crash."}]
        first, _ = chat(off, history, **forced)
        finished.append(first["finish_reason"])
        if first["finish_reason"] == "tool_calls":
            break
    else:
        pytest.fail(f"no complete forced tool call within max_tokens: {finished}")
    prompt1, reply1 = first["prompt_token_ids"], first["response_token_ids"]
    reply_on, _ = chat(on, history, **forced)
    assert reply_on["response_token_ids"] == reply1
    call = reply_on["message"]["tool_calls"][0]
    args = json.loads(call["function"]["arguments"])
    resent = json.dumps(dict(reversed(args.items())), separators=(",", ":"))  # what an agent framework sends
    messages = history + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "read_file", "arguments": resent}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "1: [section]\n2: key = value"}]
    as_sent = tok.encode(encode_segments(normalize_messages(messages, tools=tools), "chat"))
    assert as_sent[:len(prompt1) + len(reply1)] != prompt1 + reply1  # the client's key order renders otherwise

    second, usage = chat(on, messages, max_tokens=8)
    assert tok.control_ids(reply1).count(tok.token_id(DSML)) == 10  # every marker is the control token
    generated = reply1 + [tok.token_id(EOS)] * (reply1[-1] != tok.token_id(EOS))  # the EOS may be stripped
    assert second["prompt_token_ids"][:len(prompt1) + len(generated)] == prompt1 + generated
    # every generated token but the last (the EOS it sampled) was fed to the model and is reused
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(prompt1) + len(generated) - 1
    second_off, _ = chat(off, messages, max_tokens=8)
    assert second_off["prompt_token_ids"] == second["prompt_token_ids"]
    assert second_off["response_token_ids"] == second["response_token_ids"]
