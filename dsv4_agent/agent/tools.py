"""Function tools: a plain Python function (sync or async) becomes a tool with a JSON schema and
pydantic-validated arguments.

The schema comes from the type hints (any type pydantic understands: str, int, Literal, Enum, list[...],
nested BaseModel, Optional ...) and the docstring: its first paragraph is the tool description, and
parameter descriptions are read from a Google-style `Args:` section, a NumPy-style `Parameters` section or
reST `:param name:` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import re
import threading
from collections.abc import Callable
from typing import Annotated, Any

import pydantic
from pydantic.fields import FieldInfo

from dsv4_agent.agent.errors import ToolArgumentsError

__all__ = ["Tool", "tool", "parse_docstring"]


@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable the model may invoke.

    `params` validates the arguments; `fn(**validated)` runs the tool. `timeout` (seconds) overrides the run's
    default tool timeout for this tool.
    """

    name: str
    description: str
    params: type[pydantic.BaseModel]
    fn: Callable[..., Any]
    timeout: float | None = None

    @property
    def is_async(self) -> bool:
        # A callable object with an `async def __call__` is async too (iscoroutinefunction misses it).
        return inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(type(self.fn).__call__)

    def json_schema(self) -> dict[str, Any]:
        """The `parameters` JSON schema (titles removed: they only repeat the names and cost prompt tokens)."""
        return _strip_titles(self.params.model_json_schema())

    def to_openai(self) -> dict[str, Any]:
        """The entry for the `tools` list of a Chat Completions request."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.json_schema(),
            },
        }

    def validate(self, arguments: str) -> pydantic.BaseModel:
        """Parse the model's `arguments` text; raise ToolArgumentsError with a message meant for the model."""
        text = arguments.strip() or "{}"
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ToolArgumentsError(
                self.name, f"arguments are not valid JSON ({e.msg} at char {e.pos})"
            ) from e
        if not isinstance(raw, dict):
            raise ToolArgumentsError(self.name, f"arguments must be a JSON object, got {type(raw).__name__}")
        try:
            return self.params.model_validate(raw)
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
            )
            raise ToolArgumentsError(self.name, f"invalid arguments: {problems}") from e

    async def invoke(self, args: pydantic.BaseModel) -> Any:
        """Run the tool with validated arguments. Sync functions run in a thread of their own so that parallel
        calls overlap and the event loop stays responsive."""
        kwargs = {field.alias or name: getattr(args, name) for name, field in type(args).model_fields.items()}
        try:
            if self.is_async:
                return await self.fn(**kwargs)
            # With the caller's context variables, as asyncio.to_thread.
            value = await _in_thread(functools.partial(contextvars.copy_context().run, self.fn, **kwargs))
            # A sync wrapper (e.g. a decorator without `async def`) may hand back a coroutine: run it here.
            return await value if inspect.isawaitable(value) else value
        except SystemExit as e:  # a tool around a CLI (argparse, click) must not end the agent's process
            raise RuntimeError(f"the tool exited (SystemExit: {e.code!r})") from e


