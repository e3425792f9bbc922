"""Speed of the V4 chat-format layer: encode / parse per message, streaming parser per output token.

    python benchmarks/encoding.py [--official PATH/encoding_dsv4.py] [--repeat 5]

Side by side, when available: the official encoder (`--official`, the checkpoint's `encoding/encoding_dsv4.py`;
its outputs are also checked equal to ours) and `deepseek_recipe` (a Rust-backed V4 encoder/stream
processor shipped in the serving venv; different defaults, so only its timings are comparable).
"Token" = 4 characters of completion text (no tokenizer is bundled); the streaming parser is fed one such
chunk per call, as a server feeds detokenized deltas. Times are process CPU time, best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from typing import Any

from dsv4_agent.encoding import StreamParser, encode_messages, parse_completion, render_assistant

CHARS_PER_TOKEN = 4
TOOLS = [{"type": "function", "function": {
    "name": f"tool_{k}", "description": "Run a shell command and return its output. " * 3,
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}, "timeout": {"type": "integer"}},
                   "required": ["cmd"]}}} for k in range(6)]
REASONING = "Let me check the failing test first; the traceback points at parse() in utils.py. " * 12
RESULT = "tests/test_utils.py::test_parse FAILED\nAssertionError: expected 3, got 4\n" * 12
MARKDOWN = "| col | val |\n|-----|-----|\n| a<b | 1 |\n\nSome **bold** text with <tags> and code `x|y`.\n" * 4


def agent_conversation(steps: int) -> list[dict[str, Any]]:
    """System + tools, a user request, then `steps` rounds of assistant(reasoning, calls) + tool results."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent.", "tools": TOOLS},
                                      {"role": "user", "content": "Fix the failing test in utils.py."}]
    for s in range(steps):
        calls = [{"id": f"c{s}_{j}", "type": "function", "function": {
            "name": f"tool_{j}", "arguments": json.dumps({"cmd": f"pytest -x tests/ -k case{j}", "timeout": 60})}}
            for j in range(2)]
        messages.append({"role": "assistant", "reasoning_content": REASONING, "content": "", "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": RESULT} for c in calls]
    messages.append({"role": "assistant", "reasoning_content": REASONING, "content": MARKDOWN})
    return messages


def best(fn: Callable[[], Any], repeat: int) -> float:
    """Least CPU time of `repeat` runs (process CPU time: stable on a machine shared with other jobs)."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def stream(text: str, mode: str) -> None:
    parser = StreamParser(mode, id_factory=str)
    for i in range(0, len(text), CHARS_PER_TOKEN):
        parser.feed(text[i:i + CHARS_PER_TOKEN])
    parser.finish()


def long_completion(tokens: int) -> str:
    """Thinking-mode completion of about `tokens` tokens: reasoning, markdown content, a large string argument."""
    chars = tokens * CHARS_PER_TOKEN
    body = (MARKDOWN * (chars // len(MARKDOWN) // 3 + 1))[: chars // 3]
    message = {"role": "assistant", "reasoning_content": (REASONING * (chars // len(REASONING) // 3 + 1))[: chars // 3],
               "content": body, "tool_calls": [{"type": "function", "function": {
                   "name": "write_file", "arguments": json.dumps({"path": "a.md", "text": body, "mode": 420})}}]}
    return render_assistant(message, "thinking")


def load_official(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("encoding_dsv4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_peer() -> Any:
    try:
        import deepseek_recipe
    except ImportError:
        return None
    return deepseek_recipe


def recipe_conversation(d: Any, messages: list[dict[str, Any]]) -> Any:
    tools = [d.ToolDefinition(t["function"]["name"], t["function"]["description"], t["function"]["parameters"]) for t in TOOLS]
    typed = []
    for m in messages[1:]:
        if m["role"] == "user":
            typed.append(d.UserMessage(m["content"]))
        elif m["role"] == "tool":
            typed.append(d.ToolMessage(m["content"], m["tool_call_id"]))
        else:
            calls = [d.ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls", [])]
            typed.append(d.AssistantMessage(m["content"], m["reasoning_content"], calls or None))
    return d.Conversation([d.SystemMessage(messages[0]["content"]), *typed], thinking_mode=True, tools=tools,
                          reasoning_effort="high")


def recipe_stream(d: Any, conversation: Any, text: str) -> None:
    request = d.ConversationRequest(conversation, d.ModelVersion.DeepseekV4Pro)
    processor = d.StreamProcessor(d.ChatCompletionRequest.chunk_generator(request, "id", "m"),
                                  d.ParsingOptions(thinking_initial_stage=d.ThinkingInitialStage.ReasoningStart))
    processor.push(d.InferenceChunk.ready())
    for i in range(0, len(text), CHARS_PER_TOKEN):
        processor.push(d.InferenceChunk.text(text[i:i + CHARS_PER_TOKEN], 1))
    processor.push(d.InferenceChunk.finish(d.InferenceFinishReason.Stop))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", help="path of the official encoding_dsv4.py (optional)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    official = load_official(args.official) if args.official else None
    recipe = recipe_peer()
    rows: list[tuple[str, str, str, str]] = []  # (what, ours, official, deepseek_recipe)

    def us(seconds: float, per: int) -> str:
        return f"{seconds / per * 1e6:.1f}"

    # encode: whole agent conversations, per message
    for steps in (5, 50):
        messages = agent_conversation(steps)
        n = len(messages)
        ours = best(lambda m=messages: encode_messages(m, "thinking"), args.repeat)
        off = rec = "-"
        if official is not None:
            assert official.encode_messages(messages, thinking_mode="thinking") == encode_messages(messages, "thinking")
            off = us(best(lambda m=messages: official.encode_messages(m, thinking_mode="thinking"), args.repeat), n)
        if recipe is not None:
            conv = recipe_conversation(recipe, messages)
            enc = recipe.DeepseekV4Encoding()
            rec = us(best(lambda c=conv, e=enc: e.render_conversation(c), args.repeat), n)
        rows.append((f"encode, agent conversation of {n} messages (us/message)", us(ours, n), off, rec))

    # parse: one assistant turn with reasoning, content and two calls, per message
    completion = render_assistant(agent_conversation(1)[2], "thinking")
    for strict in (True, False):
        ours = best(lambda s=strict: [parse_completion(completion, "thinking", strict=s) for _ in range(200)], args.repeat)
        off = "-"
        if official is not None and strict:
            assert official.parse_message_from_completion_text(completion, "thinking") == parse_completion(
                completion, "thinking", strict=True)
            off = us(best(lambda: [official.parse_message_from_completion_text(completion, "thinking")
                                   for _ in range(200)], args.repeat), 200)
        rows.append((f"parse ({'strict' if strict else 'lenient'}) a {len(completion)}-char turn (us/message)",
                     us(ours, 200), off, "-"))

    # streaming: per output token, at growing lengths (flat = linear cost)
    for tokens in (1_000, 10_000, 100_000):
        text = long_completion(tokens)
        n = len(text) // CHARS_PER_TOKEN
        ours = best(lambda t=text: stream(t, "thinking"), max(1, args.repeat // (2 if tokens >= 100_000 else 1)))
        rec = "-"
        if recipe is not None:
            conv = recipe_conversation(recipe, agent_conversation(0)[:2])
            rec = us(best(lambda t=text, c=conv: recipe_stream(recipe, c, t), 3), n)
        rows.append((f"stream a {n}-token completion, 1 token/feed (us/token)", us(ours, n), "-", rec))

    print("| measurement | dsv4_agent.encoding | official encoder | deepseek_recipe (Rust) |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
