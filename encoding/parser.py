"""Completion parsers: the reference's strict parser, and a lenient streaming parser (spec 13, 14).

`parse_completion(text, mode, strict=True)` reproduces the official parser: same result where it succeeds,
`CompletionParseError` where it fails. The lenient path (the default, what a server uses) is the streaming
`StreamParser` fed the whole text at once, so streamed events always assemble to the non-streaming parse.

Lenient grammar (every rule is documented in encoding/README.md and tested):
* thinking mode starts in reasoning, which ends at `</think>`; chat mode starts in content;
* EOS ends the completion anywhere; text after it is ignored; a missing EOS is fine (servers strip it);
* a tool block starts at `<D tool_calls>` (also spelled `toolcalls`), or at a bare `<D invoke ...>`,
  where D is `｜DSML｜` or an ASCII-pipe look-alike; up to two LF right before it are separators, not text;
  blocks are recognised in reasoning too (the calls are extracted, reasoning continues after the block);
* inside blocks whitespace between tags is free, extra header attributes are ignored, a DSML tag ends
  an unclosed parameter value, a new `invoke` ends an unclosed invoke, anything else ends the block;
* `string="false"` values are inserted verbatim when they are valid JSON, else as a JSON string
  (typed fallback); a missing `string` attribute is treated as "false"; a repeated parameter name keeps
  the first value and drops the others;
* stray DSML tags and BOS / `<think>` / stray `</think>` markers are removed from text;
* a marker cut at the very end is dropped, also one cut inside a character's UTF-8 bytes (the text ends in
  U+FFFD where `｜` or `▁` would continue the marker);
* a completion that ends inside a tool block never yields a complete call: the cut call is reported as
  `incomplete_tool_call` (and its ToolCallStart gets no ToolCallEnd).
"""

from __future__ import annotations

import codecs
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .tokens import (
    BOS,
    DSML,
    EOS,
    PARAMETER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    THINKING_MODES,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_START,
    to_json,
)


class CompletionParseError(ValueError):
    """The completion is not in the V4 format (strict parsing)."""


# --------------------------------------------------------------------------------------------------------
# strict: the official parser's behaviour


_INVOKE = f"<{DSML}invoke"
_INVOKE_END = f"</{DSML}invoke"
_PARAMETER_END = f"/{DSML}parameter"
_NAME_RE = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
_PARAM_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)


def _read_until(text: str, pos: int, stops: tuple[str, ...]) -> tuple[int, str, str | None]:
    """Text from `pos` to the earliest stop (first listed wins a tie); (position after it, text, stop)."""
    best, found = len(text), None
    for stop in stops:
        at = text.find(stop, pos)
        if at != -1 and at < best:
            best, found = at, stop
    if found is None:
        return len(text), text[pos:], None
    return best + len(found), text[pos:best], found


