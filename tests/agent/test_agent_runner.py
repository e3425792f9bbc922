"""The run loop against recorded/scripted HTTP exchanges (real openai + httpx client code, mock transport)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from agent_fakes import Broken, Hang, Reply, ScriptedEndpoint, Status, make_runner, recording_tool
from agent_fixtures import anyio_backend  # noqa: F401  (pytest fixture)

from dsv4_agent.agent import (
    Agent,
    ContentDelta,
    ContextPolicy,
    ContextTrimmed,
    FinalOutput,
    Limits,
    MaxTurnsExceeded,
    ModelHTTPError,
    ModelSettings,
    ReasoningDelta,
    RunCancelled,
    Runner,
    TokenBudgetExceeded,
    ToolArgumentsError,
    ToolCallArgumentsDelta,
    ToolCallFinished,
    ToolCallStarted,
    ToolExecutionError,
    ToolResult,
    ToolTimeoutError,
    TurnFinished,
    TurnRetried,
    TurnStarted,
    TurnUsage,
    UnknownToolError,
    tool,
)

pytestmark = pytest.mark.anyio


@tool
def get_weather(city: str, unit: str = "C") -> str:
    """Current weather of a city.

    Args:
        city: city name.
        unit: C or F.
    """
    return f"{city}: 21{unit}, sunny"


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def collect(runner: Runner, agent: Agent, task: str, **kw) -> list:
    return [e async for e in runner.stream(agent, task, **kw)]


async def test_final_answer_events_usage_and_request_shape():
    ep = ScriptedEndpoint(Reply(reasoning="Simple greeting.", content="Hello there!", usage=(50, 9, 32)))
    agent = Agent(instructions="Be brief.", reasoning_effort="max", settings=ModelSettings(temperature=1.0))
    events = await collect(make_runner(ep), agent, "hi")

    kinds = [type(e) for e in events]
    assert kinds[0] is TurnStarted and kinds[-1] is FinalOutput
    assert kinds.index(TurnUsage) < kinds.index(TurnFinished) < kinds.index(FinalOutput)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Simple greeting."
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Hello there!"
    usage = next(e for e in events if isinstance(e, TurnUsage)).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.total_tokens) == (
        50,
        9,
        32,
        59,
    )
    result = events[-1].result
    assert result.final_output == "Hello there!" and result.reasoning == "Simple greeting."
    assert result.turns == 1 and result.usage.cached_tokens == 32

    body = ep.requests[0]
    assert body["model"] == "deepseek-v4-test"  # taken from /v1/models
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert body["reasoning_effort"] == "max" and body["thinking"] == {"type": "enabled"}
    assert body["chat_template_kwargs"] == {"thinking": True} and body["temperature"] == 1.0
    assert "tools" not in body


async def test_tool_round_trip_replays_reasoning_and_exact_arguments():
    args = '{"city": "Paris",  "unit": "C"}'  # odd spacing must come back byte-identical
    ep = ScriptedEndpoint(
        Reply(reasoning="Need the weather.", content="", tool_calls=[("call_a", "get_weather", args)]),
        Reply(reasoning="Got it: sunny.", content="Paris is sunny, 21C."),
    )
    agent = Agent(instructions="You are helpful.", tools=[get_weather])
    result = await make_runner(ep).run(agent, "Weather in Paris?")
    assert result.final_output == "Paris is sunny, 21C."
    assert result.turns == 2

    first, second = ep.requests
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    assert first["tools"][0]["function"]["parameters"]["properties"]["city"]["description"] == "city name."
    # Turn 2's prompt = turn 1's prompt + the assistant turn exactly as generated + the tool result.
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assistant, tool_msg = second["messages"][len(first["messages"]) :]
    assert assistant == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need the weather.",
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": args}}
        ],
    }
    assert tool_msg == {"role": "tool", "tool_call_id": "call_a", "content": "Paris: 21C, sunny"}
    assert result.new_messages[-1] == {
        "role": "assistant",
        "content": "Paris is sunny, 21C.",
        "reasoning_content": "Got it: sunny.",
    }


async def test_history_of_earlier_tasks_is_sent_back_verbatim():
    """A second task continues the first run's messages: every earlier reasoning stays (append-only)."""
    ep = ScriptedEndpoint(
        Reply(reasoning="r1", tool_calls=[("c1", "add", '{"a": 1, "b": 2}')]),
        Reply(reasoning="r2", content="3"),
        Reply(reasoning="r3", content="6"),
    )
    runner = make_runner(ep)
    agent = Agent(tools=[add])
    first = await runner.run(agent, "1+2?")
    second = await runner.run(agent, "double it", history=first.messages)
    sent = ep.requests[2]["messages"]
    assert sent[: len(first.messages)] == first.messages
    assert [m.get("reasoning_content") for m in sent if m["role"] == "assistant"] == ["r1", "r2"]
    assert sent[-1] == {"role": "user", "content": "double it"}
    assert second.new_messages[0] == {"role": "user", "content": "double it"}
    assert second.final_output == "6"