def _in_thread(call: Callable[[], Any]) -> asyncio.Future[Any]:
    """Run a sync tool call in a thread of its own; the future gets its outcome.

    Not asyncio's default executor: it has min(32, cores + 4) threads, so on a small machine the calls of a
    turn beyond that would queue instead of running together, and its idle threads outlive the run. The
    thread is a daemon: a call abandoned after a timeout or a cancel does not hold the process at exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # cancelled meanwhile (a timeout, a cancelled run): nobody waits for it
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            outcome = (True, call())
        except StopIteration as e:  # a future cannot hold it (set_exception raises TypeError): it would hang
            error = RuntimeError(f"the tool raised StopIteration{f': {e}' if str(e) else ''}")
            error.__cause__ = e
            outcome = (False, error)
        except BaseException as e:  # SystemExit included: the awaiting side decides
            outcome = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="dsv4-agent-tool", daemon=True).start()
    return future


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Any:
    """Make a `Tool` from a function; usable as `@tool` or `@tool(name=..., timeout=...)`.

    Every parameter needs a type hint; `*args`/`**kwargs` are not allowed (the model calls with a JSON object).
    Unknown argument names are rejected (the schema has `additionalProperties: false`). A default may be a
    `pydantic.Field(...)` (constraints, a description). Callable objects and `functools.partial` work too
    (they need `name=`).
    """

    def build(f: Callable[..., Any]) -> Tool:
        return _make_tool(f, name=name, description=description, timeout=timeout)

    return build if fn is None else build(fn)


def _make_tool(
    fn: Callable[..., Any], *, name: str | None, description: str | None, timeout: float | None
) -> Tool:
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout: expected seconds >= 0 or None, got {timeout}")
    summary, param_docs = parse_docstring(inspect.getdoc(fn) or "")
    tool_name = name or getattr(fn, "__name__", None)
    if tool_name is None:
        raise ValueError(f"tool {fn!r} has no __name__: pass name=...")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", tool_name):
        raise ValueError(f"tool name {tool_name!r}: use 1-64 letters, digits, '_', '.', '-'")
    try:  # eval_str resolves `from __future__ import annotations` hints (also of partials and __call__)
        signature = inspect.signature(fn, eval_str=True)
    except NameError as e:
        raise TypeError(f"tool {tool_name!r}: a type hint cannot be resolved ({e})") from e
    fields: dict[str, Any] = {}
    for pname, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name!r}: *args/**kwargs cannot be described to the model ({pname})")
        if param.kind is param.POSITIONAL_ONLY:
            raise TypeError(
                f"tool {tool_name!r}: positional-only parameter {pname!r} cannot be passed by name"
            )
        if param.annotation is param.empty:
            raise TypeError(f"tool {tool_name!r}: parameter {pname!r} needs a type hint")
        # A name pydantic cannot use as a field (`_x`, or one of BaseModel's like `json`, `schema`) gets an
        # internal field name; the model still sees, sends and is told about `pname` (the alias).
        reserved = pname.startswith("_") or hasattr(pydantic.BaseModel, pname)
        field_name = pname
        k = len(fields)
        while reserved and (field_name := f"arg{k}_") in signature.parameters:
            k += 1  # never a real parameter's name
        if isinstance(param.default, FieldInfo):  # `x: int = Field(3, ge=0)`: its settings, docstring text
            description = param.default.description or param_docs.get(pname)
            annotation = Annotated[param.annotation, param.default]
            fields[field_name] = (annotation, pydantic.Field(alias=pname, description=description))
        else:
            default = ... if param.default is param.empty else param.default
            fields[field_name] = (
                param.annotation,
                pydantic.Field(default, alias=pname, description=param_docs.get(pname)),
            )
    params = pydantic.create_model(  # type: ignore[call-overload]
        f"{tool_name}_args", __config__=pydantic.ConfigDict(extra="forbid"), **fields
    )
    return Tool(name=tool_name, description=description or summary, params=params, fn=fn, timeout=timeout)


_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Params|Returns|Return|Raises|Yields|Examples?|Notes?)\s*:?\s*$"
)
_GOOGLE_PARAM = re.compile(r"^(\*{0,2}\w+)\s*(?:\(.*?\))?\s*:\s*(.*)$")
_NUMPY_PARAM = re.compile(r"^(\*{0,2}\w+)\s*(?::.*)?$")
_REST_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a docstring into (description, {parameter: description}).

    The description is the text before the first section header or `:param` line. Continuation lines of a
    parameter (indented deeper than its name) are joined with spaces.
    """
    lines = doc.expandtabs().splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    numpy = False  # the current section is NumPy style: "name : type" lines, descriptions indented below
    current: str | None = None  # parameter whose description is being read
    name_indent = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(stripped)
        header = _SECTION.match(stripped)
        # NumPy style: a header line underlined with dashes.
        numpy_header = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"} and header is not None
        if header and (stripped.endswith(":") or numpy_header):
            section, current, numpy = header.group(1).lower(), None, numpy_header
            i += 2 if numpy_header else 1
            continue
        rest = _REST_PARAM.match(stripped)
        if rest:
            section, current, name_indent = "rest", rest.group(1), indent
            params[current] = rest.group(2).strip()
        elif stripped.startswith(":") and section == "rest":
            current = None  # :returns:, :raises: ...
        elif section is None:
            summary.append(line)
        elif section in ("args", "arguments", "parameters", "params") and stripped:
            entry = (_NUMPY_PARAM if numpy else _GOOGLE_PARAM).match(stripped)
            if current is not None and indent > name_indent:
                params[current] = f"{params[current]} {stripped}".strip()
            elif entry:
                current, name_indent = entry.group(1).lstrip("*"), indent
                params[current] = "" if numpy else entry.group(2).strip()
        elif section == "rest" and stripped and current is not None and indent > name_indent:
            params[current] = f"{params[current]} {stripped}".strip()
        i += 1
    description = "\n".join(summary).strip()
    return description, {k: v for k, v in params.items() if v}


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {
            k: _strip_titles(v)
            for k, v in schema.items()
            # "title" is pydantic's name echo, except where it is a property literally named "title".
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema
