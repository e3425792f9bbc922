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


def call(server: ServerProcess, ids: list[int], max_new: int = NEW, **params) -> dict:
    """/generate (greedy); ``params`` go into sampling_params, except the request-level keys."""
    request = {k: params.pop(k) for k in ("return_logprob", "top_logprobs_num", "cache_salt") if k in params}
    r = httpx.post(server.base_url + "/generate", timeout=300, json={
        "input_ids": ids, **request,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True, **params}})
    r.raise_for_status()
    return r.json()


def generate(server: ServerProcess, ids: list[int], n: int = NEW) -> tuple[list[int], int]:
    body = call(server, ids, n)
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


# ---------------------------------------------------------------------------------------------------------
# Adversarial cases: the same contract (cache on == cache off, token for token) where clients and the
# scheduler do awkward things. References from `off` run concurrently (it has no state to disturb).
# ---------------------------------------------------------------------------------------------------------
def concurrently(server: ServerProcess, prompts: list[list[int]], max_new: int = NEW, **params) -> list[dict]:
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(lambda ids: call(server, ids, max_new, **params), prompts))


def outputs(results) -> list[list[int]]:
    return [r["output_ids"] for r in results]


def cached_tokens(result: dict) -> int:
    return result["meta_info"]["cached_tokens"]


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 2000) for _ in range(n)]


def test_edited_truncated_or_repeated_history(servers):
    """An agent edits or drops its last message, re-sends a strict prefix, or repeats a turn exactly: every
    match ends inside a cached sequence at a point not aligned to 4 or 128. The cache resumes only from a
    state at or below the match (never from a finish state whose incomplete page disagrees) and recomputes
    the rest, so outputs equal the uncached server's."""
    on, off = servers
    prompt = tokens(101, 301)
    first = call(on, prompt)
    out = first["output_ids"]
    end = len(prompt) + NEW - 1  # the finish state's position: the last generated token was never fed
    variants = [
        prompt[:290] + tokens(102, 7),  # the last message edited inside the last page (at 290)
        prompt + out[:3] + tokens(103, 5),  # the reply cut after 3 tokens, then a new message
        prompt[:251],  # a strict prefix ending inside the second page
        prompt[:130] + tokens(104, 5),  # diverges inside the second page (at 130)
        prompt,  # the same turn again: a match must leave >= 1 token to compute
        prompt + out[:-1],  # exactly prompt + completion: the finish state at `end` is one token too deep
        prompt + out + tokens(105, 2),  # the agent's next turn: resumes at exactly `end`
    ]
    got = [call(on, ids, 4) for ids in variants]
    assert outputs(got) == outputs(concurrently(off, variants, 4))
    # the prompt's last page boundary (a kept state) for the edits; the same turn again also resumes there
    # and leaves its own finish state at len(prompt) + 3, which the next variant (a prefix of it) resumes from
    assert [cached_tokens(r) for r in got[:2]] + [cached_tokens(got[4])] == [256, 256, 256]
    assert cached_tokens(got[5]) == len(prompt) + 3
    assert cached_tokens(got[-1]) == end


def test_same_whole_page_prompt_again(servers):
    """A prompt of exactly two pages sent twice (a client retry): SGLang computes at least one token, so the
    state at 256 is one token too deep and the repeat resumes one page below; a changed reply still resumes
    at 256."""
    on, off = servers
    prompt = tokens(161, 256)
    variants = [prompt, prompt, prompt + tokens(162, 5)]
    got = [call(on, ids, 4) for ids in variants]
    assert outputs(got) == outputs(concurrently(off, variants, 4))
    assert [cached_tokens(r) for r in got] == [0, 128, 256]


def test_more_sessions_than_resume_states_allow(servers):
    """Four sessions take turns on a server that keeps 5 resume states. Each turn leaves a page-aligned
    snapshot and a finish state; snapshots are evicted first, so each session keeps its finish state and
    every next turn resumes exactly after the previous one (plain LRU dropped them)."""
    _, off = servers
    small = ServerProcess(COMMON[:2] + ["--max-total-tokens", "8192"] + COMMON[4:] + ["--enable-cache-report"],
                          env={"DSV4_AGENT_MAX_RESUME_STATES": "5"})
    with small:
        sessions = [tokens(170 + i, 140 + 13 * i) for i in range(4)]
        for turn in range(2):
            prompts = [s + tokens(180 + turn, 3) if turn else s for s in sessions]
            got = [call(small, ids, 4) for ids in prompts]
            assert outputs(got) == outputs(concurrently(off, prompts, 4))
            if turn:
                assert [cached_tokens(r) for r in got] == [len(s) - 1 for s in sessions]  # all of the last turn
            sessions = [ids + r["output_ids"] for ids, r in zip(prompts, got, strict=True)]


def test_overlapping_requests_while_one_runs(servers):
    """Requests sharing a prefix with a request that is still decoding match its freshly inserted pages and
    states; identical extensions of one finished turn race for its incomplete page (one claims it, the others
    resume from a shallower state). Nothing a running request owns is read or freed under it."""
    on, off = servers
    prompt = tokens(111, 260)
    others = [prompt + tokens(112, 3), prompt, prompt[:200] + tokens(113, 1)]
    chunks, pending = [], None
    with cf.ThreadPoolExecutor(1) as ex, httpx.stream("POST", on.base_url + "/generate", timeout=300, json={
            "input_ids": prompt, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if pending is None:  # its prefill is done and it decodes: the others arrive now
                    pending = ex.submit(concurrently, on, others, 4)
        during = pending.result()
    first_out = chunks[-1]["output_ids"]
    assert all("cached_tokens" in c["meta_info"] for c in chunks)  # reported on every streamed chunk
    assert first_out == call(off, prompt, 16)["output_ids"]
    assert outputs(during) == outputs(concurrently(off, others, 4))
    assert cached_tokens(during[0]) == cached_tokens(during[1]) == 256  # its prompt-boundary state, kept while it runs

    turn = prompt + first_out + tokens(114, 4)
    end = len(prompt) + 16 - 1
    got = concurrently(on, [turn] * 2, 4)
    assert outputs(got) == outputs(concurrently(off, [turn], 4)) * 2
    # one claims the incomplete page at `end`; the other resumes from a shallower state (the prompt's
    # boundary, or the finish state of the identical prompt sent above, which is a prefix of this turn)
    hits = sorted(cached_tokens(r) for r in got)
    assert 256 <= hits[0] < hits[1] == end, hits


def test_aborted_requests_then_resent(servers):
    """A request aborted mid-decode (explicitly, as SGLang does when a streaming client disconnects) and a
    client that just drops its stream; the same prompt and extensions of what was generated come next."""
    on, off = servers
    prompt = tokens(121, 150)
    ref = call(off, prompt, 16)["output_ids"]
    got = []
    with httpx.stream("POST", on.base_url + "/generate", timeout=300, json={
            "input_ids": prompt, "stream": True, "rid": "v4tail-abort-1",
            "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got.append(json.loads(line[6:]))
                if len(got) == 3:
                    httpx.post(on.base_url + "/abort_request", json={"rid": "v4tail-abort-1"}, timeout=30)
                    break
    assert got[-1]["output_ids"] == ref[:len(got[-1]["output_ids"])]
    other = tokens(122, 140)
    with httpx.stream("POST", on.base_url + "/generate", timeout=300, json={
            "input_ids": other, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the client goes away after the first chunk
    prompts = [prompt + ref + tokens(123, 2), prompt, prompt + ref[:2] + tokens(124, 2),
               other, other + tokens(125, 3)]
    results = [call(on, ids, 4) for ids in prompts]
    assert outputs(results) == outputs(concurrently(off, prompts, 4))
    # the aborted request left its exact state where it stopped: the extension resumes past the prompt
    assert len(prompt) < cached_tokens(results[0]) < len(prompt) + 16


def test_parallel_sampling_on_cached_prefix(servers):
    """``n`` > 1 (SGLang first prefills the prompt alone, then runs the copies): every copy equals the
    uncached server's, on a fresh prompt and on an extension of a cached turn."""
    on, off = servers
    prompt = tokens(131, 170)
    a, b = call(on, prompt, 6, n=3), call(off, prompt, 6, n=3)
    assert outputs(a) == outputs(b) and len({tuple(o) for o in outputs(a)}) == 1
    turn = prompt + a[0]["output_ids"] + tokens(132, 3)
    a, b = call(on, turn, 6, n=2), call(off, turn, 6, n=2)
    assert outputs(a) == outputs(b)
    assert all(cached_tokens(r) >= 128 for r in a)


def test_sampled_copies_each_resume(servers):
    """``n`` = 2 sampled copies end at the same length with different tokens: each leaves its own finish
    state, so the next turn resumes exactly after whichever copy the client keeps."""
    on, off = servers
    prompt = tokens(133, 200)
    copies = outputs(call(on, prompt, 6, n=2, temperature=1.0))
    assert copies[0] != copies[1]
    turns = [prompt + c + tokens(134, 2) for c in copies]
    got = [call(on, ids, 3) for ids in turns]
    assert outputs(got) == outputs(concurrently(off, turns, 3))
    assert [cached_tokens(r) for r in got] == [len(prompt) + 5] * 2


def test_stop_token_and_stop_string_then_next_turn(servers):
    """A turn that ends on a stop token or a stop string (not max_tokens) leaves its state after the last
    token it fed; the next turn, which carries the stop token / the text's tokens, resumes there exactly."""
    on, off = servers
    for seed, stop in ((141, "token"), (142, "string")):
        prompt = tokens(seed, 170)
        ref = call(off, prompt, 12)
        if stop == "token":
            params = {"stop_token_ids": [ref["output_ids"][4]], "ignore_eos": False}
        else:
            text = ref["text"]  # a plain word-like piece from its second half (not a partial UTF-8 character)
            piece = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 2) if text[i:i + 3].isalnum()
                         and text[i:i + 3].isascii())
            params = {"stop": [piece], "ignore_eos": False}
        a, b = call(on, prompt, 12, **params), call(off, prompt, 12, **params)
        assert a["output_ids"] == b["output_ids"] and a["meta_info"]["finish_reason"]["type"] == "stop", stop
        turn = prompt + a["output_ids"] + tokens(seed + 100, 4)
        a2, b2 = call(on, turn, 4), call(off, turn, 4)
        assert a2["output_ids"] == b2["output_ids"], stop
        assert cached_tokens(a2) == len(prompt) + len(a["output_ids"]) - 1, stop  # the stop token was never fed


def test_one_token_window_and_page_length_prompts(servers):
    """Prompts of one token, of the window (16), of exactly one page (128) and of 125 tokens whose turn ends
    exactly on a page boundary (125 + 4 generated: a state at 128, no incomplete page); then their next turns.
    States also keep to their namespace (cache_salt), including those of prompts below one page."""
    on, off = servers
    firsts = [[77], tokens(151, 16), tokens(152, 128), tokens(153, 125)]
    got = [call(on, ids, 4) for ids in firsts]
    turns = [ids + r["output_ids"] + [5] for ids, r in zip(firsts, got, strict=True)]
    got_next = [call(on, ids, 3) for ids in turns]
    assert outputs(got) == outputs(concurrently(off, firsts, 4))
    assert outputs(got_next) == outputs(concurrently(off, turns, 3))
    assert [cached_tokens(r) for r in got_next] == [1 + 3, 16 + 3, 128 + 3, 128]

    prompt = tokens(154, 60)
    first = call(on, prompt, 4, cache_salt="alice")
    turn = prompt + first["output_ids"] + [9]
    assert [cached_tokens(call(on, turn, 2, cache_salt=s)) for s in ("bob", None, "alice")] == [0, 0, 60 + 3]


def test_logprobs_on_cached_prefix(servers):
    """return_logprob: the resumed request's output logprobs equal the uncached server's (fp32, up to
    summation order) and the request still resumes at the previous turn's end."""
    on, off = servers
    prompt = tokens(161, 150)
    first = call(on, prompt, 5)
    turn = prompt + first["output_ids"] + tokens(162, 3)
    a = call(on, turn, 5, return_logprob=True, top_logprobs_num=3)
    b = call(off, turn, 5, return_logprob=True, top_logprobs_num=3)
    assert a["output_ids"] == b["output_ids"] and cached_tokens(a) == len(prompt) + 4
    la, lb = a["meta_info"]["output_token_logprobs"], b["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in la] == [t[1] for t in lb]
    assert max(abs(x[0] - y[0]) for x, y in zip(la, lb, strict=True)) < 1e-4
    ta, tb = a["meta_info"]["output_top_logprobs"], b["meta_info"]["output_top_logprobs"]
    assert [[t[1] for t in step] for step in ta] == [[t[1] for t in step] for step in tb]


def test_one_request_evicts_everything_while_another_runs(servers):
    """A single prompt that needs most of the pool (16 pages) arrives while a session turn decodes: it evicts
    every other page and state it can, never the running turn's, and both come out exact; the session then
    continues exactly (from whatever the eviction left)."""
    on, off = servers
    turn, big = tokens(171, 300), tokens(172, 1500)  # 3 + 12 pages: all 16 in use at once
    got = concurrently(on, [turn, big], 12)
    assert outputs(got) == outputs(concurrently(off, [turn, big], 12))
    nxt = turn + got[0]["output_ids"] + tokens(173, 2)
    assert call(on, nxt, 4)["output_ids"] == call(off, nxt, 4)["output_ids"]
    assert "memory leak" not in on.log_path.read_text(errors="replace")