@pytest.mark.parametrize("field", ["reasoning", "both"])
async def test_reasoning_field_aliases_are_read_once_and_sent_back_as_reasoning_content(field):
    ep = ScriptedEndpoint(
        Reply(reasoning="think hard", tool_calls=[("c1", "add", '{"a": 2, "b": 2}')], reasoning_field=field),
        Reply(content="4"),
    )
    events = await collect(make_runner(ep), Agent(tools=[add]), "2+2")
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "think hard"
    assert ep.requests[1]["messages"][1]["reasoning_content"] == "think hard"
    assert "reasoning" not in ep.requests[1]["messages"][1]


async def test_extra_body_overrides_and_removes_request_fields():
    ep = ScriptedEndpoint(Reply(content="ok"))
    settings = ModelSettings(max_tokens=64, seed=7, extra_body={"chat_template_kwargs": None, "top_k": 20})
    await make_runner(ep, model="served-name").run(Agent(settings=settings), "hi")
    body = ep.requests[0]
    assert (
        "chat_template_kwargs" not in body and body["top_k"] == 20 and body["thinking"] == {"type": "enabled"}
    )
    assert (body["model"], body["max_tokens"], body["seed"]) == ("served-name", 64, 7)


async def test_non_think_mode_sends_no_reasoning():
    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "add", '{"a": 2, "b": 2}')]), Reply(content="4"))
    await make_runner(ep).run(Agent(tools=[add], reasoning_effort="none"), "2+2")
    body = ep.requests[1]
    assert body["thinking"] == {"type": "disabled"} and body["chat_template_kwargs"] == {"thinking": False}
    assert "reasoning_effort" not in body
    assert "reasoning_content" not in body["messages"][1]


async def test_parallel_calls_run_concurrently_and_results_keep_call_order():
    # Each tool first waits until all three have started: run one after another, the first would wait in
    # vain and report "alone". Independent of machine load, unlike a wall-clock bound.
    started: set[str] = set()
    all_started = threading.Event()

    def arrive(name: str) -> None:
        started.add(name)
        if len(started) == 3:
            all_started.set()

    @tool
    async def slow(name: str, delay: float) -> str:
        """Wait for the others, sleep, then echo."""
        arrive(name)
        together = await asyncio.to_thread(all_started.wait, 10)
        await asyncio.sleep(delay)
        return f"done {name}" if together else "alone"

    @tool
    def blocking(name: str, delay: float) -> str:
        """A sync tool: runs in a worker thread."""
        arrive(name)
        together = all_started.wait(10)
        time.sleep(delay)
        return f"done {name}" if together else "alone"

    calls = [
        ("id_x", "slow", '{"name": "x", "delay": 1.0}'),
        ("id_y", "blocking", '{"name": "y", "delay": 0.5}'),
        ("id_z", "slow", '{"name": "z", "delay": 0.0}'),
    ]
    ep = ScriptedEndpoint(Reply(reasoning="three at once", tool_calls=calls), Reply(content="ok"))
    events = await collect(make_runner(ep), Agent(tools=[slow, blocking]), "go")

    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.call_id for r in results] == ["id_z", "id_y", "id_x"]  # completion order in the stream
    assert [r.index for r in results] == [2, 1, 0]
    tool_msgs = ep.requests[1]["messages"][-3:]  # ... but call order in the history
    assert tool_msgs == [
        {"role": "tool", "tool_call_id": "id_x", "content": "done x"},
        {"role": "tool", "tool_call_id": "id_y", "content": "done y"},
        {"role": "tool", "tool_call_id": "id_z", "content": "done z"},
    ]
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [(f.index, f.call_id, f.arguments) for f in finished] == [
        (i, c[0], c[2]) for i, c in enumerate(calls)
    ]


