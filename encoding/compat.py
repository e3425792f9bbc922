"""What real OpenAI-style clients send, mapped onto the reference's input model (issue 2, point 3).

`normalize_messages` returns new message dicts that `encode_messages` accepts; `resolve_reasoning` maps
API reasoning controls onto V4's three modes. Both are documented in encoding/README.md.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from .encoder import ROLES, MessageError, call_id
from .tokens import to_json

# reasoning_effort (OpenAI / litellm spellings) -> (thinking_mode, V4 effort)
EFFORT_MODES: dict[str, tuple[str, str | None]] = {
    "none": ("chat", None),
    "minimal": ("chat", None),
    "low": ("thinking", "high"),
    "medium": ("thinking", "high"),
    "high": ("thinking", "high"),
    "xhigh": ("thinking", "max"),
    "max": ("thinking", "max"),
}


def resolve_reasoning(reasoning_effort: str | None = None, *, thinking: bool | None = None,
                      default_thinking: bool = True) -> tuple[str, str | None]:
    """(thinking_mode, reasoning_effort) for `encode_messages` from an API request.

    `reasoning_effort`: none/minimal -> Non-think; low/medium/high -> Think High; xhigh/max -> Think Max
    (case-insensitive). `thinking`: an explicit on/off switch (e.g. chat_template_kwargs.thinking); False
    forces Non-think. With neither, `default_thinking` decides (DeepSeek's API defaults to thinking).
    Use the same `thinking_mode` for the prompt and for parsing the completion.
    """
    if reasoning_effort is None:
        on = default_thinking if thinking is None else bool(thinking)
        return ("thinking", "high") if on else ("chat", None)
    if not isinstance(reasoning_effort, str) or reasoning_effort.strip().lower() not in EFFORT_MODES:
        raise ValueError(f"reasoning_effort: unknown value {reasoning_effort!r} "
                         f"(expected one of {', '.join(EFFORT_MODES)})")
    mode, effort = EFFORT_MODES[reasoning_effort.strip().lower()]
    if thinking is False:
        return "chat", None
    if thinking is True and mode == "chat":
        raise ValueError(f"reasoning_effort={reasoning_effort!r} contradicts thinking=True")
    return mode, effort


def _flatten(content: Any, where: str, index: int) -> Any:
    """OpenAI content parts -> text (text parts joined by LF, as vLLM does); other part types are refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise MessageError(f"{where}[{index}].content[{j}]", f"unsupported content part {kind!r} "
                               "(DeepSeek-V4 is text only)", index=index, field=f"content[{j}]")
    return "\n".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                       response_format: Mapping[str, Any] | None = None, developer_as_system: bool = True,
                       where: str = "messages") -> list[dict[str, Any]]:
    """Client-shaped messages -> the encoder's input model. Never mutates the input.

    * `content` as a list of OpenAI content parts -> text (text parts joined by LF; other parts refused);
      user/system content null -> "";
    * assistant `reasoning` -> `reasoning_content` (when the latter is absent or null);
    * tool-call `arguments` null or "" -> "{}" (a call without arguments; the reference would render a
      parameter named `arguments`); object arguments are left to the encoder (rendered as parameters);
    * `role: "tool"`: `tool_call_id` must name a call of the latest assistant turn with calls (results
      are then ordered by call order; an id with no such turn before it is refused); null content -> "",
      non-string non-list content -> its JSON (the reference writes Python's repr);
    * `role: "developer"` is OpenAI's name for the system prompt -> "system" (`developer_as_system=False`
      keeps V4's developer role, a user-side turn);
    * request-level `tools` / `response_format` are attached to the first message when it is a system
      message, else to a new system message inserted first (so thinking keeps its reasoning across a
      tool loop; spec pitfall 4).
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise MessageError(where, "must be a list of message dicts")
    tools = _request_tools(tools)
    if response_format is not None and not isinstance(response_format, Mapping):
        raise MessageError("response_format", f"must be an object, got {type(response_format).__name__}")
    out: list[dict[str, Any]] = []
    call_ids: set[Any] | None = None  # ids of the latest assistant turn with calls; None: no such turn yet
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise MessageError(f"{where}[{i}]", f"a message must be a dict, got {type(msg).__name__}", index=i)
        m = dict(msg)
        role = m.get("role")
        if role == "developer" and developer_as_system:
            role = m["role"] = "system"
        if role not in ROLES:
            raise MessageError(f"{where}[{i}].role", f"unknown role {role!r}", index=i, field="role")
        if role in ("user", "system", "developer", "assistant", "latest_reminder"):
            m["content"] = _flatten(m.get("content"), where, i)
            if m["content"] is None and role in ("user", "system"):
                m["content"] = ""
        if role == "assistant":
            if m.get("reasoning_content") is None and m.get("reasoning") is not None:
                m["reasoning_content"] = m["reasoning"]
            m.pop("reasoning", None)
            if m.get("tool_calls"):
                if not isinstance(m["tool_calls"], list):
                    raise MessageError(f"{where}[{i}].tool_calls", "tool_calls must be a list", index=i,
                                       field="tool_calls")
                m["tool_calls"] = [_normalize_call(c, where, i, j) for j, c in enumerate(m["tool_calls"])]
                call_ids = {cid for c in m["tool_calls"] if (cid := call_id(c))}
        if role == "tool":
            tcid = m.get("tool_call_id")
            if tcid:
                if not isinstance(tcid, Hashable):
                    problem = f"must be a string, got {type(tcid).__name__}"
                elif call_ids is None:
                    problem = f"{tcid!r}: no assistant turn with tool calls precedes it"
                elif call_ids and tcid not in call_ids:
                    problem = f"{tcid!r} matches no call of the latest assistant turn with tool calls"
                else:
                    problem = ""
                if problem:
                    raise MessageError(f"{where}[{i}].tool_call_id", problem, index=i, field="tool_call_id")
            content = m.get("content")
            if content is None:
                m["content"] = ""
            elif not isinstance(content, str | list):
                try:
                    m["content"] = to_json(content)
                except (TypeError, ValueError, RecursionError) as err:
                    raise MessageError(f"{where}[{i}].content", f"a tool result must be text or JSON-serialisable "
                                       f"({err})", index=i, field="content") from None
        out.append(m)
    if tools or response_format:
        if not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": ""})
        if tools:
            own = out[0].get("tools") or []
            if not isinstance(own, list):
                raise MessageError(f"{where}[0].tools", "tools must be a list", index=0, field="tools")
            out[0]["tools"] = [*own, *tools]
        if response_format:
            out[0]["response_format"] = response_format
    return out


def _request_tools(tools: Any) -> list[Mapping[str, Any]] | None:
    """Request-level `tools`, checked here so an error names the request field, not the system message."""
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        raise MessageError("tools", f"must be a list of tools, got {type(tools).__name__}")
    for j, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
            raise MessageError(f"tools[{j}]", 'a tool must be {"type": "function", "function": {...}}', index=j)
    return list(tools)


def _normalize_call(call: Any, where: str, i: int, j: int) -> Any:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise MessageError(f"{where}[{i}].tool_calls[{j}].function", "a tool call needs a `function` object",
                           index=i, field=f"tool_calls[{j}].function")
    cid = call_id(call)
    if cid and not isinstance(cid, Hashable):
        raise MessageError(f"{where}[{i}].tool_calls[{j}].id", f"a call id must be a string, got {type(cid).__name__}",
                           index=i, field=f"tool_calls[{j}].id")
    fn = dict(call["function"])
    if fn.get("arguments") in (None, ""):
        fn["arguments"] = "{}"
    return {**call, "function": fn}
