"""Our chat encoding as an SGLang `ChatEncodingAdapter`: prompts from `dsv4_agent.encoding`, injection-safe ids.

`encode_segments` splits the V4 prompt into trusted pieces (control tokens the encoder wrote itself) and
untrusted pieces (template prose and every byte of message data). Untrusted text is tokenized with
special-token matching off, so a user or a tool result that contains `<｜Assistant｜>` or `｜DSML｜` yields
ordinary text tokens, never the control token. For prompts without marker strings in the data the ids equal
those of tokenizing the whole prompt string (control tokens always split tokenization).

Output parsing is left to the text parsers (`output` is None): our reasoning and tool-call detectors.
"""

from __future__ import annotations

import re
from typing import Any

from dsv4_agent.encoding import encode_segments, normalize_messages, resolve_reasoning

# Fields SGLang's message model adds that are not part of the V4 input model.
_SGLANG_ONLY_FIELDS = ("phase", "prefix")


class SegmentTokenizer:
    """Token ids of `(text, trusted)` pieces: trusted pieces with added tokens recognised, the rest without."""

    def __init__(self, hf_tokenizer: Any):
        from tokenizers import Tokenizer

        backend = getattr(hf_tokenizer, "backend_tokenizer", None) or hf_tokenizer._tokenizer
        serialized = backend.to_str()
        self._trusted = Tokenizer.from_str(serialized)
        self._untrusted = Tokenizer.from_str(serialized)
        self._untrusted.encode_special_tokens = True  # special added tokens are split like plain text
        added = {tok.content: i for i, tok in backend.get_added_tokens_decoder().items()}
        self._added_ids = set(added.values())
        # Added tokens not flagged special are still matched by encode_special_tokens=True tokenizers;
        # such markers are broken in two before tokenizing (see _plain).
        self._marker_re = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))

    def _plain(self, text: str) -> list[int]:
        ids = self._untrusted.encode(text, add_special_tokens=False).ids
        if self._added_ids.isdisjoint(ids):
            return ids
        out: list[int] = []
        pos = 0
        for m in self._marker_re.finditer(text):
            out += self._untrusted.encode(text[pos : m.start()], add_special_tokens=False).ids
            marker = m.group()
            out += self._plain(marker[:1]) + self._plain(marker[1:])
            pos = m.end()
        return out + self._untrusted.encode(text[pos:], add_special_tokens=False).ids

    def encode(self, pieces: list[tuple[str, bool]]) -> list[int]:
        ids: list[int] = []
        for text, trusted in pieces:
            ids += self._trusted.encode(text, add_special_tokens=False).ids if trusted else self._plain(text)
        return ids


def _clean(message: dict[str, Any]) -> dict[str, Any]:
    """SGLang's dumped message -> the client-shaped dict `normalize_messages` expects (no null fields)."""
    out = {k: v for k, v in message.items() if v is not None and k not in _SGLANG_ONLY_FIELDS}
    if out.get("tool_calls"):
        out["tool_calls"] = [{k: v for k, v in call.items() if v is not None and k != "index"}
                             for call in out["tool_calls"]]
    if out.get("tools"):
        out["tools"] = [_tool_dict(t) for t in out["tools"]]
    return out


def _tool_dict(tool: Any) -> dict[str, Any]:
    d = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else dict(tool)
    fn = {k: v for k, v in d.get("function", {}).items() if v is not None and k != "key_order"}
    return {"type": d.get("type", "function"), "function": fn}


def prompt_mode(request: Any) -> tuple[str, str | None]:
    """(thinking_mode, V4 effort) of a request normalised by the chat handler (`thinking` kwarg set)."""
    ctk = request.chat_template_kwargs or {}
    effort = request.reasoning_effort if isinstance(request.reasoning_effort, str) else None
    return resolve_reasoning(effort, thinking=bool(ctk.get("thinking")))


class DSV4EncodingAdapter:
    collects_openai_media = False
    strict_tool_call_arguments = False  # the encoder validates and serialises arguments itself

    def __init__(self, tokenizer: Any):
        self.tokenizer = SegmentTokenizer(tokenizer)

    @property
    def output(self) -> None:
        return None

    def segments(self, messages: list[dict[str, Any]], request: Any) -> list[tuple[str, bool]]:
        """The prompt pieces. Every request-level tool is rendered (also under a named tool_choice, which
        the grammar enforces), so the prompt prefix stays the same across the turns of a tool loop."""
        mode, effort = prompt_mode(request)
        tools = request.tools
        response_format = None
        if request.response_format is not None and request.response_format.type == "json_schema":
            response_format = request.response_format.model_dump(exclude_none=True, by_alias=True)
        normalized = normalize_messages([_clean(m) for m in messages],
                                        tools=[_tool_dict(t) for t in tools] if tools else None,
                                        response_format=response_format)
        return encode_segments(normalized, mode, effort)

    def encode_messages(self, *, messages: list[dict[str, Any]], request: Any, tools: list[dict] | None,
                        thinking: bool, image_data: list) -> list[int]:
        return self.tokenizer.encode(self.segments(messages, request))


def build_adapter(ctx: Any) -> DSV4EncodingAdapter | None:
    """`chat_encoding_adapters._BUILDERS` entry for our spec."""
    if ctx.tokenizer is None:  # --skip-tokenizer-init: the server encodes no chat prompts
        return None
    return DSV4EncodingAdapter(ctx.tokenizer)