async def test_tool_call_stream_events():
    args = '{"city": "Reykjavik", "unit": "F"}'
    ep = ScriptedEndpoint(Reply(tool_calls=[("c9", "get_weather", args)], piece=3), Reply(content="cold"))
    events = await collect(make_runner(ep), Agent(tools=[get_weather]), "weather")
    started = [i for i, e in enumerate(events) if isinstance(e, ToolCallStarted)]
    deltas = [e for e in events if isinstance(e, ToolCallArgumentsDelta)]
    assert (
        len(started) == 1 and events[started[0]].name == "get_weather" and events[started[0]].call_id == "c9"
    )
    assert len(deltas) > 3 and all(d.call_id == "c9" and d.index == 0 for d in deltas)
    assert "".join(d.delta for d in deltas) == args
    assert started[0] < events.index(deltas[0])
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.output == "Reykjavik: 21F, sunny" and result.error is None


async def test_errors_are_fed_back_to_the_model():
    @tool
    def explode(x: int) -> str:
        """Always fails."""
        raise ValueError(f"bad x={x}")

    calls = [
        ("c1", "explode", '{"x": 3}'),
        ("c2", "add", '{"a": "one", "b": 2}'),  # wrong type
        ("c3", "add", '{"a": 1}'),  # missing field
        ("c4", "add", '{"a": 1, "b": 2, "c": 3}'),  # unknown field
        ("c5", "add", '{"a": 1, '),  # not JSON
        ("c6", "search_web", '{"q": "x"}'),  # unknown tool
        ("c7", "add", ""),  # empty arguments = {} -> missing fields
        ("c8", "add", '{"a": 40, "b": 2}'),  # fine
    ]
    ep = ScriptedEndpoint(Reply(tool_calls=calls), Reply(content="recovered"))
    events = await collect(make_runner(ep), Agent(tools=[explode, add]), "go")
    results = sorted((e for e in events if isinstance(e, ToolResult)), key=lambda r: r.index)
    kinds = [type(r.error) if r.error else None for r in results]
    assert kinds == [
        ToolExecutionError,
        ToolArgumentsError,
        ToolArgumentsError,
        ToolArgumentsError,
        ToolArgumentsError,
        UnknownToolError,
        ToolArgumentsError,
        None,
    ]
    outputs = {m["tool_call_id"]: m["content"] for m in ep.requests[1]["messages"] if m["role"] == "tool"}
    assert outputs["c1"] == "Error: tool 'explode' raised ValueError: bad x=3"
    assert outputs["c2"].startswith("Error: invalid arguments: a: ") and "integer" in outputs["c2"]
    assert "b: Field required" in outputs["c3"]
    assert "c: Extra inputs are not permitted" in outputs["c4"]
    assert "not valid JSON" in outputs["c5"]
    assert outputs["c6"] == "Error: unknown tool 'search_web'; available tools: add, explode"
    assert outputs["c8"] == "42"
    assert isinstance(results[0].error.__cause__, ValueError)
    assert events[-1].output == "recovered"


async def test_tool_timeout_is_fed_back():
    release = threading.Event()

    @tool
    async def stuck() -> str:
        """Never returns."""
        await asyncio.sleep(3600)
        return "unreachable"

    @tool(timeout=0.1)
    def stuck_sync() -> str:
        """Blocks a worker thread."""
        release.wait(5)
        return "late"

    ep = ScriptedEndpoint(
        Reply(tool_calls=[("c1", "stuck", "{}"), ("c2", "stuck_sync", "{}")]), Reply(content="ok")
    )
    t0 = time.perf_counter()
    events = await collect(
        make_runner(ep, limits=Limits(tool_timeout=0.2)), Agent(tools=[stuck, stuck_sync]), "go"
    )
    release.set()
    assert time.perf_counter() - t0 < 5  # the timeouts fire; nothing waits for the 3600 s sleep
    results = sorted((e for e in events if isinstance(e, ToolResult)), key=lambda r: r.index)
    assert [type(r.error) for r in results] == [ToolTimeoutError, ToolTimeoutError]
    assert results[0].output == "Error: tool 'stuck' timed out after 0.2s"
    assert results[1].output == "Error: tool 'stuck_sync' timed out after 0.1s"


