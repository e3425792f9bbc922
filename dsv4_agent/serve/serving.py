"""Our chat-completions handler: SGLang's `OpenAIServingChat` plus the agent-facing request contract.

Installed by `plugin.register` as a class REPLACE hook on `OpenAIServingChat` (SGLang's HookRegistry
propagates it to `http_server`, which builds the handler). Everything else (the endpoint, tokenization
off-loop, the scheduler, grammar-constrained tool_choice, streaming) is SGLang's own code path. Added here:

* one reasoning decision per request, used for the prompt and for the parser (spec pitfall 6), from
  `thinking: {"type": "enabled"|"disabled"}` (DeepSeek API), `chat_template_kwargs.thinking` /
  `enable_thinking`, and `reasoning_effort` (none/minimal -> chat, low..high -> think high, xhigh/max ->
  think max); default thinking on, as the DeepSeek API;
* reasoning in and out under both names: `reasoning_content` and `reasoning`;
* interleaved thinking: the reasoning of every assistant turn that called tools is kept in a bounded
  store keyed by tool_call_id, and restored when a client sends the turn back without it;
* `tool_choice="none"`: the tools are not rendered, and any tool markup the model writes anyway is
  swallowed by the parser (never shown in content);
* echoed completions: the output ids of every finished choice (stream or not) go to the encoding adapter's
  `CompletionStore`, so a client sending the reply back as text gets the exact generated ids in its prompt
  and the radix cache resumes after the whole previous turn (see `encoding_adapter`);
* validation with HTTP 400 naming the field, before anything is encoded;
* streams always end with `data: [DONE]`, also after an internal error.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import ORJSONResponse, StreamingResponse
from jsonschema import Draft202012Validator, SchemaError
from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionMessageGenericParam,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ToolChoice,
)
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat

from dsv4_agent.encoding import resolve_reasoning
from dsv4_agent.serve import ENCODING_SPEC
from dsv4_agent.serve.encoding_adapter import DSV4EncodingAdapter
from dsv4_agent.serve.guard import handler_entered

logger = logging.getLogger(__name__)

V4_ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
REASONING_STORE_SIZE = 4096  # tool-call turns remembered (LRU)


class ReasoningStore:
    """Bounded LRU map tool_call_id -> the reasoning of the assistant turn that made the call."""

    def __init__(self, capacity: int = REASONING_STORE_SIZE):
        self.capacity = capacity
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, call_ids: list[str], reasoning: str) -> None:
        with self._lock:
            for cid in call_ids:
                self._items[cid] = reasoning
                self._items.move_to_end(cid)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, call_ids: list[str]) -> str | None:
        with self._lock:
            for cid in call_ids:
                if cid in self._items:
                    self._items.move_to_end(cid)
                    return self._items[cid]
        return None


class BadRequest(ValueError):
    """A client error; SGLang's handler turns ValueError into HTTP 400 with this message."""


def _thinking_switch(request: ChatCompletionRequest) -> bool | None:
    """The explicit on/off switch of a request, or None. `thinking` (DeepSeek API) wins over the kwargs."""
    t = request.thinking
    if t is not None:
        if isinstance(t, bool):
            return t
        kind = t.get("type") if isinstance(t, dict) else None
        if kind in ("enabled", "disabled"):
            return kind == "enabled"
        raise BadRequest(f'thinking: expected {{"type": "enabled"}} or {{"type": "disabled"}}, got {t!r}')
    ctk = request.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in ctk and ctk[key] is not None:
            if not isinstance(ctk[key], bool):
                raise BadRequest(f"chat_template_kwargs.{key}: expected a boolean, got {ctk[key]!r}")
            return ctk[key]
    return None


def _tool_call_ids(message: Any) -> list[str]:
    return [c.id for c in (message.tool_calls or []) if c.id]


