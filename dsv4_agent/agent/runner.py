"""`Runner`: the agent loop against an OpenAI-compatible DeepSeek-V4 endpoint.

One run = one user task. Each model turn streams a chat completion; if the model asked for tools, all calls
of the turn run concurrently and their results are appended *in call order* with their `tool_call_id`s (V4
folds results into one user turn sorted by call order), then the model is called again. The loop ends when a
turn has no tool calls (its content is the final output) or a limit is hit.

Reasoning replay. Every assistant message goes back to the server exactly as the model produced it,
including `reasoning_content` and the original `arguments` text. The V4 encoder then applies its own rule
(spec 6 / 6.1): with tools declared it keeps the reasoning of every assistant turn (the prompt of turn k+1
extends the prompt of turn k byte for byte, so the prefix cache hits), and without tools it drops the
reasoning of turns before the last user message itself. Sending all of it is therefore both what the model
was trained on and what keeps the prefix stable; stripping reasoning client-side would make the server render
an empty `<think></think>` in place of what the model actually generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from functools import partial
from typing import Any

import httpx
import openai
import pydantic
import pydantic_core
from openai.types.chat import ChatCompletionChunk

from dsv4_agent.agent.agent import Agent
from dsv4_agent.agent.context import ContextPolicy
from dsv4_agent.agent.errors import (
    AgentError,
    ContextWindowExceeded,
    MaxTurnsExceeded,
    ModelHTTPError,
    RunCancelled,
    TokenBudgetExceeded,
    ToolCallError,
    ToolExecutionError,
    ToolTimeoutError,
    UnknownToolError,
)
from dsv4_agent.agent.events import (
    ContentDelta,
    ContextTrimmed,
    Event,
    FinalOutput,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallFinished,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnRetried,
    TurnStarted,
    TurnUsage,
    Usage,
)

__all__ = ["Runner", "RunResult", "RunStream", "SyncRunStream", "Limits", "RetryPolicy", "DEFAULT_BASE_URL"]

DEFAULT_BASE_URL = "http://127.0.0.1:30000/v1"
CANCELLED_TOOL_OUTPUT = "Error: the call was cancelled before it finished (the user stopped the run)."
BUDGET_TOOL_OUTPUT = "Error: the call was not run: the run's token budget was used up."


@dataclasses.dataclass
class Limits:
    """Per-run limits. `max_turns` counts model calls; `tool_timeout` (seconds) applies to each tool call
    unless the tool sets its own; `max_total_tokens` bounds prompt + completion tokens summed over turns."""

    max_turns: int = 20
    tool_timeout: float | None = 120.0
    max_total_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns: expected >= 1, got {self.max_turns}")
        if self.tool_timeout is not None and not self.tool_timeout >= 0:
            raise ValueError(f"tool_timeout: expected seconds >= 0 or None, got {self.tool_timeout}")
        if self.max_total_tokens is not None and self.max_total_tokens < 0:
            raise ValueError(f"max_total_tokens: expected >= 0 or None, got {self.max_total_tokens}")


@dataclasses.dataclass
class RetryPolicy:
    """Retries of a model turn on transient failures: connection errors and timeouts (also mid-stream),
    HTTP 408/409/429 and 5xx. Exponential backoff with jitter; a `Retry-After` header is honoured (capped)."""

    max_retries: int = 3
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {self.max_retries}")
        if self.initial_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(f"retry delays: expected >= 0, got {self.initial_delay_s}, {self.max_delay_s}")

    def delay(self, attempt: int, error: BaseException) -> float:
        retry_after = _retry_after_seconds(error)
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        base = min(self.initial_delay_s * 2 ** (attempt - 1), self.max_delay_s)
        return base * (0.5 + random.random() / 2)


@dataclasses.dataclass
class RunResult:
    """The outcome of a run. `messages` is the whole conversation without the system message, ready to be
    passed as `history=` to the next run (multi-turn chat keeps the prefix stable that way)."""

    final_output: str
    reasoning: str  # reasoning of the final turn
    messages: list[dict[str, Any]]
    new_messages_start: int
    turns: int
    usage: Usage
    turn_usage: list[Usage]

    @property
    def new_messages(self) -> list[dict[str, Any]]:
        return self.messages[self.new_messages_start :]


@dataclasses.dataclass
class _RunState:
    """Mutable state of a run in progress; it yields a consistent RunResult at any await point."""

    history: list[dict[str, Any]]
    new_start: int
    turn: int = 0
    usage: Usage = dataclasses.field(default_factory=Usage)
    turn_usage: list[Usage] = dataclasses.field(default_factory=list)
    final_output: str = ""
    reasoning: str = ""
    # Calls of the last assistant message whose results are not in `history` yet, and the outputs of those
    # that finished: a run stopped while tools ran still leaves a continuable history in which every call
    # has a result with its id ("cancelled" for the unfinished ones).
    pending_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pending_outputs: dict[str, str] = dataclasses.field(default_factory=dict)

    def result(self) -> RunResult:
        history = list(self.history)
        history += [
            {
                "role": "tool",
                "tool_call_id": c["id"],
                "content": self.pending_outputs.get(c["id"], CANCELLED_TOOL_OUTPUT),
            }
            for c in self.pending_calls
        ]
        return RunResult(
            self.final_output,
            self.reasoning,
            history,
            self.new_start,
            self.turn,
            self.usage,
            list(self.turn_usage),
        )


class Runner:
    """Runs agents against one endpoint. Pass an `openai.AsyncOpenAI` client, or a base URL / API key.

    Defaults: base URL from `$DSV4_BASE_URL`, else `http://127.0.0.1:30000/v1`; API key from `$DSV4_API_KEY`,
    else `$OPENAI_API_KEY`, else "EMPTY". The client's own retries are switched off: `RetryPolicy` retries
    whole turns, including streams that break midway.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        context: ContextPolicy | None = None,
        request_timeout_s: float = 600.0,
    ) -> None:
        if client is None:
            client = openai.AsyncOpenAI(
                base_url=base_url or os.environ.get("DSV4_BASE_URL") or DEFAULT_BASE_URL,
                api_key=api_key
                or os.environ.get("DSV4_API_KEY")
                or os.environ.get("OPENAI_API_KEY")
                or "EMPTY",
                timeout=httpx.Timeout(request_timeout_s, connect=10.0),
            )
        self.client = client.with_options(max_retries=0)
        self.model = model
        self.limits = limits or Limits()
        self.retry = retry or RetryPolicy()
        self.context = context or ContextPolicy()
        self._loop: asyncio.AbstractEventLoop | None = None  # private loop of the sync API

    # ---- async API -------------------------------------------------------------------------------------

    async def run(
        self,
        agent: Agent,
        input: str | list[dict[str, Any]],
        *,
        history: list[dict[str, Any]] | None = None,
        limits: Limits | None = None,
    ) -> RunResult:
        """Run to the final output. Limits raise their AgentError with `.result` (the run so far) attached;
        cancelling the awaiting task cancels the running tool calls and closes the HTTP stream."""
        async with self.stream(agent, input, history=history, limits=limits) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        agent: Agent,
        input: str | list[dict[str, Any]],
        *,
        history: list[dict[str, Any]] | None = None,
        limits: Limits | None = None,
    ) -> RunStream:
        """Start a run and iterate over its events (`async for event in runner.stream(...)`)."""
        state = _RunState(history=list(history or []) + _as_messages(input), new_start=len(history or []))
        return RunStream(self._events(agent, state, limits or self.limits), state)

    # ---- sync API ----------------------------------------------------------------------------------------

    def run_sync(
        self,
        agent: Agent,
        input: str | list[dict[str, Any]],
        *,
        history: list[dict[str, Any]] | None = None,
        limits: Limits | None = None,
    ) -> RunResult:
        """`run` for code without an event loop (runs on the Runner's private loop)."""
        return self._sync_loop().run_until_complete(self.run(agent, input, history=history, limits=limits))

    def stream_sync(
        self,
        agent: Agent,
        input: str | list[dict[str, Any]],
        *,
        history: list[dict[str, Any]] | None = None,
        limits: Limits | None = None,
    ) -> SyncRunStream:
        """`stream` for code without an event loop: `for event in runner.stream_sync(...)`."""
        loop = self._sync_loop()
        return SyncRunStream(self.stream(agent, input, history=history, limits=limits), loop)

    def close(self) -> None:
        """Close the HTTP client and the private loop of the sync API (`with Runner(...) as runner:` does it).
        Inside a running event loop use `await runner.aclose()` (`async with`)."""
        if self._loop is None:  # the sync API was never used, but the client may hold connections
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop running: close them on a temporary one
                asyncio.run(self.client.close())
            return  # inside a running loop only `await runner.aclose()` can close them
        if self._loop.is_closed():
            return
        # Runs abandoned by a sync consumer were cancelled but never driven since: let them close their HTTP
        # streams and tool calls before the loop goes.
        abandoned = asyncio.all_tasks(self._loop)
        for task in abandoned:
            task.cancel()
        if abandoned:
            self._loop.run_until_complete(asyncio.gather(*abandoned, return_exceptions=True))
        self._loop.run_until_complete(self.client.close())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def aclose(self) -> None:
        """Close the HTTP client (async code; `async with Runner(...) as runner:` does it)."""
        await self.client.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Runner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _sync_loop(self) -> asyncio.AbstractEventLoop:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "run_sync/stream_sync called from a running event loop: use `await runner.run`"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop

    # ---- the loop ------------------------------------------------------------------------------------------

    async def _events(self, agent: Agent, state: _RunState, limits: Limits) -> AsyncIterator[Event]:
        model = agent.model or self.model or await self._default_model()
        options = agent.request_options()
        system = [{"role": "system", "content": agent.instructions}] if agent.instructions else []
        tools = agent.tool_map()
        sizing = [{**(system[0] if system else {"role": "system"}), "tools": options.get("tools", [])}]
        anchor: tuple[int, int] | None = None  # (messages covered, tokens) from the last server usage
        while True:
            state.turn += 1
            turn = state.turn
            fitted = self.context.fit(sizing, state.history, anchor)
            if fitted is not None:
                state.history, stats = fitted
                state.new_start = max(0, state.new_start - stats["dropped"])
                anchor = None
                yield ContextTrimmed(turn, stats["elided"], stats["dropped"], stats["before"], stats["after"])
            yield TurnStarted(turn)
            turn_out = _TurnOutput()
            # aclosing: a run stopped at a yield closes the HTTP stream now, not when the generator is collected.
            deltas = self._model_turn(turn, model, system + state.history, options, turn_out)
            async with contextlib.aclosing(deltas):
                async for event in deltas:
                    yield event
            message = turn_out.message(agent.thinking)
            state.history.append(message)
            state.pending_calls, state.pending_outputs = list(message.get("tool_calls", [])), {}
            state.turn_usage.append(turn_out.usage)
            state.usage = state.usage + turn_out.usage
            state.reasoning, state.final_output = turn_out.reasoning, turn_out.content
            anchor = (
                (len(sizing) + len(state.history), turn_out.usage.total_tokens)
                if turn_out.has_usage
                else None
            )
            for index, call in enumerate(turn_out.calls):
                yield ToolCallFinished(turn, index, call.id, call.name, call.arguments)
            yield TurnUsage(turn, turn_out.usage)
            yield TurnFinished(turn, turn_out.finish_reason, message)

            # The budget bounds *continuing*: a final answer that crosses it is still returned.
            over_budget = (
                limits.max_total_tokens is not None and state.usage.total_tokens > limits.max_total_tokens
            )
            if turn_out.calls and over_budget:
                state.pending_outputs = {c["id"]: BUDGET_TOOL_OUTPUT for c in state.pending_calls}
                raise _with_result(
                    TokenBudgetExceeded(state.usage.total_tokens, limits.max_total_tokens), state
                )
            if turn_out.calls:
                outputs: list[str] = [""] * len(turn_out.calls)
                results = self._run_tools(turn, turn_out.calls, tools, limits)
                async with contextlib.aclosing(results):  # a stop at a yield cancels the other calls now
                    async for result in results:
                        outputs[result.index] = state.pending_outputs[result.call_id] = result.output
                        yield result
                state.history.extend(
                    {"role": "tool", "tool_call_id": c["id"], "content": out}
                    for c, out in zip(state.pending_calls, outputs, strict=True)
                )
                state.pending_calls, state.pending_outputs = [], {}
            if not turn_out.calls:
                yield FinalOutput(state.final_output, state.result())
                return
            if turn >= limits.max_turns:
                raise _with_result(MaxTurnsExceeded(limits.max_turns), state)

    async def _model_turn(
        self, turn: int, model: str, messages: list[dict[str, Any]], options: dict[str, Any], out: _TurnOutput
    ) -> AsyncIterator[Event]:
        """Stream one completion into `out`, yielding deltas; retry transient failures from scratch."""
        attempt = 0
        while True:
            out.reset()
            try:
                # `client.post` rather than `chat.completions.create`: the latter walks every message of the
                # (growing) history through its TypedDict transform on each turn, which dominated the SDK's
                # per-turn cost (benchmarks/agent_loop.py); the body here is already plain JSON.
                stream = await self.client.post(
                    "/chat/completions",
                    body=_request_body(model, messages, options),
                    cast_to=ChatCompletionChunk,
                    stream=True,
                    stream_cls=openai.AsyncStream[ChatCompletionChunk],
                )
                async with stream:
                    async for chunk in stream:
                        for event in out.feed(turn, chunk):
                            yield event
                if not out.answered:  # e.g. only `[DONE]`, or a 200 page that is not an event stream
                    raise _IncompleteStream("the response stream ended without a completion chunk")
                return
            except _REQUEST_ERRORS as error:
                attempt = self._count_failure(error, attempt, "model request")
                delay = self.retry.delay(attempt, error)
                yield TurnRetried(turn, attempt, f"{type(error).__name__}: {error}", delay)
                await asyncio.sleep(delay)

    async def _run_tools(
        self, turn: int, calls: list[_Call], tools: dict[str, Any], limits: Limits
    ) -> AsyncIterator[ToolResult]:
        """Run all calls of a turn concurrently; yield each result as it completes."""
        tasks = [
            asyncio.ensure_future(self._call_tool(turn, i, call, tools, limits))
            for i, call in enumerate(calls)
        ]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _call_tool(
        self, turn: int, index: int, call: _Call, tools: dict[str, Any], limits: Limits
    ) -> ToolResult:
        start = time.perf_counter()
        error: ToolCallError | None = None
        try:
            tool = tools.get(call.name)
            if tool is None:
                available = ", ".join(sorted(tools)) or "none"
                raise UnknownToolError(call.name, f"unknown tool {call.name!r}; available tools: {available}")
            args = tool.validate(call.arguments)
            timeout = tool.timeout if tool.timeout is not None else limits.tool_timeout
            try:
                value = await asyncio.wait_for(tool.invoke(args), timeout)
            except TimeoutError as e:
                if timeout is None or time.perf_counter() - start < timeout:  # the tool's own TimeoutError
                    raise ToolExecutionError(call.name, f"tool {call.name!r} raised TimeoutError: {e}") from e
                raise ToolTimeoutError(call.name, f"tool {call.name!r} timed out after {timeout:g}s") from e
            except Exception as e:
                raise ToolExecutionError(
                    call.name, f"tool {call.name!r} raised {type(e).__name__}: {e}"
                ) from e
            output = _to_text(value)
        except ToolCallError as e:
            error, output = e, f"Error: {e}"
        return ToolResult(turn, index, call.id, call.name, output, error, time.perf_counter() - start)

    def _count_failure(self, error: BaseException, attempt: int, what: str) -> int:
        """The attempt number of the retry after `error`; raise the run-ending error if there is none."""
        if not _is_transient(error):
            raise _status_error(error) from error
        if attempt >= self.retry.max_retries:
            raise ModelHTTPError(
                f"{what} failed after {self.retry.max_retries} retries: {error} "
                f"({type(error).__name__}, endpoint {self.client.base_url})",
                _error_code(error),
            ) from error
        return attempt + 1

    async def _default_model(self) -> str:
        """The endpoint's first model (a V4 server serves one)."""
        attempt = 0
        while self.model is None:
            try:
                models = await self.client.models.list()
            except _REQUEST_ERRORS as error:
                attempt = self._count_failure(error, attempt, "listing the models")
                await asyncio.sleep(self.retry.delay(attempt, error))
                continue
            if not models.data:
                raise ModelHTTPError("the endpoint lists no models; pass model=...")
            self.model = models.data[0].id
        return self.model


