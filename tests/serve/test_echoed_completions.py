"""Echoed completions carry the exact generated ids (issue 6, point 2), no server: `DSV4EncodingAdapter` with
the tiny V4 tokenizer, its `CompletionStore` filled by hand with a non-canonical split of a reply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("tokenizers")

from dsv4_agent.encoding import encode_segments, normalize_messages, resolve_reasoning  # noqa: E402
from dsv4_agent.encoding.tokens import EOS, THINK_CLOSE  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from dsv4_agent.serve.embedded import ensure_tokenizer  # noqa: E402
from dsv4_agent.serve.encoding_adapter import CompletionStore, DSV4EncodingAdapter  # noqa: E402

REPLY = "Radix trees share prefixes; eviction frees the least recently used leaves."


@pytest.fixture(scope="module")
def adapter() -> DSV4EncodingAdapter:
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ensure_tokenizer() / "tokenizer.json"))
    return DSV4EncodingAdapter(hf)


def request(thinking: bool = False, tools: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(tools=tools, response_format=None, chat_template_kwargs={"thinking": thinking},
                           reasoning_effort="high" if thinking else "none")


def plain_ids(adapter: DSV4EncodingAdapter, messages: list[dict], thinking: bool = False) -> list[int]:
    mode, effort = resolve_reasoning(None, thinking=thinking)
    return adapter.tokenizer.encode(encode_segments(normalize_messages(messages), mode, effort))


def odd_split(adapter: DSV4EncodingAdapter, text: str) -> list[int]:
    """Ids of `text` that its tokenization would not produce: the text tokenized in 3-character bits."""
    tok = adapter.tokenizer
    ids = [i for k in range(0, len(text), 3) for i in tok.piece_ids(text[k:k + 3], False)]
    assert tok.decode(ids) == text and ids != tok.piece_ids(text, False)
    return ids


def encode(adapter: DSV4EncodingAdapter, messages: list[dict], thinking: bool = False) -> list[int]:
    return adapter.encode_messages(messages=messages, request=request(thinking), tools=None, thinking=thinking,
                                   image_data=[])


def test_echoed_reply_gets_generated_ids(adapter):
    eos = adapter.tokenizer.token_id(EOS)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Radix cache?"}]
    generated = odd_split(adapter, REPLY) + [eos]
    adapter.remember_completion(generated)
    later = [{"role": "user", "content": "And eviction?"}]
    echoed = first + [{"role": "assistant", "content": REPLY}] + later
    ids = encode(adapter, echoed)
    prompt1 = plain_ids(adapter, first)
    assert ids[:len(prompt1) + len(generated)] == prompt1 + generated  # resumes after the whole turn
    assert adapter.tokenizer.decode(ids) == adapter.tokenizer.decode(plain_ids(adapter, echoed))
    assert ids != plain_ids(adapter, echoed)

    # A completion cut short (no EOS) is stored with the EOS the encoder writes after the turn.
    cut = odd_split(adapter, REPLY[:40])
    adapter.remember_completion(cut)
    ids = encode(adapter, first + [{"role": "assistant", "content": REPLY[:40]}] + later)
    assert ids[:len(prompt1) + len(cut) + 1] == prompt1 + cut + [eos]


def test_quoted_text_is_not_the_turn(adapter):
    """A user quoting the reply (EOS marker included) is plain data: the splice goes to the assistant turn."""
    generated = odd_split(adapter, REPLY) + [adapter.tokenizer.token_id(EOS)]
    adapter.remember_completion(generated)
    first = [{"role": "user", "content": REPLY + EOS}]
    messages = first + [{"role": "assistant", "content": REPLY}, {"role": "user", "content": "ok"}]
    prompt1 = plain_ids(adapter, first)
    assert encode(adapter, messages)[:len(prompt1) + len(generated)] == prompt1 + generated


@pytest.mark.parametrize("case", ["edited", "quoted", "reasoning_dropped"])
def test_fallback_to_plain_tokenization(adapter, case):
    tok = adapter.tokenizer
    eos = tok.token_id(EOS)
    thinking = case == "reasoning_dropped"
    user = {"role": "user", "content": "Radix cache?"}
    if case == "edited":  # the client changed the reply: its text matches no stored completion
        adapter.remember_completion(odd_split(adapter, REPLY) + [eos])
        messages = [user, {"role": "assistant", "content": REPLY + " Edited."}, {"role": "user", "content": "ok"}]
    elif case == "quoted":  # the stored text (EOS marker included) appears only as user data
        adapter.remember_completion(odd_split(adapter, REPLY) + [eos])
        messages = [{"role": "user", "content": REPLY + EOS}]
    else:  # thinking, no tools: an earlier turn is rendered without its reasoning, unlike the model wrote it
        generated = odd_split(adapter, "Think about it.") + [tok.token_id(THINK_CLOSE)] + odd_split(adapter, REPLY)
        adapter.remember_completion(generated + [eos])
        messages = [user, {"role": "assistant", "content": REPLY, "reasoning_content": "Think about it."},
                    {"role": "user", "content": "ok"}]
    assert encode(adapter, messages, thinking) == plain_ids(adapter, messages, thinking)


def test_thinking_tool_turn_keeps_reasoning_and_splices(adapter):
    """With tools every reasoning block is kept, so a thinking-mode turn is rendered as the model wrote it."""
    tok = adapter.tokenizer
    tool = {"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {}}}}
    reasoning, content = "Check the docs first.", "Done looking."
    generated = odd_split(adapter, reasoning) + [tok.token_id(THINK_CLOSE)] + odd_split(adapter, content)
    adapter.remember_completion(generated + [tok.token_id(EOS)])
    messages = [{"role": "user", "content": "Look it up."},
                {"role": "assistant", "content": content, "reasoning_content": reasoning},
                {"role": "user", "content": "Thanks."}]
    req = request(thinking=True, tools=[SimpleNamespace(model_dump=lambda **_: tool)])
    ids = adapter.encode_messages(messages=messages, request=req, tools=None, thinking=True, image_data=[])
    n = len(generated)
    assert any(ids[k:k + n] == generated for k in range(len(ids) - n + 1))
    assert tok.decode(ids) == tok.decode(tok.encode(adapter.segments(messages, req)))


def test_store_is_bounded_lru():
    store = CompletionStore(capacity_tokens=10)
    store.put("a", [1, 2, 3, 4])
    store.put("b", [5, 6, 7, 8])
    assert store.get("a") == [1, 2, 3, 4]  # now most recent
    store.put("c", [9, 10, 11])
    assert store.get("b") is None and store.get("a") == [1, 2, 3, 4] and store.get("c") == [9, 10, 11]
    store.put("huge", list(range(11)))
    assert store.get("huge") is None
