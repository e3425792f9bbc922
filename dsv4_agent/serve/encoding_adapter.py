"""Our chat encoding as an SGLang `ChatEncodingAdapter`: prompts from `dsv4_agent.encoding`, injection-safe ids.

`encode_segments` splits the V4 prompt into trusted pieces (control tokens the encoder wrote itself) and
untrusted pieces (template prose and every byte of message data). Untrusted text is tokenized with
special-token matching off, so a user or a tool result that contains `<｜Assistant｜>` or `｜DSML｜` yields
ordinary text tokens, never the control token. For prompts without marker strings in the data the ids equal
those of tokenizing the whole prompt string (control tokens always split tokenization).

Echoed completions (issue 6): re-tokenizing a completion the model wrote can give other ids than it generated
(a model may emit a non-canonical split), and the radix cache then stops matching a few tokens into the
previous reply. `CompletionStore` keeps, for every finished completion whose text the encoder renders back
exactly (decode -> parse -> re-render closed), its exact output ids keyed by the completion's *meaning*:
thinking mode, reasoning (when the mode renders it), content, and each call's name and arguments as JSON
values. Clients re-serialise tool-call arguments (other spacing, other key order: the OpenAI SDK and agent
frameworks `json.dumps` their own dicts), which changes the rendered DSML; an echoed turn whose meaning is
a stored completion therefore gets the model's own argument strings back before encoding, so the prompt is
the official rendering of the messages the model actually produced, and at a place where the prompt's
control tokens are the ones the model wrote, the stored ids replace the re-tokenized ones. Anything else is
tokenized as usual. Not covered: a reply cut by a stop string (its output ids run past the text the client
sees; the cache's resume state lies at their end, beyond the cut, so the next turn resumes from a page-aligned
state either way).

Output parsing is left to the text parsers (`output` is None): our reasoning and tool-call detectors.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from dsv4_agent.encoding import (
    encode_segments,
    normalize_messages,
    parse_completion,
    render_assistant,
    resolve_reasoning,
)
from dsv4_agent.encoding.tokens import EOS

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
            ids += self.piece_ids(text, trusted)
        return ids

    def piece_ids(self, text: str, trusted: bool) -> list[int]:
        return self._trusted.encode(text, add_special_tokens=False).ids if trusted else self._plain(text)

    def decode(self, ids: Sequence[int]) -> str:
        """The exact text of `ids`, control tokens included."""
        return self._trusted.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        return self._trusted.token_to_id(token)

    def control_ids(self, ids: Sequence[int]) -> list[int]:
        return [i for i in ids if i in self._added_ids]


class PromptText:
    """The prompt pieces with their character offsets, for tokenizing a part of the prompt as the whole
    prompt's tokenization would (`span_ids`) and for finding where a part may be cut out (`can_cut`)."""

    def __init__(self, pieces: list[tuple[str, bool]], tokenizer: SegmentTokenizer):
        self.pieces, self.tokenizer = pieces, tokenizer
        self.starts = [0]
        for text, _ in pieces:
            self.starts.append(self.starts[-1] + len(text))
        self.text = "".join(text for text, _ in pieces)

    def can_cut(self, pos: int) -> bool:
        """Whether the ids of text[:pos] + text[pos:] equal those of the prompt: at a piece boundary, or
        between two control tokens of a trusted piece (untrusted text may tokenize across any cut)."""
        k = bisect.bisect_right(self.starts, pos) - 1
        if k >= len(self.pieces) or self.starts[k] == pos:
            return True
        text, trusted = self.pieces[k]
        if not trusted:
            return False
        cut = pos - self.starts[k]
        tok = self.tokenizer
        return tok.piece_ids(text[:cut], True) + tok.piece_ids(text[cut:], True) == tok.piece_ids(text, True)

    def span_ids(self, start: int, end: int) -> list[int]:
        """Ids of text[start:end], both ends at places where `can_cut` holds."""
        ids: list[int] = []
        k = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while k < len(self.pieces) and self.starts[k] < end:
            text, trusted = self.pieces[k]
            lo, hi = max(start - self.starts[k], 0), min(end - self.starts[k], len(text))
            ids += self.tokenizer.piece_ids(text[lo:hi], trusted)
            k += 1
        return ids


