"""An ASGI guard in front of `/v1/chat/completions`: malformed JSON shapes get HTTP 400 naming the field.

SGLang's request model runs `mode="before"` validators that assume the right shapes (`response_format`
a dict, `messages` a list of dicts, ...). Given something else they raise AttributeError/TypeError, which
pydantic does not turn into a validation error, so the request dies with a 500 or a reset connection. The
guard checks those shapes first. It also turns any other exception raised while the request is still being
validated (before our chat handler is entered) into a 400, since only the request body can cause it there;
exceptions inside the handler stay 500s.

`/generate` and `/v1/completions` take token ids and options that SGLang hands to the scheduler unchecked,
where a bad one kills the whole server (every request after it fails): a prompt token id outside the
vocabulary (the embedding lookup raises), and prompt logprobs (`echo` with `logprobs`, or a
`logprob_start_len` other than -1; our models return next-token logits only, and SGLang's scheduler asserts
on the missing prompt logprobs). Those get a 400 naming the field. A body nested too deeply for the JSON
parser gets a 400 too (it raised RecursionError: a 500 and a reset connection).

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
_PROMPT_PATHS = ("/generate", "/v1/completions")
# Content part types SGLang's message model knows; any other makes it report every union branch it tried.
_PART_TYPES = ("text", "thinking", "reasoning", "image_url", "video_url", "audio_url", "input_audio", "tool_reference")


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _content_problem(field: str, content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{field}: expected a string or a list of content parts, got {_type(content)}"
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            return f"{field}[{j}]: expected a content part object, got {_type(part)}"
        kind = part.get("type")
        if kind not in _PART_TYPES:
            return f"{field}[{j}].type: unsupported content part type {kind!r} (expected 'text')"
        if kind == "text" and not isinstance(part.get("text"), str):
            return f"{field}[{j}].text: expected a string, got {_type(part.get('text'))}"
    return None


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
        problem = _content_problem(f"messages[{i}].content", m.get("content"))
        if problem:
            return problem
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


def _token_id_lists(ids: Any) -> list[Any]:
    """The token-id lists of a prompt field (one list of ids, or a batch of them); [] for text prompts."""
    if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
        return ids
    return [ids] if isinstance(ids, list) and ids and not any(isinstance(x, str) for x in ids) else []


def prompt_problem(path: str, body: Any, vocab_size: int | None) -> str | None:
    """A message naming the field of a `/generate` or `/v1/completions` body that would crash the engine."""
    if not isinstance(body, dict):
        return None  # SGLang's own validation answers 400
    completions = path.endswith("/completions")
    field = "prompt" if completions else "input_ids"
    for b, ids in enumerate(_token_id_lists(body.get(field))):
        for i, t in enumerate(ids):
            if isinstance(t, int) and not isinstance(t, bool) and vocab_size and not 0 <= t < vocab_size:
                where = f"{field}[{b}][{i}]" if isinstance(body[field][0], list) else f"{field}[{i}]"
                return f"{where}: token id {t} is outside the vocabulary [0, {vocab_size})"
    if completions:
        if body.get("echo") and body.get("logprobs"):
            return "logprobs: prompt logprobs (echo with logprobs) are not supported by this model"
    elif body.get("return_logprob"):
        starts = body.get("logprob_start_len")
        starts = starts if isinstance(starts, list) else [starts]
        if any(s is not None and s != -1 for s in starts):
            return "logprob_start_len: prompt logprobs are not supported by this model (use -1)"
    return None


def _vocab_size() -> int | None:
    from sglang.srt.entrypoints import http_server

    state = http_server._global_state
    return getattr(getattr(getattr(state, "tokenizer_manager", None), "model_config", None), "vocab_size", None)


def _loc_field(loc: Any) -> str:
    """`messages[0].content` from a pydantic loc; union-branch tags (`ChatCompletionMessageUserParam`,
    `function-after[...]`, `str`, `list[...]`) are left out."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 0 and part in ("body", "header", "query"):
            continue
        elif isinstance(part, str) and part.replace("-", "_").isidentifier() and not part[0].isupper() \
                and part not in ("str", "int", "float", "bool", "list", "dict", "constrained-float"):
            out += f".{part}" if out else part
    return out or "request body"


def validation_message(errors: list[dict[str, Any]]) -> str:
    """'field: problem' for SGLang's request validation errors (at most 3), instead of its dump of every
    union branch tried plus the endpoint's source location. Branches that failed only on their
    discriminator (a message `role`, a part `type`) are not the client's problem and are left out."""
    if errors and errors[0].get("type") == "json_invalid":
        return f"request body: invalid JSON ({(errors[0].get('ctx') or {}).get('error', errors[0].get('msg'))})"

    def tag(part: Any) -> bool:  # a union branch: `ChatCompletionMessageUserParam`, `function-after[...]`
        return isinstance(part, str) and (part[:1].isupper() or "[" in part)

    mismatches = [e for e in errors if len(e["loc"]) > 1 and tag(e["loc"][-2])
                  and e["loc"][-1] in ("role", "type") and e.get("type") in ("literal_error", "value_error")]
    wrong_branches = [tuple(e["loc"][:-1]) for e in mismatches]
    relevant = [e for e in errors if not any(tuple(e["loc"][:len(b)]) == b for b in wrong_branches)]
    relevant = relevant or mismatches  # no branch fits: the discriminator itself is wrong
    lines: list[str] = []
    for e in relevant:
        line = f"{_loc_field(e['loc'])}: {e.get('msg', 'invalid')}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines[:3])


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(message: str) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}


def _replay(raw: bytes, receive: Any) -> Any:
    """An ASGI `receive` that hands the already-read body over once, then defers to the real one."""
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


class ChatRequestGuard:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        chat = path.endswith("/chat/completions")
        if scope["type"] != "http" or scope.get("method") != "POST" or not (chat or path.endswith(_PROMPT_PATHS)):
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
            body = json.loads(raw)
            problem = shape_problem(body) if chat else prompt_problem(path, body, _vocab_size())
        except ValueError:
            problem = None  # not JSON: SGLang answers 400 itself
        except RecursionError:
            problem = "request body: JSON nested too deeply"
        if problem:
            await _send_json(send, 400, _error(problem))
            return
        if not chat:
            await self.app(scope, _replay(raw, receive), send)
            return

        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        token = handler_entered.set(False)
        try:
            await self.app(scope, _replay(raw, receive), tracking_send)
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
    from fastapi.exceptions import RequestValidationError
    from sglang.srt.entrypoints.http_server import app

    app.add_middleware(ChatRequestGuard)
    sglang_handler = app.exception_handlers[RequestValidationError]

    async def validation_error(request: Any, exc: RequestValidationError) -> Any:
        if not request.url.path.endswith(("/chat/completions", *_PROMPT_PATHS)):
            return await sglang_handler(request, exc)
        from fastapi.responses import ORJSONResponse

        return ORJSONResponse(_error(validation_message(exc.errors())), status_code=400)

    app.add_exception_handler(RequestValidationError, validation_error)