async def test_max_turns_raises_with_a_continuable_history():
    ep = ScriptedEndpoint(
        *[Reply(reasoning=f"r{i}", tool_calls=[(f"c{i}", "add", '{"a": 1, "b": 1}')]) for i in range(3)]
    )
    runner = make_runner(ep)
    with pytest.raises(MaxTurnsExceeded) as info:
        await runner.run(Agent(tools=[add]), "loop", limits=Limits(max_turns=3))
    assert info.value.max_turns == 3 and len(ep.requests) == 3
    history = info.value.result.messages
    calls = [c["id"] for m in history if m["role"] == "assistant" for c in m["tool_calls"]]
    answered = [m["tool_call_id"] for m in history if m["role"] == "tool"]
    assert calls == answered == ["c0", "c1", "c2"]


async def test_token_budget_stops_before_running_more_tools():
    work, ran = recording_tool()
    ep = ScriptedEndpoint(
        Reply(tool_calls=[("c1", "work", '{"n": 1}')], usage=(400, 50, 0)),
        Reply(tool_calls=[("c2", "work", '{"n": 2}')], usage=(500, 60, 400)),
    )
    with pytest.raises(TokenBudgetExceeded) as info:
        await make_runner(ep).run(Agent(tools=[work]), "go", limits=Limits(max_total_tokens=1000))
    assert ran == [1]
    assert (info.value.used, info.value.budget) == (1010, 1000)
    last = info.value.result.messages[-1]
    assert last["tool_call_id"] == "c2" and "token budget" in last["content"]


async def test_a_final_answer_over_the_budget_is_still_returned():
    ep = ScriptedEndpoint(Reply(content="done", usage=(900, 200, 0)))
    result = await make_runner(ep).run(Agent(), "go", limits=Limits(max_total_tokens=1000))
    assert result.final_output == "done" and result.usage.total_tokens == 1100


async def test_transient_errors_are_retried():
    ep = ScriptedEndpoint(
        Status(503),
        Status(429, headers={"retry-after": "0"}),
        Reply(content="fine"),
    )
    events = await collect(make_runner(ep), Agent(), "hi")
    retries = [e for e in events if isinstance(e, TurnRetried)]
    assert [r.attempt for r in retries] == [1, 2] and "503" in retries[0].error
    assert events[-1].output == "fine" and len(ep.requests) == 3


async def test_a_stream_broken_midway_is_restarted_from_scratch():
    reply = Reply(reasoning="abcdefgh", content="complete answer")
    ep = ScriptedEndpoint(Broken(reply, after=3), reply)
    events = await collect(make_runner(ep), Agent(), "hi")
    retried_at = next(i for i, e in enumerate(events) if isinstance(e, TurnRetried))
    after = events[retried_at + 1 :]
    assert "".join(e.text for e in after if isinstance(e, ReasoningDelta)) == "abcdefgh"
    assert events[-1].result.reasoning == "abcdefgh" and events[-1].output == "complete answer"


async def test_client_errors_are_not_retried_and_retries_run_out():
    ep = ScriptedEndpoint(Status(400, '{"error": {"message": "bad request: temperature"}}'))
    with pytest.raises(ModelHTTPError, match="HTTP 400"):
        await make_runner(ep).run(Agent(), "hi")
    assert len(ep.requests) == 1

    ep = ScriptedEndpoint(Status(500), Status(502), Status(503))
    with pytest.raises(ModelHTTPError, match="after 2 retries"):
        await make_runner(ep).run(Agent(), "hi")
    assert len(ep.requests) == 3


async def test_cancel_while_streaming_closes_the_http_stream():
    ep = ScriptedEndpoint(Hang(Reply(reasoning="thinking for a long time"), after=2))
    stream = make_runner(ep).stream(Agent(), "hi")
    seen = []

    async def consume():
        async for event in stream:
            seen.append(event)

    consumer = asyncio.ensure_future(consume())
    await asyncio.wait_for(ep.hanging.wait(), 5)
    stream.cancel()
    with pytest.raises(RunCancelled) as info:
        await asyncio.wait_for(consumer, 5)
    assert ep.closed_streams == 1
    assert any(isinstance(e, ReasoningDelta) for e in seen)
    assert info.value.result.messages == [{"role": "user", "content": "hi"}]  # the partial turn is dropped


def forever_tool(cancelled: asyncio.Event):
    """A tool that runs until cancelled and then sets `cancelled`."""

    @tool
    async def forever() -> str:
        """Runs until cancelled."""
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()
        return "never"

    return forever


async def test_cancelling_run_cancels_running_tools_and_keeps_finished_results():
    cancelled = asyncio.Event()
    forever = forever_tool(cancelled)

    @tool
    async def quick() -> str:
        """Returns at once."""
        return "quick result"

    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "forever", "{}"), ("c2", "quick", "{}")]))
    stream = make_runner(ep).stream(Agent(tools=[forever, quick]), "go")
    results = []
    with pytest.raises(RunCancelled) as info:
        async for event in stream:
            if isinstance(event, ToolResult):
                results.append(event)
                stream.cancel()
    await stream.wait_closed()
    assert cancelled.is_set() and [r.call_id for r in results] == ["c2"]
    tool_msgs = [m for m in info.value.result.messages if m["role"] == "tool"]
    assert tool_msgs[0]["tool_call_id"] == "c1" and "cancelled" in tool_msgs[0]["content"]
    assert tool_msgs[1] == {"role": "tool", "tool_call_id": "c2", "content": "quick result"}


async def test_cancelling_the_awaiting_task_stops_the_run():
    cancelled = asyncio.Event()
    forever = forever_tool(cancelled)

    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "forever", "{}")]))
    task = asyncio.ensure_future(make_runner(ep).run(Agent(tools=[forever]), "go"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


def test_sync_api_run_and_stream():
    ep = ScriptedEndpoint(
        Reply(reasoning="r", tool_calls=[("c1", "add", '{"a": 20, "b": 22}')]),
        Reply(content="42"),
        Reply(content="again"),
    )
    runner = make_runner(ep)
    events = list(runner.stream_sync(Agent(tools=[add]), "add"))
    assert isinstance(events[-1], FinalOutput) and events[-1].output == "42"
    assert (
        runner.run_sync(Agent(tools=[add]), "again").final_output == "again"
    )  # same private loop, same pool
    runner.close()


def test_sync_stream_cancel_stops_a_hanging_stream():
    ep = ScriptedEndpoint(Hang(Reply(reasoning="long"), after=2))
    runner = make_runner(ep)
    stream = runner.stream_sync(Agent(), "hi")
    first = next(stream)
    assert isinstance(first, TurnStarted)
    stream.cancel()
    with pytest.raises(RunCancelled):
        list(stream)
    assert ep.closed_streams == 1
    runner.close()


async def test_context_trimming_elides_old_tool_results_once_then_stays_append_only():
    big = "x" * 3000
    calls = [Reply(tool_calls=[(f"c{i}", "dump", "{}")], usage=(300 + 1000 * i, 10, 0)) for i in range(5)]
    ep = ScriptedEndpoint(*calls, Reply(content="done"))

    @tool
    def dump() -> str:
        """Large output."""
        return big

    runner = make_runner(ep, context=ContextPolicy(max_prompt_tokens=3000, low_watermark=0.5))
    events = await collect(runner, Agent(tools=[dump], instructions="sys"), "go")
    trims = [e for e in events if isinstance(e, ContextTrimmed)]
    assert trims and trims[0].elided_tool_results >= 1 and trims[0].dropped_messages == 0
    assert trims[0].estimated_tokens_after <= 1500 < trims[0].estimated_tokens_before
    sent = ep.messages
    assert all(m[0] == {"role": "system", "content": "sys"} for m in sent)
    trimmed_at = next(
        i for i, msgs in enumerate(sent) if any("elided" in str(m.get("content")) for m in msgs)
    )
    # Between trims, each prompt extends the previous one (prefix stable).
    for k in range(len(sent) - 1):
        if any(e.turn == k + 2 for e in trims):
            continue
        assert sent[k + 1][: len(sent[k])] == sent[k], f"turn {k + 2} rewrote the prefix"
    # The newest, unread tool result is never elided.
    assert sent[trimmed_at][-1]["content"] == big
    assert events[-1].output == "done"
