"""HTTP helpers for the server tests: plain httpx, SSE assembly, the expected prompt ids of a request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from dsv4_agent.encoding import encode_segments, normalize_messages, resolve_reasoning
from dsv4_agent.encoding.tokens import DSML

D = DSML
TIMEOUT = httpx.Timeout(180.0)


def invoke(name: str, **params: Any) -> str:
    """One DSML invoke as the encoder writes it (strings raw with string="true", the rest JSON)."""
    lines = []
    for k, v in params.items():
        if isinstance(v, str):
            lines.append(f'<{D}parameter name="{k}" string="true">{v}</{D}parameter>\n')
        else:
            lines.append(f'<{D}parameter name="{k}" string="false">{json.dumps(v)}</{D}parameter>\n')
    return f'<{D}invoke name="{name}">\n' + "".join(lines) + f"</{D}invoke>\n"


def tool_block(*invokes: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "".join(invokes) + f"</{D}tool_calls>"


def chat(base_url: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT, **kw)


def stream(base_url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the SSE events, the message they assemble to: content, reasoning_content, reasoning, tool_calls)."""
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        saw_done = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                saw_done = True
                continue
            events.append(json.loads(line[len("data: "):]))
        assert saw_done
    msg: dict[str, Any] = {"content": "", "reasoning_content": "", "reasoning": "", "tool_calls": {},
                           "finish_reason": None}
    for ev in events:
        assert "error" not in ev, ev
        for choice in ev.get("choices", []):
            delta = choice.get("delta") or {}
            msg["content"] += delta.get("content") or ""
            msg["reasoning_content"] += delta.get("reasoning_content") or ""
            msg["reasoning"] += delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or []:
                slot = msg["tool_calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": "",
                                                                    "deltas": 0})
                slot["id"] = slot["id"] or call.get("id")
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                if fn.get("arguments"):
                    slot["arguments"] += fn["arguments"]
                    slot["deltas"] += 1
            if choice.get("finish_reason"):
                msg["finish_reason"] = choice["finish_reason"]
    return events, msg


class PromptIds:
    """The prompt ids the server must build for a request: our encoder + the injection-safe tokenizer."""

    def __init__(self, model_dir: Path):
        from transformers import PreTrainedTokenizerFast

        from dsv4_agent.serve.encoding_adapter import SegmentTokenizer

        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
        self.tok = SegmentTokenizer(self.hf)

    def expected(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 reasoning_effort: str | None = None, thinking: bool | None = None) -> list[int]:
        mode, effort = resolve_reasoning(reasoning_effort, thinking=thinking)
        return self.tok.encode(encode_segments(normalize_messages(messages, tools=tools), mode, effort))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)