class RunStream:
    """The events of a run in progress (`async for`), produced by a background task so that `cancel()` can
    stop it from anywhere: the HTTP stream is closed, running tool calls are cancelled, and iteration ends
    with `RunCancelled` (its `.result` holds the history so far, continuable). Use as `async with` to
    cancel automatically when the block is left early. After the end, `result` holds the RunResult.

    The run does not go ahead of its consumer: it waits until the last event was taken. A stream left
    early without `async with` / `cancel()` therefore stops where it was, and is cancelled once dropped."""

    def __init__(self, events: AsyncGenerator[Event, None], state: _RunState) -> None:
        self._events = events
        self._state = state
        self._queue: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._done = False
        self._cancelled_early = False
        self.result: RunResult | None = None

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        if self._task is None and not self._cancelled_early:
            # The task holds no reference to `self`, so that dropping an abandoned stream cancels it.
            self._task = asyncio.ensure_future(_pump(self._events, self._queue, self._state))
            self._task.add_done_callback(partial(_cancelled_before_start, self._queue, self._state))
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()  # the consumer was cancelled: stop the producer too
            raise
        self._queue.task_done()  # lets the producer go on to the next event
        if isinstance(item, _End):
            self._done = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        if isinstance(item, FinalOutput):
            self.result = item.result
        return item

    def snapshot(self) -> RunResult:
        """The run so far as a consistent, continuable RunResult (e.g. after `cancel()`)."""
        return self.result or self._state.result()

    def cancel(self) -> None:
        if self._task is None:  # never started: nothing to stop, the iteration just reports the cancel
            if not self._cancelled_early:
                self._cancelled_early = True
                self._queue.put_nowait(_End(_with_result(RunCancelled("the run was cancelled"), self._state)))
        elif not self._task.done():
            self._task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the producer has stopped (after `cancel()`)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def aclose(self) -> None:
        """`cancel()` and wait until the producer has stopped (for `contextlib.aclosing`)."""
        self.cancel()
        await self.wait_closed()

    async def __aenter__(self) -> RunStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped while its run is still going (a loop left early without `async with`): stop the run rather
        # than let it call the model and run tools in the background.
        task = getattr(self, "_task", None)
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.cancel()


def _cancelled_before_start(queue: asyncio.Queue[Event | _End], state: _RunState, task: asyncio.Task[None]) -> None:
    # A cancel that lands before the pump's first step never enters its `try`, so no `_End` would be queued
    # and the consumer would wait forever (the pump swallows every later cancel itself).
    if task.cancelled():
        queue.put_nowait(_End(_with_result(RunCancelled("the run was cancelled"), state)))


async def _pump(
    events: AsyncGenerator[Event, None], queue: asyncio.Queue[Event | _End], state: _RunState
) -> None:
    """Move a run's events to its RunStream's queue, one at a time; always end with an `_End`."""
    try:
        async for event in events:
            queue.put_nowait(event)
            await queue.join()  # until the consumer took it (a cancel can land here, between two events)
    except asyncio.CancelledError:
        queue.put_nowait(_End(_with_result(RunCancelled("the run was cancelled"), state)))
    except AgentError as e:
        queue.put_nowait(_End(e if hasattr(e, "result") else _with_result(e, state)))
    except BaseException as e:  # a bug or an unexpected exception: hand it to the consumer as is
        queue.put_nowait(_End(e))
    else:
        queue.put_nowait(_End(None))
    finally:
        await events.aclose()  # stopped between two events: close the HTTP stream, cancel the tool calls


class SyncRunStream:
    """`RunStream` for synchronous code; drives the Runner's private event loop while iterating."""

    def __init__(self, stream: RunStream, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop
        self._next: asyncio.Future[Event] | None = None  # the pending __anext__ (kept across a Ctrl-C)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        # A Ctrl-C interrupts run_until_complete but not the task it drives: the next call awaits that same
        # task, so no event (nor the final RunCancelled) is taken by an orphan and lost.
        if self._next is None:
            self._next = self._loop.create_task(self._stream.__anext__())
            # Its error reaches the caller through run_until_complete; a stream abandoned after cancel() must
            # not log "Task exception was never retrieved".
            self._next.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return self._loop.run_until_complete(self._next)
        except StopAsyncIteration:
            raise StopIteration from None
        finally:
            if self._next.done():
                self._next = None

    @property
    def result(self) -> RunResult | None:
        return self._stream.result

    def snapshot(self) -> RunResult:
        return self._stream.snapshot()

    def cancel(self) -> None:
        """Stop the run and wait for its tool calls and HTTP stream to close (safe after Ctrl-C)."""
        self._stream.cancel()
        self._loop.run_until_complete(self._stream.wait_closed())

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> SyncRunStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


# ---- one streamed completion ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    id: str
    name: str = ""
    arguments: str = ""
    started: bool = False


@dataclasses.dataclass
class _End:
    error: BaseException | None


class _IncompleteStream(Exception):
    """A 200 answer that carried no completion: retried like a broken stream."""


class _TurnOutput:
    """Accumulates a streamed chat completion: reasoning, content, tool calls (by index), usage."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reasoning = ""
        self.content = ""
        self.calls_by_index: dict[int, _Call] = {}
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.has_usage = False
        self.answered = False  # a chunk with a choice arrived

    @property
    def calls(self) -> list[_Call]:
        return [self.calls_by_index[i] for i in sorted(self.calls_by_index)]

    def feed(self, turn: int, chunk: Any) -> Iterator[Event]:
        if chunk.usage is not None:
            self.usage, self.has_usage = _usage(chunk.usage), True
        for choice in chunk.choices or ():
            self.answered = True
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:  # a finish chunk without a delta (some servers and proxies)
                continue
            # SGLang/DeepSeek call it reasoning_content; vLLM >= 0.11 calls it reasoning.
            reasoning = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
            if reasoning:
                self.reasoning += reasoning
                yield ReasoningDelta(turn, reasoning)
            if delta.content:
                self.content += delta.content
                yield ContentDelta(turn, delta.content)
            for tc in delta.tool_calls or ():
                index = tc.index if tc.index is not None else len(self.calls_by_index)
                call = self.calls_by_index.get(index)
                if call is None:  # an id of our own until the server's arrives (events and history agree)
                    call = self.calls_by_index[index] = _Call(id=f"call_{turn}_{index}")
                if tc.id and not call.started:
                    call.id = tc.id
                fn = tc.function
                if fn is not None and fn.name:
                    call.name = fn.name  # servers send the whole name once
                if not call.started and call.name:
                    call.started = True
                    yield ToolCallStarted(turn, index, call.id, call.name)
                    if call.arguments:  # arguments that arrived before the name
                        yield ToolCallArgumentsDelta(turn, index, call.id, call.arguments)
                if fn is not None and fn.arguments:
                    call.arguments += fn.arguments
                    if call.started:
                        yield ToolCallArgumentsDelta(turn, index, call.id, fn.arguments)

    def message(self, thinking: bool) -> dict[str, Any]:
        """The assistant message to append to the history, as the model produced it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if thinking:
            message["reasoning_content"] = self.reasoning
        if self.calls_by_index:
            message["content"] = self.content or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls
            ]
        return message


# ---- helpers --------------------------------------------------------------------------------------------


def _as_messages(input: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(input, str):
        return [{"role": "user", "content": input}]
    if not isinstance(input, list) or not all(isinstance(m, dict) and "role" in m for m in input):
        raise TypeError("input: expected a string or a list of message dicts with a 'role'")
    return list(input)


def _request_body(model: str, messages: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of a streamed Chat Completions request; `extra_body` entries are merged at top level."""
    body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    body.update((k, v) for k, v in options.items() if k != "extra_body")
    body.update(options.get("extra_body", {}))
    return body


def _usage(u: Any) -> Usage:
    prompt_details = getattr(u, "prompt_tokens_details", None)
    completion_details = getattr(u, "completion_tokens_details", None)
    return Usage(
        prompt_tokens=u.prompt_tokens or 0,
        completion_tokens=u.completion_tokens or 0,
        cached_tokens=(getattr(prompt_details, "cached_tokens", None) or 0) if prompt_details else 0,
        reasoning_tokens=(getattr(completion_details, "reasoning_tokens", None) or 0)
        if completion_details
        else 0,
    )


def _to_text(value: Any) -> str:
    """A tool's return value as the model reads it: a string as is, anything else as JSON (pydantic models,
    dataclasses, enums, dates, sets ... included, also nested; what JSON cannot express becomes its str)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(pydantic_core.to_jsonable_python(value, fallback=str), ensure_ascii=False)
    except ValueError:  # e.g. a circular reference
        return str(value)


def _with_result(error: AgentError, state: _RunState) -> AgentError:
    error.result = state.result()  # type: ignore[attr-defined]
    return error


# A request that failed: an HTTP error status, no connection or a timeout, a stream broken midway (also one
# the server ended with an in-band `{"error": ...}` event, which openai raises as a bare APIError) or unreadable.
_REQUEST_ERRORS = (openai.APIError, httpx.TransportError, json.JSONDecodeError, _IncompleteStream)


# OpenAI-style string codes / types of in-band error events, by the HTTP status they stand for (first match).
_NAMED_CODES = (
    ("context_length", 400), ("too_long", 400), ("insufficient_quota", 403), ("rate_limit", 429),
    ("api_key", 401), ("authentication", 401), ("permission", 403), ("not_found", 404), ("timeout", 408),
    ("overloaded", 503), ("unavailable", 503), ("server_error", 500), ("internal", 500),
    ("invalid", 400), ("missing", 400), ("bad_request", 400), ("badrequest", 400),
)


def _error_code(error: BaseException) -> int | None:
    """The HTTP status of an error answer, or of an error event inside a stream (its numeric `code`, else
    what its string `code` or `type` names, e.g. "context_length_exceeded" -> 400)."""
    if isinstance(error, openai.APIStatusError):
        return error.status_code
    body = getattr(error, "body", None)
    if not isinstance(body, dict):
        return None
    code = body.get("code")
    if isinstance(code, int | str) and str(code).isdigit():
        return int(code)
    for name in (code, body.get("type")):
        if isinstance(name, str):
            lowered = name.lower()
            for part, status in _NAMED_CODES:
                if part in lowered:
                    return status
    return None


def _is_transient(error: BaseException) -> bool:
    """Worth retrying: no answer, a broken stream, HTTP 408/409/429/5xx (in-band codes alike)."""
    code = _error_code(error)
    return code is None or code in (408, 409, 429) or code >= 500


def _status_error(error: BaseException) -> AgentError:
    code = _error_code(error)
    text = str(error)
    lowered = text.lower()
    body = getattr(error, "body", None)
    named = str(body.get("code")).lower() if isinstance(body, dict) else ""
    if code == 400 and ("context length" in lowered or "maximum context" in lowered or "too long" in lowered
                        or "context_length" in named):
        return ContextWindowExceeded(f"the endpoint rejected the prompt as too long: {text}")
    if isinstance(error, openai.APIStatusError):
        request = error.response.request
        # A 404 is most often a base URL without its /v1.
        hint = "; does the base URL end in /v1?" if code == 404 else ""
        return ModelHTTPError(
            f"the endpoint answered HTTP {code}: {text} ({request.method} {request.url}{hint})", code
        )
    return ModelHTTPError(f"the endpoint reported an error in the stream (code {code}): {text}", code)


def _retry_after_seconds(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
