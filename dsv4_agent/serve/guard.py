"""An ASGI guard in front of `/v1/chat/completions`: malformed JSON shapes get HTTP 400 naming the field.

SGLang's request model runs `mode="before"` validators that assume the right shapes (`response_format`
a dict, `messages` a list of dicts, ...). Given something else they raise AttributeError/TypeError, which
pydantic does not turn into a validation error, so the request dies with a 500 or a reset connection. The
guard checks those shapes first. It also turns any other exception raised while the request is still being
validated (before our chat handler is entered) into a 400, since only the request body can cause it there;
exceptions inside the handler stay 500s.

Installed by `plugin.register` through a BEFORE hook on `http_server.launch_server` (the FastAPI app only
accepts middleware before it starts).
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

handler_entered: contextvars.ContextVar[bool] = contextvars.ContextVar("dsv4_handler_entered", default=False)

_DICT_FIELDS = ("response_format", "chat_template_kwargs", "stream_options", "reasoning", "logit_bias",
                "session_params", "custom_params")
_TOOL_CHOICES = ("auto", "none", "required")


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def shape_problem(body: Any) -> str | None:
    """A message naming the first badly shaped field of a chat request body, or None."""
    if not isinstance(body, dict):
        return f"request body: expected a JSON object, got {_type(body)}"
    for key in _DICT_FIELDS:
        if body.get(key) is not None and not isinstance(body[key], dict):
            return f"{key}: expected an object, got {_type(body[key])}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: expected a non-empty list of message objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}]: expected an object, got {_type(m)}"
        if not isinstance(m.get("role"), str):
            return f"messages[{i}].role: expected a string, got {_type(m.get('role'))}"
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                return f"messages[{i}].tool_calls: expected a list, got {_type(calls)}"
            for j, c in enumerate(calls):
                if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
                    return f"messages[{i}].tool_calls[{j}].function: expected an object"
        if m.get("tools") is not None and not isinstance(m["tools"], list):
            return f"messages[{i}].tools: expected a list, got {_type(m['tools'])}"
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return f"tools: expected a list, got {_type(tools)}"
        for j, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("function"), dict):
                return f"tools[{j}].function: expected an object"
    choice = body.get("tool_choice")
    if choice is not None and choice not in _TOOL_CHOICES:
        fn = choice.get("function") if isinstance(choice, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            return ('tool_choice: expected "auto", "none", "required" or '
                    '{"type": "function", "function": {"name": ...}}')
    return None


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(message: str) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}


class ChatRequestGuard:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            problem = shape_problem(json.loads(raw))
        except ValueError:
            problem = None  # not JSON: SGLang answers 400 itself
        if problem:
            await _send_json(send, 400, _error(problem))
            return

        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        token = handler_entered.set(False)
        try:
            await self.app(scope, replay, tracking_send)
        except Exception as e:
            if started:
                raise
            if handler_entered.get():
                logger.exception("chat completion failed")
                await _send_json(send, 500, {**_error(f"Internal server error: {e}"), "type": "InternalServerError",
                                             "code": 500})
            else:  # raised while SGLang validated the body: the body is malformed
                await _send_json(send, 400, _error(f"invalid request: {type(e).__name__}: {e}"))
        finally:
            handler_entered.reset(token)


def install(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on `sglang.srt.entrypoints.http_server.launch_server`."""
    from sglang.srt.entrypoints.http_server import app

    app.add_middleware(ChatRequestGuard)
