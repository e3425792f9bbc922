"""The DeepSeek-V4 prompt encoder: byte-exact with the official `encoding_dsv4.py` (spec sections 2-12).

Pipeline (spec 3): fold tool/user messages into user turns, order tool results by call order, drop
historical reasoning (thinking mode without declared tools), then render each message as
body + transition. Rendering produces *pieces* `(text, trusted)`: trusted pieces are exactly the control
tokens the encoder itself writes; everything else -- template prose and all message data -- is untrusted
and must be tokenized without special-token recognition (`encode_segments`). `encode_messages` is their
concatenation.

Differences from the reference, all deliberate:
* tool-call `arguments` given as an object render as their own parameters, like the equivalent JSON
  string (the reference wraps them in one `arguments` parameter; vector tag `deviation:dict-arguments`);
* invalid input is rejected with `MessageError` naming the message and field, exactly where the reference
  fails (messages it renders; a task when its transition is reached; the call lists result ordering reads,
  context included) -- also where the reference fails with a TypeError / KeyError / AttributeError;
  `thinking_mode` and `reasoning_effort` are checked up front, also when there is nothing to render;
* `verbatim_arguments=True` (opt-in) writes non-string argument values as the exact text found in the
  arguments string instead of re-serialising them (see README "Round trip").
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from .tokens import (
    ASSISTANT,
    BOS,
    DSML,
    EFFORT_MAX_PREFIX,
    EOS,
    EXTRACTED_URL,
    REMINDER,
    RESPONSE_FORMAT_HEADER,
    SPECIAL_TOKENS,
    TASK_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    THINKING_MODES,
    TOOLS_PREAMBLE,
    TOOLS_TRAILER,
    USER,
    to_json,
)

REASONING_EFFORTS = (None, "high", "max")
ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")

Piece = tuple[str, bool]


class MessageError(ValueError):
    """Invalid encoder input. `where` names the list, message index and field, e.g. `messages[2].content`."""

    def __init__(self, where: str, problem: str, *, index: int | None = None, field: str = ""):
        super().__init__(f"{where}: {problem}")
        self.where, self.index, self.field = where, index, field


# --------------------------------------------------------------------------------------------------------
# pieces


_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


def _template_pieces(text: str) -> list[Piece]:
    """Split encoder-owned text (never message data) into control tokens and prose."""
    pieces: list[Piece] = []
    pos = 0
    for m in _SPECIAL_RE.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos:m.start()], False))
        pieces.append((m.group(), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


_PREAMBLE = _template_pieces(TOOLS_PREAMBLE)
_DSML_LT, _DSML_LT_SLASH = [("<", False), (DSML, True)], [("</", False), (DSML, True)]


class _Out:
    """Accumulates pieces; `special` for control tokens, `text` for everything that is not one."""

    __slots__ = ("pieces",)

    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    def special(self, token: str) -> None:
        self.pieces.append((token, True))

    def text(self, s: str) -> None:
        if s:
            self.pieces.append((s, False))

    def extend(self, pieces: list[Piece]) -> None:
        self.pieces.extend(pieces)


def _merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for text, trusted in pieces:
        if merged and merged[-1][1] == trusted:
            merged[-1] = (merged[-1][0] + text, trusted)
        elif text:
            merged.append((text, trusted))
    return merged


# --------------------------------------------------------------------------------------------------------
# validation


def _where(source: str, index: int, field: str = "") -> str:
    return f"{source}[{index}]" + (f".{field}" if field else "")


def _fail(source: str, index: int, field: str, problem: str) -> MessageError:
    return MessageError(_where(source, index, field), problem, index=index, field=field)


def _check_json(value: Any, source: str, i: int, field: str) -> None:
    """Values the encoder writes as JSON (schemas, response_format, typed arguments) must serialise."""
    try:
        to_json(value)
    except (TypeError, ValueError, RecursionError) as err:
        raise _fail(source, i, field, f"not JSON-serialisable ({type(err).__name__}: {err})") from None


def _validate_call_args(value: Any, source: str, i: int, field: str) -> None:
    if not isinstance(value, str):
        _check_json(value, source, i, field)  # an object (own parameters) or anything else (one parameter)
        return
    try:
        decoded = json.loads(value)
    except ValueError:
        return  # not JSON: rendered as one string parameter named `arguments` (reference)
    except RecursionError:
        raise _fail(source, i, field, "arguments are nested too deeply") from None
    if not isinstance(decoded, dict):
        raise _fail(source, i, field, f"arguments must be a JSON object, got JSON {type(decoded).__name__}")


def _check_rendered(msg: Mapping[str, Any]) -> None:
    """Reject, naming the source message and field, what the reference fails on when it renders `msg` (a
    folded message). Messages that are not rendered (context, dropped history) are not checked, as there;
    only their `tool_calls`, which result ordering reads everywhere (spec 4.3), are (`_call_order`)."""
    source, i = msg["_at"]
    role = msg.get("role")
    if role not in ROLES:
        raise _fail(source, i, "role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if role == "user":
        for block in msg["blocks"]:
            src, k = block[-1]
            if block[0] == "text" and not isinstance(block[1], str):
                raise _fail(src, k, "content", f"user content must be a string, got {type(block[1]).__name__} "
                            "(flatten OpenAI content parts with normalize_messages)")
            if block[0] == "tool_result" and isinstance(block[2], list):
                for j, part in enumerate(block[2]):
                    if not isinstance(part, Mapping):
                        raise _fail(src, k, f"content[{j}]", "tool content blocks must be dicts")
                    if part.get("type") == "text" and not isinstance(part.get("text", ""), str):
                        raise _fail(src, k, f"content[{j}].text", "text must be a string")
    content = msg.get("content")
    if role == "developer" and not (isinstance(content, str) and content):
        raise _fail(source, i, "content", "developer content must be a non-empty string")
    # The reference reads `tools` and `tool_calls` of every message it renders (only system / developer tools
    # and assistant calls are written), so their shape is checked whatever the role.
    if msg.get("tools"):
        tools = msg["tools"]
        if not isinstance(tools, list):
            raise _fail(source, i, "tools", "tools must be a list")
        for j, tool in enumerate(tools):
            if not isinstance(tool, Mapping) or "function" not in tool:
                raise _fail(source, i, f"tools[{j}]", 'a tool must be {"type": "function", "function": {...}}')
            if role in ("system", "developer"):
                _check_json(tool["function"], source, i, f"tools[{j}].function")
    if role in ("system", "developer") and msg.get("response_format"):
        _check_json(msg["response_format"], source, i, "response_format")
    if msg.get("tool_calls"):
        calls = msg["tool_calls"]
        if not isinstance(calls, list):
            raise _fail(source, i, "tool_calls", "tool_calls must be a list")
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping):
                raise _fail(source, i, f"tool_calls[{j}].function", "a tool call needs a `function` object")
            for key in ("name", "arguments"):
                if key not in fn:
                    raise _fail(source, i, f"tool_calls[{j}].function.{key}", "missing")
            if role == "assistant":
                _validate_call_args(fn["arguments"], source, i, f"tool_calls[{j}].function.arguments")


def _check_dicts(messages: Sequence[Any], source: str) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise MessageError(source, "must be a list of message dicts")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise _fail(source, i, "", f"a message must be a dict, got {type(msg).__name__}")


# --------------------------------------------------------------------------------------------------------
# folding, result ordering, reasoning drop (spec 4, 6)


def _fold(messages: Sequence[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    """Tool messages and consecutive user messages become user turns holding `blocks`.

    A block is ("text", text, at) or ("tool_result", tool_call_id, content, at), `at` = (source, index) of
    the message it came from. Only the message that starts a
    turn contributes task / wo_eos / mask; other keys of user messages are dropped (reference).
    """
    folded: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        last = folded[-1] if folded else None
        if role == "tool":
            block = ("tool_result", msg.get("tool_call_id", ""), msg.get("content", ""), (source, i))
            if last is not None and last.get("role") == "user":
                last["blocks"].append(block)
            else:
                folded.append({"role": "user", "blocks": [block], "_at": (source, i)})
        elif role == "user":
            block = ("text", msg.get("content", ""), (source, i))
            if last is not None and last.get("role") == "user" and last.get("task") is None:
                last["blocks"].append(block)
            else:
                turn: dict[str, Any] = {"role": "user", "blocks": [block], "_at": (source, i)}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        turn[key] = msg[key]
                folded.append(turn)
        else:
            item = dict(msg)
            item["_at"] = (source, i)
            folded.append(item)
    return folded


def call_id(call: Any) -> Any:
    """A tool call's id as the reference reads it: `id`, else `function.id` (falsy: none)."""
    if not isinstance(call, Mapping):
        return None
    fn = call.get("function")
    return call.get("id") or (fn.get("id", "") if isinstance(fn, Mapping) else "")


def _call_order(msg: Mapping[str, Any]) -> dict[Any, int]:
    """Call id -> position in `msg["tool_calls"]` (a later duplicate id wins, as in the reference)."""
    source, i = msg["_at"]
    calls = msg["tool_calls"]
    if not isinstance(calls, list):
        raise _fail(source, i, "tool_calls", "tool_calls must be a list")
    order: dict[Any, int] = {}
    for k, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise _fail(source, i, f"tool_calls[{k}]", f"a tool call must be a dict, got {type(call).__name__}")
        if not call.get("id") and "function" in call and not isinstance(call["function"], Mapping):
            # the reference looks for `function.id` here and fails (context included)
            raise _fail(source, i, f"tool_calls[{k}].function", "a tool call needs a `function` object")
        if cid := call_id(call):
            if not isinstance(cid, Hashable):
                field = f"tool_calls[{k}]." + ("id" if call.get("id") else "function.id")
                raise _fail(source, i, field, f"a call id must be a string, got {type(cid).__name__}")
            order[cid] = k
    return order


def _order_results(folded: list[dict[str, Any]], order: dict[Any, int]) -> dict[Any, int]:
    """Stable-sort the tool results of each user turn by the call order of the latest assistant with calls.

    `order` is the call order in force before `folded` (the context's, spec 4.3); returns the one after it.
    Unknown ids sort as position 0 (reference).
    """
    for msg in folded:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = _call_order(msg)
        elif msg.get("role") == "user":
            blocks = msg["blocks"]
            results = [b for b in blocks if b[0] == "tool_result"]
            if len(results) > 1 and order:
                for _, result_id, _, (src, k) in results:
                    if not isinstance(result_id, Hashable):
                        raise _fail(src, k, "tool_call_id", f"must be a string, got {type(result_id).__name__}")
                ranked = iter(sorted(results, key=lambda b: order.get(b[1], 0)))
                msg["blocks"] = [next(ranked) if b[0] == "tool_result" else b for b in blocks]
    return order


def _last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


_KEPT_BEFORE_LAST_USER = ("user", "system", "tool", "latest_reminder", "direct_search_results")


def _drop_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user-like turn: assistants lose reasoning, developer messages disappear (quirk)."""
    last_user = _last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in _KEPT_BEFORE_LAST_USER or i >= last_user:
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


# --------------------------------------------------------------------------------------------------------
# arguments -> DSML parameters (spec 10.2)


def _members(text: str) -> list[tuple[str, Any, str]] | None:
    """Top-level members of a JSON object text as (key, value, exact value text), or None if not JSON.

    Duplicate keys keep the first position and the last value, as a dict built by `json.loads` does.
    The exact text spans from after `": "` (one optional space) to the next `,` / `}` -- the inverse of the
    parser's layout, so verbatim rendering reproduces what the model wrote.
    """
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    n, pos = len(text), 0
    out: dict[str, tuple[Any, str]] = {}

    def skip(p: int) -> int:
        while p < n and text[p] in ws:
            p += 1
        return p

    try:
        pos = skip(pos)
        if pos >= n or text[pos] != "{":
            return None
        pos = skip(pos + 1)
        if pos < n and text[pos] == "}":
            return [] if skip(pos + 1) == n else None
        while True:
            key, pos = decoder.raw_decode(text, pos)
            if not isinstance(key, str):
                return None
            pos = skip(pos)
            if text[pos] != ":":
                return None
            raw_start = pos + 1 + (text[pos + 1:pos + 2] == " ")
            value, end = decoder.raw_decode(text, skip(pos + 1))
            pos = skip(end)
            out[key] = (value, text[raw_start:pos])
            if text[pos] == "}":
                break
            if text[pos] != ",":
                return None
            pos = skip(pos + 1)
        if skip(pos + 1) != n:
            return None
    except (ValueError, IndexError):
        return None
    return [(k, v, raw) for k, (v, raw) in out.items()]


def _parameters(arguments: Any, verbatim: bool) -> list[tuple[str, str, bool]]:
    """(name, value text, is_string) for each DSML parameter of one call: strings raw, the rest as JSON."""
    if isinstance(arguments, str):
        members = _members(arguments) if verbatim else None
        if members is not None:
            return [(k, v, True) if isinstance(v, str) else (k, raw, False) for k, v, raw in members]
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return [("arguments", arguments, True)]
    elif not isinstance(arguments, Mapping):
        return [("arguments", to_json(arguments), False)]  # e.g. a list or None: the reference wraps it
    # a decoded JSON object, or (deliberate deviation) an object given directly: its own members
    return [(str(k), v, True) if isinstance(v, str) else (str(k), to_json(v), False) for k, v in arguments.items()]


def _render_tool_calls(out: _Out, calls: Sequence[Mapping[str, Any]], verbatim: bool) -> None:
    out.text("\n\n")
    out.extend(_DSML_LT)
    out.text("tool_calls>\n")
    for k, call in enumerate(calls):
        fn = call["function"]
        if k:
            out.text("\n")
        out.extend(_DSML_LT)
        out.text('invoke name="')
        out.text(str(fn["name"]))
        out.text('">\n')
        for j, (name, value, is_string) in enumerate(_parameters(fn["arguments"], verbatim)):
            if j:
                out.text("\n")
            out.extend(_DSML_LT)
            out.text('parameter name="')
            out.text(name)
            out.text(f'" string="{"true" if is_string else "false"}">')
            out.text(value)
            out.extend(_DSML_LT_SLASH)
            out.text("parameter>")
        out.text("\n")
        out.extend(_DSML_LT_SLASH)
        out.text("invoke>")
    out.text("\n")
    out.extend(_DSML_LT_SLASH)
    out.text("tool_calls>")


def _render_assistant_body(out: _Out, msg: Mapping[str, Any], reasoning: bool, verbatim: bool) -> None:
    """`reasoning</think>` (when kept) + content + DSML block + EOS (unless wo_eos)."""
    if reasoning:
        out.text(str(msg.get("reasoning_content") or ""))
        out.special(THINK_CLOSE)
    out.text(str(msg.get("content") or ""))
    if msg.get("tool_calls"):
        _render_tool_calls(out, msg["tool_calls"], verbatim)
    if not msg.get("wo_eos", False):
        out.special(EOS)


# --------------------------------------------------------------------------------------------------------
# message rendering (spec 5)


def _render_tools_and_format(out: _Out, msg: Mapping[str, Any]) -> None:
    if msg.get("tools"):
        out.text("\n\n")
        out.extend(_PREAMBLE)
        out.text("\n".join(to_json(tool["function"]) for tool in msg["tools"]))
        out.text(TOOLS_TRAILER)
    if msg.get("response_format"):
        out.text("\n\n" + RESPONSE_FORMAT_HEADER)
        out.text(to_json(msg["response_format"]))


def _tool_result_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n\n".join(b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                           for b in content)
    return str(content)


def _render_message(out: _Out, i: int, msgs: list[dict[str, Any]], last_user: int, mode: str, drop: bool,
                    effort: str | None, verbatim: bool) -> None:
    msg = msgs[i]
    role = msg["role"]
    thinking = mode == "thinking"
    if i == 0 and thinking and effort == "max":
        out.text(EFFORT_MAX_PREFIX)

    if role == "system":
        out.text(str(msg.get("content") or ""))
        _render_tools_and_format(out, msg)
    elif role == "developer":
        out.special(USER)
        out.text(msg["content"])
        _render_tools_and_format(out, msg)
    elif role == "user":
        out.special(USER)
        for k, block in enumerate(msg["blocks"]):
            if k:
                out.text("\n\n")
            if block[0] == "text" and msg.get("task") == "read_url":
                # the read_url task's own marker, written by the caller inside the text (spec 9)
                for k, part in enumerate(block[1].split(EXTRACTED_URL)):
                    if k:
                        out.special(EXTRACTED_URL)
                    out.text(part)
            elif block[0] == "text":
                out.text(block[1])
            else:
                out.text("<tool_result>" + _tool_result_text(block[2]) + "</tool_result>")
    elif role == "latest_reminder":
        out.special(REMINDER)
        out.text(str(msg.get("content")))
    else:  # assistant
        task_output = i > 0 and msgs[i - 1].get("task") is not None
        keep = thinking and not task_output and (not drop or i > last_user)
        _render_assistant_body(out, msg, keep, verbatim)

    # transition (generation prompt): only before an assistant / latest_reminder, or at the end
    if i + 1 < len(msgs) and msgs[i + 1].get("role") not in ("assistant", "latest_reminder"):
        return
    task = msg.get("task")
    if task is not None:
        if not isinstance(task, str) or task not in TASK_TOKENS:
            source, index = msg["_at"]
            raise _fail(source, index, "task", f"unknown task {task!r} (expected one of {', '.join(TASK_TOKENS)})")
        if task == "action":
            out.special(ASSISTANT)
            out.special(THINK_OPEN if thinking else THINK_CLOSE)
        out.special(TASK_TOKENS[task])
    elif role in ("user", "developer"):
        out.special(ASSISTANT)
        out.special(THINK_OPEN if thinking and (not drop or i >= last_user) else THINK_CLOSE)


def _check_args(thinking_mode: Any, reasoning_effort: Any) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be None, 'high' or 'max', got {reasoning_effort!r} "
                         "(map API values such as 'low' with resolve_reasoning)")


def _pieces(messages: Sequence[Mapping[str, Any]], thinking_mode: str, reasoning_effort: str | None,
            context: Sequence[Mapping[str, Any]] | None, drop_thinking: bool, add_default_bos_token: bool,
            verbatim_arguments: bool) -> list[Piece]:
    _check_args(thinking_mode, reasoning_effort)
    context = list(context or [])
    _check_dicts(context, "context")
    _check_dicts(messages, "messages")

    folded_context = _fold(context, "context")
    folded = _fold(messages, "messages")
    _order_results(folded, _order_results(folded_context, {}))
    full = folded_context + folded

    out = _Out()
    if add_default_bos_token and not context:
        out.special(BOS)
    # Tools declared on any (folded) message keep every reasoning block (spec 6).
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking_mode == "thinking" and drop:
        full = _drop_reasoning(full)
        count = len(full) - len(_drop_reasoning(folded_context))
    else:
        count = len(folded)
    last_user = _last_user_index(full)
    for i in range(len(full) - count, len(full)):
        _check_rendered(full[i])
        _render_message(out, i, full, last_user, thinking_mode, drop, reasoning_effort, verbatim_arguments)
    return out.pieces


def encode_messages(messages: Sequence[Mapping[str, Any]], thinking_mode: str,
                    reasoning_effort: str | None = None, *, context: Sequence[Mapping[str, Any]] | None = None,
                    drop_thinking: bool = True, add_default_bos_token: bool = True,
                    verbatim_arguments: bool = False) -> str:
    """Render a conversation as the V4 prompt string, byte for byte as the official encoder does.

    thinking_mode: "chat" or "thinking"; reasoning_effort: None, "high" or "max" (use `resolve_reasoning`
    for OpenAI-style values). `context`: earlier messages whose rendering the caller already has (only
    `messages` are rendered, but every rule sees the whole conversation). `verbatim_arguments`: see module doc.
    Raises MessageError (a ValueError) for input the reference rejects.
    """
    return "".join(text for text, _ in _pieces(messages, thinking_mode, reasoning_effort, context,
                                                drop_thinking, add_default_bos_token, verbatim_arguments))


def encode_segments(messages: Sequence[Mapping[str, Any]], thinking_mode: str,
                    reasoning_effort: str | None = None, *, context: Sequence[Mapping[str, Any]] | None = None,
                    drop_thinking: bool = True, add_default_bos_token: bool = True,
                    verbatim_arguments: bool = False) -> list[tuple[str, bool]]:
    """The prompt of `encode_messages` as `(text, trusted)` pieces whose concatenation is that prompt.

    Trusted pieces consist only of control tokens the encoder placed itself (tokenize them with special
    tokens recognised). Every other byte -- message data and template prose -- is in untrusted pieces,
    which must be tokenized with special-token recognition OFF (e.g. HF `split_special_tokens=True`), so a
    user typing `<｜Assistant｜>` gets ordinary text tokens. Pieces alternate between the two kinds; since
    control tokens always split tokenization, the token ids equal those of the whole prompt whenever the
    data holds no marker strings.
    """
    return _merge(_pieces(messages, thinking_mode, reasoning_effort, context, drop_thinking,
                          add_default_bos_token, verbatim_arguments))


def render_assistant(message: Mapping[str, Any], thinking_mode: str, *, verbatim_arguments: bool = False) -> str:
    """The completion text a model writes for `message` after the generation prompt: in thinking mode
    `reasoning</think>`, then content, the DSML block and EOS (none with `wo_eos`). This is the exact
    text the encoder puts in a prompt for an assistant turn whose reasoning is kept."""
    _check_args(thinking_mode, None)
    _check_dicts([message], "message")
    if message.get("role") != "assistant":
        raise MessageError("message.role", f"expected 'assistant', got {message.get('role')!r}", field="role")
    folded = _fold([message], "message")[0]
    _check_rendered(folded)
    out = _Out()
    _render_assistant_body(out, folded, thinking_mode == "thinking", verbatim_arguments)
    return "".join(text for text, _ in out.pieces)