COMPLETION_STORE_TOKENS = 1 << 23  # output ids remembered in all (LRU, 4 bytes each: 32 MiB)


class CompletionStore:
    """Bounded LRU map key -> the token ids the model generated (keys: `completion_key`)."""

    def __init__(self, capacity_tokens: int = COMPLETION_STORE_TOKENS):
        self.capacity_tokens = capacity_tokens
        self._items: OrderedDict[bytes, array] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def put(self, key: bytes, ids: Sequence[int]) -> None:
        if len(ids) > self.capacity_tokens:
            return
        value = array("i", ids)
        with self._lock:
            old = self._items.pop(key, None)
            self._tokens += len(value) - (len(old) if old is not None else 0)
            self._items[key] = value
            while self._tokens > self.capacity_tokens:
                self._tokens -= len(self._items.popitem(last=False)[1])

    def get(self, key: bytes) -> list[int] | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                return None
            self._items.move_to_end(key)
        return value.tolist()


def _json_value(arguments: Any) -> str:
    """Arguments as a canonical JSON text (objects' key order and all spacing removed; 1, 1.0 and true stay
    apart), or the raw text tagged as such when it is not JSON."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return "raw:" + arguments
    return json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def completion_key(message: dict[str, Any], mode: str) -> bytes:
    """The meaning of an (encoder-input) assistant message in `mode`: what the encoder renders of it, with
    tool-call arguments compared as JSON values. Call ids are not rendered and not part of it."""
    meaning = [mode, str(message.get("reasoning_content") or "") if mode == "thinking" else "",
               str(message.get("content") or ""),
               [[str(c["function"].get("name")), _json_value(c["function"].get("arguments"))]
                for c in message.get("tool_calls") or []]]
    return hashlib.sha256(json.dumps(meaning, ensure_ascii=False).encode("utf-8", "surrogatepass")).digest()


def rendered_key(text: str, mode: str) -> bytes:
    """An assistant turn's exact rendered text in `mode` (looked up before its meaning, so a client echoing a
    reply unchanged gets that reply's own ids even when another reply had the same meaning)."""
    return hashlib.sha256(f"{mode}\0{text}".encode("utf-8", "surrogatepass")).digest()


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
        self.completions = CompletionStore()
        self._eos_id = self.tokenizer.token_id(EOS)

    @property
    def output(self) -> None:
        return None

    @staticmethod
    def _normalized(messages: list[dict[str, Any]], request: Any) -> list[dict[str, Any]]:
        tools = request.tools
        response_format = None
        if request.response_format is not None and request.response_format.type == "json_schema":
            response_format = request.response_format.model_dump(exclude_none=True, by_alias=True)
        return normalize_messages([_clean(m) for m in messages],
                                  tools=[_tool_dict(t) for t in tools] if tools else None,
                                  response_format=response_format)

    def segments(self, messages: list[dict[str, Any]], request: Any) -> list[tuple[str, bool]]:
        """The prompt pieces. Every request-level tool is rendered (also under a named tool_choice, which
        the grammar enforces), so the prompt prefix stays the same across the turns of a tool loop."""
        return encode_segments(self._normalized(messages, request), *prompt_mode(request))

    def encode_messages(self, *, messages: list[dict[str, Any]], request: Any, tools: list[dict] | None,
                        thinking: bool, image_data: list) -> list[int]:
        mode, effort = prompt_mode(request)
        normalized = self._normalized(messages, request)
        echoed = self._echoed_completions(normalized, mode)
        prompt = PromptText(encode_segments(normalized, mode, effort), self.tokenizer)
        ids: list[int] = []
        pos = 0
        for start, end, generated in self._splices(prompt, echoed):
            ids += prompt.span_ids(pos, start) + generated
            pos = end
        return ids + prompt.span_ids(pos, len(prompt.text))

    def remember_completion(self, output_ids: Sequence[int]) -> None:
        """Store a finished completion's ids under its meaning in every mode whose rendering of it gives its
        text back. One cut short (length, stop string) gets the EOS the encoder writes after every complete
        assistant turn; the model never saw it, so the cache resumes before it."""
        ids = list(output_ids)
        if not ids:
            return
        if ids[-1] != self._eos_id:
            ids.append(self._eos_id)
        text = self.tokenizer.decode(ids)
        for mode in ("chat", "thinking"):
            message = parse_completion(text, mode, id_factory=str)
            if "incomplete_tool_call" not in message and self._renders(message, mode) == text:
                self.completions.put(rendered_key(text, mode), ids)
                self.completions.put(completion_key(message, mode), ids)

    @staticmethod
    def _renders(message: dict[str, Any], mode: str) -> str | None:
        """What the encoder renders of an assistant message, None where it rejects it (the prompt's own
        encoding reports such input, naming the field)."""
        try:
            return render_assistant(message, mode)
        except ValueError:
            return None

    def _echoed_completions(self, messages: list[dict[str, Any]], mode: str) -> list[tuple[str, list[int]]]:
        """(rendered text, generated ids) of every assistant message that is a stored completion, in order: by
        its exact rendering first, else by its meaning; a message found by meaning gets the model's own
        tool-call arguments (in place; the client's call ids stay), so it renders to exactly the text the
        model wrote."""
        found: list[tuple[str, list[int]]] = []
        for msg in messages:
            if msg.get("role") != "assistant":
                continue
            rendered = self._renders(msg, mode)
            generated = self.completions.get(rendered_key(rendered, mode)) if rendered is not None else None
            if generated is not None:
                found.append((rendered, generated))
                continue
            generated = self.completions.get(completion_key(msg, mode))
            if generated is None:
                continue
            text = self.tokenizer.decode(generated)
            own = parse_completion(text, mode, id_factory=str)["tool_calls"]
            calls = msg.get("tool_calls") or []
            if len(own) != len(calls):
                continue
            echoed = {**msg, "tool_calls": [{**c, "function": {**c["function"], "arguments": o["function"]["arguments"]}}
                                            for c, o in zip(calls, own, strict=True)]} if calls else msg
            if self._renders(echoed, mode) != text:
                continue
            msg.update(echoed)
            found.append((text, generated))
        return found

    def _splices(self, prompt: PromptText, echoed: list[tuple[str, list[int]]]) -> list[tuple[int, int, list[int]]]:
        """(start, end, generated ids) of the echoed completions found in order in the prompt text where it
        can be cut and the control tokens are the model's (a turn whose reasoning the encoder drops renders
        otherwise, and is tokenized as usual)."""
        found: list[tuple[int, int, list[int]]] = []
        cursor = 0
        for rendered, generated in echoed:
            start = prompt.text.find(rendered, cursor)
            while start >= 0:
                end = start + len(rendered)
                if (prompt.can_cut(start) and prompt.can_cut(end) and self.tokenizer.control_ids(
                        prompt.span_ids(start, end)) == self.tokenizer.control_ids(generated)):
                    found.append((start, end, generated))
                    cursor = end
                    break
                start = prompt.text.find(rendered, start + 1)
        return found


def build_adapter(ctx: Any) -> DSV4EncodingAdapter | None:
    """`chat_encoding_adapters._BUILDERS` entry for our spec."""
    if ctx.tokenizer is None:  # --skip-tokenizer-init: the server encodes no chat prompts
        return None
    return DSV4EncodingAdapter(ctx.tokenizer)