class CompletionRecorder:
    """The tokenizer manager as our handler sees it: passes everything through and hands the output ids
    of every choice that finished (stop or length) to `record`."""

    def __init__(self, manager: Any, record: Any):
        self._manager, self._record = manager, record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    async def generate_request(self, obj: Any, request: Any = None) -> AsyncIterator[Any]:
        # Streams with incremental output send each chunk's new ids; otherwise every chunk has them all.
        incremental = bool(getattr(obj, "stream", False)) and self._manager.incremental_streaming_output
        ids: dict[int, list[int]] = {}
        async for out in self._manager.generate_request(obj, request):
            for position, item in enumerate(out if isinstance(out, list) else [out]):
                index = item.get("index", position)
                chunk = item.get("output_ids")
                if chunk is not None and incremental:
                    ids.setdefault(index, []).extend(chunk)
                elif chunk is not None:
                    ids[index] = chunk  # may be the live list: copied only when the choice finishes
                finish = (item.get("meta_info") or {}).get("finish_reason")
                if finish and finish.get("type") in ("stop", "length") and ids.get(index):
                    self._record(list(ids.pop(index)))
            yield out


class DSV4ServingChat(OpenAIServingChat):
    reasoning_store = ReasoningStore()  # one per server process, shared by every handler instance

    def __init__(self, tokenizer_manager: Any, template_manager: Any):
        super().__init__(tokenizer_manager, template_manager)
        if isinstance(self.encoding_adapter, DSV4EncodingAdapter):
            self.tokenizer_manager = CompletionRecorder(tokenizer_manager,
                                                        self.encoding_adapter.remember_completion)

    # ---- SGLang override points -------------------------------------------------------------------------
    def _resolve_chat_encoding_spec(self) -> str | None:
        return ENCODING_SPEC

    def _thinking_requested(self, request: ChatCompletionRequest) -> bool:
        return bool((request.chat_template_kwargs or {}).get("thinking"))

    def _get_reasoning_from_request(self, request: ChatCompletionRequest) -> bool:
        return self._thinking_requested(request)

    def _patch_reasoning_skip_special_tokens(self, request: ChatCompletionRequest) -> None:
        # `</think>` and `｜DSML｜` are special tokens; our parsers need them in the text and remove them.
        request.skip_special_tokens = False

    async def handle_request(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        handler_entered.set(True)
        try:
            await self._adopt_raw_reasoning(request, raw_request)
            self._settle_reasoning(request)
            self._check(request)
        except ValueError as e:
            return self.create_error_response(str(e))
        response = await super().handle_request(request, raw_request)
        # A named tool_choice means one call; the grammar allows one invoke, but a string value may hold DSML
        # markup the parser reads as a second call.
        single = not request.parallel_tool_calls or isinstance(request.tool_choice, ToolChoice)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._rewrite_stream(response.body_iterator, single)
        elif isinstance(response, ChatCompletionResponse):
            response = ORJSONResponse(self._rewrite_response(response, single))
        return response

    def _convert_to_internal_request(self, request: ChatCompletionRequest, raw_request: Request = None) -> Any:
        if request.tool_choice == "none":
            # The DeepSeek API drops the tools then; the parser swallows any markup the model writes anyway.
            request.tools = None
            for m in request.messages:
                if isinstance(m, ChatCompletionMessageGenericParam):
                    m.tools = None
        self._restore_reasoning(request)
        return super()._convert_to_internal_request(request, raw_request)

    # ---- request side ---------------------------------------------------------------------------------
    @staticmethod
    async def _adopt_raw_reasoning(request: ChatCompletionRequest, raw_request: Request | None) -> None:
        """Assistant `reasoning` (vLLM's name) -> `reasoning_content`. SGLang's message model has no such
        field and drops it, so it is read from the raw body (already parsed and cached by FastAPI)."""
        if raw_request is None:
            return
        try:
            body = await raw_request.json()
        except Exception:
            return
        raw_messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(raw_messages, list) or len(raw_messages) != len(request.messages):
            return
        for i, (raw, msg) in enumerate(zip(raw_messages, request.messages, strict=True)):
            if not (isinstance(raw, dict) and "reasoning" in raw and msg.role == "assistant"):
                continue
            if raw["reasoning"] is not None and not isinstance(raw["reasoning"], str):
                raise BadRequest(f"messages[{i}].reasoning: expected a string, got {type(raw['reasoning']).__name__}")
            if msg.reasoning_content is None:
                msg.reasoning_content = raw["reasoning"]

    def _settle_reasoning(self, request: ChatCompletionRequest) -> None:
        """One decision: chat_template_kwargs.thinking (bool) and reasoning_effort (a V4 effort or "none").
        Server defaults (`--default-chat-template-kwargs '{"thinking": false}'`) fill what the request leaves."""
        if self.default_chat_template_kwargs:
            request.chat_template_kwargs = {**self.default_chat_template_kwargs, **(request.chat_template_kwargs or {})}
        effort = request.reasoning_effort
        if effort is not None and not isinstance(effort, str):
            raise BadRequest(f"reasoning_effort: expected one of none, minimal, low, medium, high, xhigh, max; "
                             f"got {effort!r}")
        mode, v4_effort = resolve_reasoning(effort, thinking=_thinking_switch(request))  # ValueError -> 400
        ctk = dict(request.chat_template_kwargs or {})
        ctk["thinking"] = ctk["enable_thinking"] = mode == "thinking"
        request.chat_template_kwargs = ctk
        request.reasoning_effort = v4_effort if mode == "thinking" else "none"

    def _check(self, request: ChatCompletionRequest) -> None:
        """Client errors SGLang would not catch, or would report without naming the field."""
        last_calls: set[str] | None = None
        for i, m in enumerate(request.messages):
            if m.role not in V4_ROLES:
                raise BadRequest(f"messages[{i}].role: {m.role!r} is not supported (expected one of "
                                 f"{', '.join(V4_ROLES)})")
            if m.role == "assistant" and m.tool_calls:
                last_calls = set()
                for j, call in enumerate(m.tool_calls):
                    if not call.function.name:
                        raise BadRequest(f"messages[{i}].tool_calls[{j}].function.name: required")
                    if call.id:
                        last_calls.add(call.id)
            if m.role == "tool":
                if not m.tool_call_id:
                    raise BadRequest(f"messages[{i}].tool_call_id: required for role 'tool'")
                if last_calls is None:
                    raise BadRequest(f"messages[{i}]: a tool result must follow an assistant message with "
                                     "tool_calls")
                if last_calls and m.tool_call_id not in last_calls:
                    raise BadRequest(f"messages[{i}].tool_call_id: {m.tool_call_id!r} matches no tool call "
                                     "of the preceding assistant message")
        names = [t.function.name for t in request.tools or []]
        for j, name in enumerate(names):
            if not name or not isinstance(name, str):
                raise BadRequest(f"tools[{j}].function.name: required")
        if len(set(names)) != len(names):
            raise BadRequest("tools: function names must be unique")
        for j, tool in enumerate(request.tools or []):
            params = tool.function.parameters
            if params is not None and not (isinstance(params, dict) and params.get("type", "object") == "object"):
                raise BadRequest(f"tools[{j}].function.parameters: must be a JSON Schema object with "
                                 '"type": "object"')
            # DSML writes tool and parameter names raw inside double quotes: a quote in one makes the
            # model's call unparseable (a silently dropped call, or arguments under another key).
            if '"' in tool.function.name:
                raise BadRequest(f'tools[{j}].function.name: a tool name cannot contain \'"\'')
            properties = (params or {}).get("properties")
            for key in properties if isinstance(properties, dict) else ():
                if '"' in key:
                    raise BadRequest(f"tools[{j}].function.parameters.properties: a parameter name cannot contain "
                                     f"'\"' (got {key!r})")
        choice = request.tool_choice
        if isinstance(choice, ToolChoice):
            if not choice.function.name:
                raise BadRequest("tool_choice.function.name: required")
            if choice.function.name not in names:
                raise BadRequest(f"tool_choice.function.name: tool {choice.function.name!r} is not in tools")
        elif choice == "required" and not names:
            raise BadRequest("tool_choice: 'required' needs a non-empty tools list")
        schema = getattr(getattr(request.response_format, "json_schema", None), "schema_", None)
        if schema is not None:
            # Checked here, not only when the grammar backend compiles it: a stream has already started then,
            # and the client gets an in-band error naming no field.
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as e:
                raise BadRequest(f"response_format.json_schema.schema: not a valid JSON Schema: {e.message}") from None
            except RecursionError:
                raise BadRequest("response_format.json_schema.schema: nested too deeply") from None
        for key in request.logit_bias or {}:
            if not key.lstrip("-").isdigit():
                raise BadRequest(f"logit_bias: keys must be token ids, got {key!r}")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= 20:
            raise BadRequest("top_logprobs: must be between 0 and 20")
        if request.n is not None and request.n < 1:
            raise BadRequest("n: must be at least 1")
        for key in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, key)
            if value is not None and value < 1:
                raise BadRequest(f"{key}: must be at least 1")

    def _restore_reasoning(self, request: ChatCompletionRequest) -> None:
        """Interleaved thinking: put back the reasoning of tool-call turns sent without it."""
        for m in request.messages:
            if m.role == "assistant" and m.tool_calls and not m.reasoning_content:
                stored = self.reasoning_store.get(_tool_call_ids(m))
                if stored:
                    m.reasoning_content = stored

    # ---- response side --------------------------------------------------------------------------------
    def _remember(self, reasoning: str | None, call_ids: list[str]) -> None:
        if reasoning and call_ids:
            self.reasoning_store.put(call_ids, reasoning)

    def _rewrite_response(self, response: ChatCompletionResponse, single_call: bool) -> dict[str, Any]:
        """`reasoning` beside `reasoning_content`; with parallel_tool_calls=false or a named tool_choice only
        the first call."""
        data = response.model_dump(by_alias=True, exclude_none=False)
        for choice in data["choices"]:
            msg = choice["message"]
            msg["reasoning"] = msg.get("reasoning_content")
            if single_call and msg.get("tool_calls"):
                msg["tool_calls"] = msg["tool_calls"][:1]
            self._remember(msg.get("reasoning_content"), [c["id"] for c in msg.get("tool_calls") or [] if c.get("id")])
            for key in ("hidden_states", "prompt_token_ids", "response_token_ids", "meta_info", "matched_stop"):
                if choice.get(key) is None:
                    choice.pop(key, None)
        return data

    async def _rewrite_stream(self, chunks: AsyncIterator[Any], single_call: bool) -> AsyncIterator[str]:
        """Add `reasoning` beside `reasoning_content`, remember tool-call reasoning, drop calls after the
        first with parallel_tool_calls=false, always end with [DONE]."""
        reasoning: dict[int, list[str]] = {}
        call_ids: dict[int, list[str]] = {}
        done = False
        try:
            async for chunk in chunks:
                text = chunk.decode() if isinstance(chunk, bytes) else chunk
                if text.startswith("data: [DONE]"):
                    done = True
                elif text.startswith("data: {"):
                    text = self._rewrite_chunk(text, reasoning, call_ids, single_call)
                    if not text:
                        continue
                yield text
        except Exception as e:  # an internal error mid-stream: report it in-band, never hang the client
            logger.exception("chat stream failed")
            yield f"data: {self.create_streaming_error_response(f'Internal error: {e}', 'InternalServerError', 500)}\n\n"
        finally:
            for index, ids in call_ids.items():
                self._remember("".join(reasoning.get(index, [])), ids)
        if not done:
            yield "data: [DONE]\n\n"

    @staticmethod
    def _rewrite_chunk(text: str, reasoning: dict[int, list[str]], call_ids: dict[int, list[str]],
                       single_call: bool) -> str:
        """The rewritten SSE event ("" to drop it)."""
        try:
            data = json.loads(text[len("data: "):])
        except ValueError:
            return text
        changed = False
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            index = choice.get("index", 0)
            if "reasoning_content" in delta:
                delta["reasoning"] = delta["reasoning_content"]
                changed = True
                if delta["reasoning_content"]:
                    reasoning.setdefault(index, []).append(delta["reasoning_content"])
            calls = delta.get("tool_calls") or []
            if single_call and any(c.get("index", 0) > 0 for c in calls):
                delta["tool_calls"] = calls = [c for c in calls if c.get("index", 0) == 0]
                changed = True
                if not calls and not delta.get("content") and not delta.get("reasoning_content"):
                    return ""
            for call in calls:
                if call.get("id"):
                    call_ids.setdefault(index, []).append(call["id"])
        if not changed:
            return text
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