def _strict_tool_calls(text: str, pos: int) -> tuple[int, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    while pos < len(text):
        pos, between, stop = _read_until(text, pos, (_INVOKE, TOOL_CALLS_CLOSE))
        if between != ">\n":
            raise CompletionParseError(f"tool block: expected '>\\n', got {between!r}")
        if stop == TOOL_CALLS_CLOSE:
            break
        if stop is None:
            raise CompletionParseError("tool block: missing invoke or block end")
        pos, header, stop = _read_until(text, pos, (PARAMETER_OPEN, _INVOKE_END))
        names = _NAME_RE.findall(header)
        if len(names) != 1:
            raise CompletionParseError(f"tool block: bad invoke header {header!r}")
        params: dict[str, tuple[str, str]] = {}
        while stop == PARAMETER_OPEN:
            pos, body, stop = _read_until(text, pos, (_PARAMETER_END,))
            found = _PARAM_RE.findall(body)
            if len(found) != 1:
                raise CompletionParseError(f"tool block: bad parameter {body!r}")
            key, is_string, value = found[0]
            if key in params:
                raise CompletionParseError(f"tool block: duplicate parameter {key!r}")
            params[key] = (value, is_string)
            pos, between, stop = _read_until(text, pos, (PARAMETER_OPEN, _INVOKE_END))
            if between != ">\n":
                raise CompletionParseError(f"tool block: expected '>\\n' after a parameter, got {between!r}")
        members = (f"{to_json(k)}: {to_json(v) if s == 'true' else v}" for k, (v, s) in params.items())
        calls.append({"type": "function", "function": {"name": names[0], "arguments": "{" + ", ".join(members) + "}"}})
    return pos, calls


def _parse_strict(text: str, thinking_mode: str) -> dict[str, Any]:
    reasoning, pos = "", 0
    if thinking_mode == "thinking":
        pos, reasoning, stop = _read_until(text, 0, (THINK_CLOSE, TOOL_CALLS_START))
        if stop != THINK_CLOSE:
            raise CompletionParseError("missing </think>")
    pos, content, stop = _read_until(text, pos, (EOS, TOOL_CALLS_START))
    calls: list[dict[str, Any]] = []
    if stop == TOOL_CALLS_START:
        pos, calls = _strict_tool_calls(text, pos)
        pos, tail, stop = _read_until(text, pos, (EOS,))
        if tail:
            raise CompletionParseError(f"text after the tool block: {tail[:40]!r}")
    elif stop is None:
        raise CompletionParseError("missing EOS")
    if pos != len(text):
        raise CompletionParseError(f"text after EOS: {text[pos:pos + 40]!r}")
    for marker in (BOS, EOS, THINK_OPEN, THINK_CLOSE, DSML):
        if marker in content or marker in reasoning:
            raise CompletionParseError(f"special marker {marker!r} inside content or reasoning")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}


# --------------------------------------------------------------------------------------------------------
# events


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of the call's `arguments` JSON text; the pieces of one call concatenate to it."""

    index: int
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """The call is complete; `arguments` is its whole (valid JSON) arguments string."""

    index: int
    arguments: str


@dataclass(frozen=True, slots=True)
class Done:
    """Last event. `finish_reason` is OpenAI's: "tool_calls" when the completion stopped after complete calls,
    else the reason given to `finish`. `incomplete_tool_call` is set when the text ended inside a tool block:
    {"index", "id" (None if no ToolCallStart was sent), "name" (None if the header was cut), "arguments"
    (the partial text sent so far)}."""

    finish_reason: str
    incomplete_tool_call: dict[str, Any] | None = None


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallDelta | ToolCallEnd | Done


def random_call_id(index: int) -> str:
    """Default tool-call id factory: `call_` + 24 random hex digits (unique across turns)."""
    return "call_" + uuid.uuid4().hex[:24]


def assemble(events: Iterable[Event]) -> dict[str, Any]:
    """Build the message dict (the lenient `parse_completion` result) from a stream of events."""
    reasoning: list[str] = []
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    args: dict[int, list[str]] = {}
    ended: set[int] = set()
    incomplete = None
    for ev in events:
        if isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCallStart):
            calls[ev.index] = {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
            args[ev.index] = []
        elif isinstance(ev, ToolCallDelta):
            args[ev.index].append(ev.arguments)
        elif isinstance(ev, ToolCallEnd):
            ended.add(ev.index)
        elif isinstance(ev, Done):
            incomplete = ev.incomplete_tool_call
    for index, call in calls.items():
        call["function"]["arguments"] = "".join(args[index])
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(content),
        "reasoning_content": "".join(reasoning),
        "tool_calls": [calls[i] for i in sorted(ended)],
    }
    if incomplete is not None:
        message["incomplete_tool_call"] = incomplete
    return message


# --------------------------------------------------------------------------------------------------------
# lenient streaming parser


