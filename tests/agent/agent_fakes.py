"""A scripted OpenAI-compatible endpoint behind `httpx.MockTransport`: the SDK's real openai/httpx client code
runs, only the socket is replaced. Each request takes the next scripted reply and is recorded.

Replies are written the way SGLang streams them: one role chunk, reasoning_content deltas, content deltas,
tool-call deltas (id + name first, then argument pieces), a finish chunk, then a usage-only chunk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai

from dsv4_agent.agent import RetryPolicy, Runner, Tool, tool


@dataclasses.dataclass
class Reply:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (id, name, arguments)
    usage: tuple[int, int, int] = (100, 20, 0)  # prompt, completion, cached
    piece: int = 4  # characters per streamed delta
    finish_reason: str | None = None
    reasoning_field: str = "reasoning_content"  # or "reasoning" (vLLM), or "both" (our server sends both)


@dataclasses.dataclass
class Status:
    """An HTTP error answer."""

    code: int
    body: str = '{"error": {"message": "scripted error"}}'
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Broken:
    """A stream that sends `reply`'s first `after` chunks, then drops the connection."""

    reply: Reply
    after: int = 2


@dataclasses.dataclass
class Hang:
    """A stream that sends `reply`'s first `after` chunks and then stalls until the client closes it."""

    reply: Reply
    after: int = 1


@dataclasses.dataclass
class Raw:
    """A 200 answer with this body as is: SSE lines with an in-band error event, broken JSON, an HTML page."""

    body: str
    content_type: str = "text/event-stream"


class ScriptedEndpoint:
    """`models_answer`: a Status to answer GET /models with (default: the `models` list)."""

    def __init__(
        self,
        *script: Reply | Status | Broken | Hang | Raw,
        models: tuple[str, ...] = ("deepseek-v4-test",),
        models_answer: Status | None = None,
    ):
        self.script = list(script)
        self.models = models
        self.models_answer = models_answer
        self.models_requests = 0
        self.requests: list[dict[str, Any]] = []
        self.closed_streams = 0  # streams whose body the client closed (or finished)
        self.hanging = asyncio.Event()

    def client(self) -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))
        return openai.AsyncOpenAI(base_url="http://scripted.test/v1", api_key="test", http_client=http)

    @property
    def messages(self) -> list[list[dict[str, Any]]]:
        return [r["messages"] for r in self.requests]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            self.models_requests += 1
            if self.models_answer is not None:
                return _status_response(self.models_answer)
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in self.models]
            return httpx.Response(200, json={"object": "list", "data": data})
        assert request.url.path.endswith("/chat/completions"), request.url
        body = json.loads(request.content)
        self.requests.append(body)
        if not self.script:
            raise AssertionError(f"unscripted request #{len(self.requests)}")
        step = self.script.pop(0)
        if isinstance(step, Status):
            return _status_response(step)
        if isinstance(step, Raw):
            return httpx.Response(
                200, headers={"content-type": step.content_type}, content=step.body.encode()
            )
        if isinstance(step, Reply):
            return self._sse(sse_chunks(step, body["model"]))
        if isinstance(step, Broken):
            return self._sse(sse_chunks(step.reply, body["model"])[: step.after], broken=True)
        return self._sse(sse_chunks(step.reply, body["model"])[: step.after], hang=True)

    def _sse(
        self, chunks: list[dict[str, Any]], *, broken: bool = False, hang: bool = False
    ) -> httpx.Response:
        endpoint = self

        async def body() -> AsyncIterator[bytes]:
            try:
                for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    await asyncio.sleep(0)
                if broken:
                    raise httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body"
                    )
                if hang:
                    endpoint.hanging.set()
                    await asyncio.sleep(3600)
                yield b"data: [DONE]\n\n"
            finally:
                endpoint.closed_streams += 1

        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_ClosableBody(body())
        )


def _status_response(step: Status) -> httpx.Response:
    return httpx.Response(
        step.code, content=step.body.encode(), headers={"content-type": "application/json", **step.headers}
    )


class _ClosableBody(httpx.AsyncByteStream):
    """A response body that, like a socket, ends when the client closes the response (httpx's wrapper of a
    plain async iterator would leave the generator suspended until it is collected)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


def completion(reply: Reply, model: str) -> dict[str, Any]:
    """The non-streaming answer for the same reply."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
    if reply.reasoning:
        message[reply.reasoning_field] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in reply.tool_calls
        ]
    prompt, completion_tokens, cached = reply.usage
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def sse_chunks(reply: Reply, model: str) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def pieces(text: str) -> list[str]:
        return [text[i : i + reply.piece] for i in range(0, len(text), reply.piece)]

    out = [chunk({"role": "assistant", "content": ""})]
    fields = (
        ("reasoning_content", "reasoning") if reply.reasoning_field == "both" else (reply.reasoning_field,)
    )
    out += [chunk(dict.fromkeys(fields, p)) for p in pieces(reply.reasoning)]
    out += [chunk({"content": p}) for p in pieces(reply.content)]
    for index, (call_id, name, arguments) in enumerate(reply.tool_calls):
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
        )
        out += [
            chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]}) for p in pieces(arguments)
        ]
    finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    out.append(chunk({}, finish))
    prompt, completion, cached = reply.usage
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    out.append(
        {
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )
    return out


class ThreadedScriptedServer:
    """The same script over real HTTP (stdlib server in a thread), for code that builds its own client
    (the CLI). Use as a context manager; `base_url` points at it."""

    def __init__(
        self, *script: Reply | Status, model: str = "deepseek-v4-test", models_answer: Status | None = None
    ):
        import http.server
        import threading

        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if models_answer is not None:
                    self._send(models_answer.code, models_answer.body.encode(), "application/json")
                    return
                data = [{"id": model, "object": "model", "created": 0, "owned_by": "test"}]
                self._send(200, json.dumps({"object": "list", "data": data}).encode(), "application/json")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.requests.append(body)
                step = outer.script.pop(0) if outer.script else Status(500, '{"error": "unscripted"}')
                if isinstance(step, Status):
                    self._send(step.code, step.body.encode(), "application/json")
                    return
                if not body.get("stream"):
                    self._send(200, json.dumps(completion(step, body["model"])).encode(), "application/json")
                    return
                sse = "".join(f"data: {json.dumps(c)}\n\n" for c in sse_chunks(step, body["model"]))
                self._send(200, (sse + "data: [DONE]\n\n").encode(), "text/event-stream")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ThreadedScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


FAST_RETRY = RetryPolicy(max_retries=2, initial_delay_s=0.001, max_delay_s=0.01)


def make_runner(endpoint: ScriptedEndpoint, **kw: Any) -> Runner:
    """A Runner on the scripted endpoint that retries without waiting (`retry=` overrides)."""
    return Runner(endpoint.client(), retry=kw.pop("retry", FAST_RETRY), **kw)


def recording_tool() -> tuple[Tool, list[int]]:
    """A sync tool `work(n)` and the list of the n it ran with: which calls really ran."""
    ran: list[int] = []

    @tool
    def work(n: int) -> str:
        """Work."""
        ran.append(n)
        return "done"

    return work, ran