_TEXT, _BLOCK, _INVOKE_HEADER, _PARAMS, _PARAM_HEADER, _VALUE, _END = range(7)
_TEXT_TRIGGER = re.compile("[<\n｜|]")
# `｜DSML｜` with each pipe fullwidth or ASCII, single or doubled (variants seen from some serving
# stacks); a tag is `<` or `</`, the marker, an identifier.
_D_RE = re.compile("[｜|]{1,2}DSML[｜|]{1,2}")
_D_PREFIX_RE = re.compile("[｜|]{1,2}(?:D(?:S(?:M(?:L)?)?)?)?\\Z")
_TAG_RE = re.compile("<(/?)[｜|]{1,2}DSML[｜|]{1,2}([A-Za-z_]{0,40})")
_TAG_PREFIX_RE = re.compile("</?(?:[｜|]{1,2}(?:D(?:S(?:M(?:L)?)?)?)?)?\\Z")
_WS = " \t\r\n"
_LITERALS = (EOS, BOS, THINK_OPEN, THINK_CLOSE)
_MAX_HEADER = 512
# A completion cut inside a multi-byte character (max_tokens, or a byte-level token of a marker) ends in
# U+FFFD: one for the cut sequence, or one per byte from byte-fallback decoders, so at most two for the
# 3-byte characters of markers. When that character, read as `｜` or `▁`, would continue a marker, the
# tail is a cut marker: held back while streaming, dropped at the end like any partial marker.
_CUT = "\ufffd"
_CUT_CHARS = "｜▁"  # the multi-byte characters of markers
_MAX_CUT_RUN = 2
_MAX_CUT = max(map(len, _LITERALS))  # a head (at most a literal less two characters) and two U+FFFD
_BLOCK_NAMES = ("tool_calls", "toolcalls")
_ATTR_RE = re.compile(r"""([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")
_NEED = "need"  # the decision depends on text not seen yet


def _cut_run(text: str) -> int:
    """Length of the U+FFFD run that ends `text` when it can be one cut character of a marker, else 0."""
    tail = text[-_MAX_CUT_RUN - 1:]
    k = len(tail) - len(tail.rstrip(_CUT))
    return k if k <= _MAX_CUT_RUN else 0


def _marker_head(s: str) -> bool:
    """s (from a `<` or a pipe) is the beginning of a marker or of a DSML tag up to its identifier."""
    if s[0] == "<":
        return any(lit.startswith(s) for lit in _LITERALS) or bool(_TAG_PREFIX_RE.match(s) or _TAG_RE.fullmatch(s))
    return bool(_D_PREFIX_RE.match(s) or _D_RE.fullmatch(s))


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _valid_json(raw: str) -> bool:
    try:
        json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return False
    return True


class StreamParser:
    """Incremental lenient parser: `feed(chunk)` text or UTF-8 bytes in any pieces, then `finish(reason)`.

    Both return the events decided so far. Held back (at most a marker's length, plus a tag header) is only
    text that could still turn out to be markup, so no DSML byte or partial marker reaches a text delta.
    `id_factory(index)` makes tool-call ids (default: random `call_...`); pass one for deterministic ids.
    """

    def __init__(self, thinking_mode: str, *, id_factory: Callable[[int], str] | None = None):
        if thinking_mode not in THINKING_MODES:
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self._id_factory = id_factory or random_call_id
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf, self._pos = "", 0
        self._state = _TEXT
        self._reasoning = thinking_mode == "thinking"  # text phase: reasoning or content
        self._skip_ws = False  # drop whitespace right after a tool block
        # A marker was just removed from the text: the next text starts a new delta, so the two sides of
        # a removed marker can never join into a marker inside one delta (e.g. `｜DS<think>ML｜`).
        self._dropped = False
        self._events: list[Event] = []
        self._pending: list[str] = []  # text of the delta being built
        self._pending_kind: Any = None  # ReasoningDelta / ContentDelta, or a call index for ToolCallDelta
        self._finished = False
        # tool block
        self._bare = False  # block opened by a bare invoke (no tool_calls wrapper)
        self._block_calls = 0  # invokes finished in the current block
        self._calls = 0  # calls started in the completion (the next call's index)
        self._complete = 0
        # open call: index, id, name, args (list), keys (set); None also inside an invoke without a name
        self._call: dict[str, Any] | None = None
        # parameter value
        self._kind = ""  # "string" | "typed" | "skip"
        self._raw: list[str] = []

    # ---- public -------------------------------------------------------------------------------------

    def feed(self, chunk: str | bytes) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes | bytearray) else chunk
        if text:
            self._buf = self._buf[self._pos:] + text
            self._pos = 0
            self._run(final=False)
        return self._take()

    def finish(self, reason: str = "stop") -> list[Event]:
        """End of the completion (`reason`: the engine's finish reason, e.g. "stop" or "length")."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._buf = self._buf[self._pos:] + tail
            self._pos = 0
        self._run(final=True)
        self._finished = True
        incomplete = self._cut_call()
        if reason == "stop" and self._complete and incomplete is None:
            reason = "tool_calls"
        self._emit(Done(reason, incomplete))
        return self._take()

    # ---- output -------------------------------------------------------------------------------------

    # Deltas of one kind are collected as pieces and joined once (no quadratic re-concatenation).

    def _flush(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            kind = self._pending_kind
            self._events.append(ToolCallDelta(kind, text) if isinstance(kind, int) else kind(text))
            self._pending = []

    def _emit(self, event: Event) -> None:
        self._flush()
        self._events.append(event)

    def _take(self) -> list[Event]:
        self._flush()
        events, self._events = self._events, []
        return events

    def _piece(self, kind: Any, s: str) -> None:
        if self._pending_kind != kind or self._dropped:
            self._flush()
            self._pending_kind, self._dropped = kind, False
        self._pending.append(s)

    def _text(self, s: str) -> None:
        if s:
            self._piece(ReasoningDelta if self._reasoning else ContentDelta, s)

    def _args(self, s: str) -> None:
        call = self._call
        if s and call is not None:
            call["args"].append(s)
            self._piece(call["index"], s)

    # ---- lexing helpers -----------------------------------------------------------------------------

    def _cut_marker_at(self, p: int) -> bool:
        """From p to the end: a marker head and the U+FFFD run of its next character, cut inside its bytes.

        Such a tail is dropped at `finish` whatever the reason: a cut UTF-8 sequence at the very end is never
        meaningful text (the bytes were cut by max_tokens, a stop or an abort alike), and SGLang's detectors
        never learn the reason. A U+FFFD followed by more text is a real character and stays text.
        """
        buf, n = self._buf, len(self._buf)
        if n - p > _MAX_CUT or not buf.endswith(_CUT):
            return False
        k = _cut_run(buf[p:])
        return 0 < k < n - p and any(_marker_head(buf[p:n - k] + c) for c in _CUT_CHARS)

    def _dsml_at(self, p: int, final: bool) -> Any:
        """At `<` (or `</`) + D + identifier: (closing, ident, end) / _NEED / None."""
        buf, n = self._buf, len(self._buf)
        m = _TAG_RE.match(buf, p)
        if m is None:
            return _NEED if not final and n - p < 10 and _TAG_PREFIX_RE.match(buf, p) else None
        if m.end() == n and not final:
            return _NEED  # the identifier (or the `>` after it) may go on
        return m.group(1) == "/", m.group(2), m.end()

    def _optional(self, p: int, char: str, final: bool) -> Any:
        """Position after an optional `char` at p (spaces/tabs first when char is '>'), or _NEED."""
        buf, n = self._buf, len(self._buf)
        q = p
        while q < n and buf[q] in " \t":
            q += 1
        if q == n:
            return q if final else _NEED
        return q + 1 if buf[q] == char else p

    def _classify_lt(self, p: int, final: bool) -> tuple[str, Any]:
        """What starts at the `<` at p: literal / block / invoke / open / close / text / partial / need."""
        buf, n = self._buf, len(self._buf)
        if self._cut_marker_at(p):
            return ("partial", None) if final else ("need", None)
        if p + 1 < n and buf[p + 1] not in "｜|/t":  # every marker starts with `<｜`, `<|`, `</` or `<t`
            return "text", None
        partial = False
        for lit in _LITERALS:
            if buf.startswith(lit, p):
                return "literal", lit
            if n - p < len(lit) and lit.startswith(buf[p:]):
                partial = True
        tag = self._dsml_at(p, final)
        if tag is _NEED:
            return "need", None
        if tag is not None:
            closing, ident, end = tag
            if end == n and not ident:  # (final) a tag cut right after its marker, before any name
                return "partial", None
            if not closing and ident in _BLOCK_NAMES:
                after = self._optional(end, ">", final)
                return ("need", None) if after is _NEED else ("block", after)
            if not closing and ident in ("invoke", "parameter"):
                if end == n:
                    return ("partial", None) if final else ("need", None)
                if buf[end] in _WS or (ident == "parameter" and buf[end] == ">"):
                    return ("invoke" if ident == "invoke" else "open_parameter"), end
            after = self._optional(end, ">", final)
            if after is _NEED:
                return "need", None
            return ("close" if closing else "open"), (ident, after)
        if partial or _TAG_PREFIX_RE.match(buf, p):  # a cut literal or tag head (`<｜DS`)
            return ("partial", None) if final else ("need", None)
        return "text", None

    def _bare_dsml_at(self, p: int, final: bool) -> Any:
        """At a pipe: the end of a bare D marker / _NEED / None (partial at the end: 'partial')."""
        if self._cut_marker_at(p):
            return "partial" if final else _NEED
        m = _D_RE.match(self._buf, p)
        if m is not None:
            if m.end() == len(self._buf) and not final:
                return _NEED  # a doubled closing pipe may follow
            return m.end()
        if len(self._buf) - p < 7 and _D_PREFIX_RE.match(self._buf, p):
            return "partial" if final else _NEED
        return None

    # ---- state machine ------------------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        steps = (self._step_text, self._step_block, self._step_header, self._step_params, self._step_header,
                 self._step_value, self._step_end)
        while steps[self._state](final):
            pass

    def _step_end(self, final: bool) -> bool:
        self._pos = len(self._buf)  # everything after EOS is ignored
        return False

    def _open_block(self, bare: bool) -> None:
        self._state = _INVOKE_HEADER if bare else _BLOCK
        self._bare, self._block_calls = bare, 0

    def _step_text(self, final: bool) -> bool:
        buf, n, pos = self._buf, len(self._buf), self._pos
        if self._skip_ws:
            while pos < n and buf[pos] in _WS:
                pos += 1
            self._pos = pos
            if pos == n:
                return False
            self._skip_ws = False
        m = _TEXT_TRIGGER.search(buf, pos)
        if m is None:
            self._text(buf[pos:])
            self._pos = n
            return False
        t = m.start()
        self._text(buf[pos:t])
        self._pos = t
        c = buf[t]
        if c == "\n":
            r = t
            while r < n and buf[r] == "\n":
                r += 1
            if r - t > 2:  # only the last two LF can belong to a tool block lead-in
                self._text("\n" * (r - t - 2))
                t = self._pos = r - 2
            if r == n:
                if final:
                    self._text(buf[t:])
                    self._pos = n
                return False
            if buf[r] == "<":
                kind, _ = self._classify_lt(r, final)
                if kind == "need":
                    return False
                if kind in ("block", "invoke"):
                    self._pos = r  # the LFs are the block's lead-in, not text
                    return True
            self._text(buf[t:r])
            self._pos = r
            return True
        if c == "<":
            kind, value = self._classify_lt(t, final)
            if kind == "need":
                return False
            if kind == "literal":
                self._pos = t + len(value)
                if value == EOS:
                    self._state = _END
                elif value == THINK_CLOSE and self._reasoning:
                    self._reasoning = False
                self._dropped = True
                return True  # BOS, <think> and a stray </think> are dropped
            if kind == "block":
                self._pos = value
                self._open_block(bare=False)
            elif kind == "invoke":
                self._pos = value
                self._open_block(bare=True)
            elif kind in ("open", "close"):
                self._pos = value[1]  # stray DSML tag: dropped
                self._dropped = True
            elif kind == "open_parameter":
                self._pos = value
                self._dropped = True
            elif kind == "partial":
                self._pos = n  # a cut marker at the very end is not text
                if n - t < 2:
                    self._text(buf[t:])
            else:
                self._text("<")
                self._pos = t + 1
            return True
        end = self._bare_dsml_at(t, final)  # a pipe
        if end is _NEED:
            return False
        if end is None:
            self._text(c)
            self._pos = t + 1
        elif end == "partial":
            if n - t < 2:
                self._text(buf[t:])
            self._pos = n
        else:
            self._pos = end  # stray `｜DSML｜`: dropped
            self._dropped = True
        return True

    def _skip_space(self) -> bool:
        """Advance over whitespace; True if a non-space character is next."""
        buf, n, pos = self._buf, len(self._buf), self._pos
        while pos < n and buf[pos] in _WS:
            pos += 1
        self._pos = pos
        return pos < n

    def _close_block(self) -> None:
        self._state, self._skip_ws, self._dropped = _TEXT, True, True

    def _step_block(self, final: bool) -> bool:
        if not self._skip_space():
            return False
        if self._buf[self._pos] != "<":
            self._close_block()  # the model moved on without closing the block
            return True
        kind, value = self._classify_lt(self._pos, final)
        if kind == "need":
            return False
        if kind == "invoke":
            self._pos = value
            self._state = _INVOKE_HEADER
        elif kind == "close" and value[0] in _BLOCK_NAMES:
            self._pos = value[1]
            self._close_block()
        elif kind == "literal" and value == EOS:
            self._pos += len(EOS)
            self._state = _END
        elif kind in ("open", "close", "block"):
            self._pos = value[1] if kind != "block" else value  # stray tag inside the block: dropped
        elif kind == "open_parameter":
            self._pos = value
        elif kind == "partial":
            self._pos = len(self._buf)  # a cut marker at the very end: the text was cut inside the block
        else:
            self._close_block()  # text or a marker: back to text
        return True

    def _header(self) -> str | None:
        """The tag's attribute text up to `>` (outside quotes) or a `<`; None while more text is needed."""
        buf, n, pos = self._buf, len(self._buf), self._pos
        end = min(n, pos + _MAX_HEADER)
        quote = False
        for k in range(pos, end):
            c = buf[k]
            if c == '"':
                quote = not quote
            elif not quote and c in "<>":
                self._pos = k + (c == ">")
                return buf[pos:k]
        if end - pos == _MAX_HEADER:  # an endless header: take what there is
            self._pos = end
            return buf[pos:end]
        return None

    def _step_header(self, final: bool) -> bool:
        header = self._header()
        if header is None:
            return False
        attrs = {m.group(1): next(g for g in m.groups()[1:] if g is not None) for m in _ATTR_RE.finditer(header)}
        if self._state == _INVOKE_HEADER:
            if not attrs.get("name") and self._bare and not self._block_calls:
                self._state = _TEXT  # `<D invoke` in text without a name: a stray tag, not a call
                self._dropped = True
                return True
            self._start_call(attrs.get("name"))
        else:
            self._start_param(attrs.get("name"), attrs.get("string"))
        return True

    def _start_call(self, name: str | None) -> None:
        self._state = _PARAMS
        self._call = None
        if name:
            index = self._calls
            self._calls += 1
            self._call = {"index": index, "id": self._id_factory(index), "name": name, "args": [], "keys": set()}
            self._emit(ToolCallStart(index, self._call["id"], name))

    def _end_call(self) -> None:
        call = self._call
        if call is not None:
            self._args("}" if call["keys"] else "{}")
            self._emit(ToolCallEnd(call["index"], "".join(call["args"])))
            self._complete += 1
        self._call = None
        self._block_calls += 1
        self._state = _BLOCK

    def _step_params(self, final: bool) -> bool:
        if not self._skip_space():
            return False
        buf, pos = self._buf, self._pos
        if buf[pos] != "<":
            nxt = buf.find("<", pos)
            self._pos = len(buf) if nxt == -1 else nxt  # stray text between parameters: dropped
            return True
        kind, value = self._classify_lt(pos, final)
        if kind == "need":
            return False
        if kind == "open_parameter":
            self._pos = value
            self._state = _PARAM_HEADER
        elif kind == "close" and value[0] == "invoke":
            self._pos = value[1]
            self._end_call()
        elif kind == "close" and value[0] in _BLOCK_NAMES:
            self._pos = value[1]
            self._end_call()
            self._close_block()
        elif kind == "invoke":  # a new invoke: the open one was not closed
            self._end_call()
        elif kind == "literal" and value == EOS:
            self._pos += len(EOS)
            self._state = _END
        elif kind in ("open", "close"):
            self._pos = value[1]
        elif kind == "block":
            self._pos = value
        else:
            self._pos += 1
        return True

    def _start_param(self, name: str | None, string: str | None) -> None:
        self._state = _VALUE
        self._raw = []
        call = self._call
        if call is None or not name or name in call["keys"]:
            self._kind = "skip"  # no call, no name, or a repeated name (the first value wins)
            return
        self._kind = "string" if string == "true" else "typed"
        self._args(("{" if not call["keys"] else ", ") + to_json(name) + ": " + ('"' if self._kind == "string" else ""))
        call["keys"].add(name)

    def _value_text(self, s: str) -> None:
        if not s:
            return
        if self._kind == "string":
            self._args(to_json(s)[1:-1])
        elif self._kind == "typed":
            self._raw.append(s)

    def _end_param(self) -> None:
        if self._kind == "string":
            self._args('"')
        elif self._kind == "typed":
            raw = "".join(self._raw)
            self._args(raw if _valid_json(raw) else to_json(raw))
        self._state = _PARAMS

    def _step_value(self, final: bool) -> bool:
        buf, n, pos = self._buf, len(self._buf), self._pos
        t = buf.find("<", pos)
        if t == -1:
            self._value_text(buf[pos:])
            self._pos = n
            return False
        self._value_text(buf[pos:t])
        self._pos = t
        kind, value = self._classify_lt(t, final)
        if kind == "need":
            return False
        if kind == "close" and value[0] == "parameter":
            self._pos = value[1]
            self._end_param()
        elif kind in ("open", "close", "invoke", "open_parameter", "block"):
            self._end_param()  # any other DSML tag ends an unclosed value; PARAMS handles the tag
        elif kind == "literal" and value == EOS:
            self._pos = t + len(EOS)
            self._state = _END
        elif kind == "partial":
            self._pos = n
        else:
            self._value_text("<")
            self._pos = t + 1
        return True

    def _cut_call(self) -> dict[str, Any] | None:
        """At the end: the call the text was cut inside, if any (EOS inside an open invoke cuts it too)."""
        call = self._call
        if call is not None:
            return {"index": call["index"], "id": call["id"], "name": call["name"], "arguments": "".join(call["args"])}
        if self._state == _INVOKE_HEADER or (self._state == _BLOCK and not self._bare and not self._block_calls):
            return {"index": self._calls, "id": None, "name": None, "arguments": ""}
        return None


def parse_completion(text: str, thinking_mode: str, *, strict: bool = False,
                     id_factory: Callable[[int], str] | None = None) -> dict[str, Any]:
    """Split a completion (the text after the prompt) into an OpenAI assistant message.

    Returns {"role", "content", "reasoning_content", "tool_calls"}; each call is {"id", "type", "function":
    {"name", "arguments" (JSON string)}} ("id" only when lenient). strict=True behaves like the official
    parser (CompletionParseError where it fails). Lenient results may add "incomplete_tool_call" (see Done).
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if strict:
        return _parse_strict(text, thinking_mode)
    parser = StreamParser(thinking_mode, id_factory=id_factory)
    events = parser.feed(text)
    events += parser.finish()
    return assemble(events)
