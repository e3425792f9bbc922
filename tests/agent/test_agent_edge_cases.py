"""Edge cases a user of the SDK and CLI runs into: unusual tool signatures and return values, error answers
that are not plain HTTP errors, streams left early, bad limits and CLI values. Scripted endpoint behind
`httpx.MockTransport` (or the stdlib HTTP server for the CLI); no model server."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import functools
import gc
import json
import logging
import os
import signal
import threading
import time
import warnings

import pydantic
import pytest
from agent_fakes import (
    FAST_RETRY,
    Hang,
    Raw,
    Reply,
    ScriptedEndpoint,
    Status,
    ThreadedScriptedServer,
    make_runner,
    recording_tool,
)
from agent_fixtures import anyio_backend  # noqa: F401  (pytest fixture)

from dsv4_agent.agent import (
    Agent,
    ContextPolicy,
    ContextWindowExceeded,
    FinalOutput,
    Limits,
    ModelHTTPError,
    ReasoningDelta,
    RetryPolicy,
    RunCancelled,
    Runner,
    ToolCallArgumentsDelta,
    ToolCallFinished,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnRetried,
    TurnStarted,
    TurnUsage,
    UnknownToolError,
    tool,
)
from dsv4_agent.agent.cli import main

pytestmark = pytest.mark.anyio


def sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


# ---- @tool -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Box:
    width: float
    label: str = "box"


async def test_dataclass_dict_union_and_optional_parameters_without_a_docstring():
    async def pack(box: Box, counts: dict[str, int], key: int | str, note: str | None = None) -> str:
        return f"{box!r} {counts} {key!r} {note}"

    packer = tool(pack)
    params = packer.json_schema()
    assert packer.description == "" and params["required"] == ["box", "counts", "key"]
    assert params["$defs"]["Box"]["required"] == ["width"]
    assert params["properties"]["counts"] == {"additionalProperties": {"type": "integer"}, "type": "object"}
    assert params["properties"]["key"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    args = packer.validate('{"box": {"width": 2}, "counts": {"a": 1}, "key": "k"}')
    assert await packer.invoke(args) == "Box(width=2.0, label='box') {'a': 1} 'k' None"
    with pytest.raises(Exception, match=r"box\.width: Field required"):
        packer.validate('{"box": {}, "counts": {}, "key": 1}')


async def test_field_defaults_keep_their_default_constraints_and_description():
    @tool
    def page(
        query: str,
        size: int = pydantic.Field(10, ge=1, le=50),
        tags: list[str] = pydantic.Field(default_factory=list, description="labels to match"),  # noqa: B008
    ) -> str:
        """Search.

        Args:
            size: results per page.
        """
        return f"{query} {size} {tags}"

    props = page.json_schema()["properties"]
    assert props["size"] == {
        "default": 10,
        "description": "results per page.",
        "maximum": 50,
        "minimum": 1,
        "type": "integer",
    }
    assert props["tags"]["description"] == "labels to match" and page.json_schema()["required"] == ["query"]
    assert await page.invoke(page.validate('{"query": "q"}')) == "q 10 []"
    with pytest.raises(Exception, match="size: Input should be less than or equal to 50"):
        page.validate('{"query": "q", "size": 99}')


async def test_parameter_names_pydantic_reserves_still_work():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "shadows an attribute in parent BaseModel"

        @tool
        def fetch(url: str, json: bool = False, schema: str = "public", _trace: int = 0) -> str:
            """Fetch.

            Args:
                json: parse the body as JSON.
            """
            return f"{url} {json} {schema} {_trace}"

    params = fetch.json_schema()
    assert list(params["properties"]) == ["url", "json", "schema", "_trace"]
    assert params["properties"]["json"]["description"] == "parse the body as JSON."
    args = fetch.validate('{"url": "u", "json": true, "schema": "s", "_trace": 3}')
    assert await fetch.invoke(args) == "u True s 3"
    with pytest.raises(Exception, match="_trace: Input should be a valid integer"):
        fetch.validate('{"url": "u", "_trace": "x"}')


async def test_callable_objects_partials_and_sync_wrappers_of_coroutines():
    class Scaler:
        async def __call__(self, x: float) -> float:
            return 2 * x

    def scale(x: float, factor: float) -> float:
        return x * factor

    def logged(fn):  # a decorator without `async def` around a coroutine function
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    @logged
    async def ping(host: str) -> str:
        """Ping."""
        await asyncio.sleep(0)
        return f"pong {host}"

    scaler = tool(name="scaler")(Scaler())
    assert scaler.is_async and await scaler.invoke(scaler.validate('{"x": 1.5}')) == 3.0
    triple = tool(name="triple")(functools.partial(scale, factor=3.0))
    assert await triple.invoke(triple.validate('{"x": 2}')) == 6.0
    with pytest.raises(ValueError, match="pass name="):
        tool(functools.partial(scale, factor=3.0))
    pinger = tool(ping)
    assert await pinger.invoke(pinger.validate('{"host": "h"}')) == "pong h"


def test_an_unresolvable_type_hint_is_a_clear_error():
    def lookup(key: UndefinedType) -> str:  # noqa: F821
        return key

    with pytest.raises(TypeError, match=r"tool 'lookup': a type hint cannot be resolved .*UndefinedType"):
        tool(lookup)


class Unit(enum.Enum):
    CELSIUS = "C"


@dataclasses.dataclass
class Reading:
    city: str
    unit: Unit


class Station(pydantic.BaseModel):
    name: str


async def test_non_string_tool_results_reach_the_model_as_json():
    @tool
    def report() -> dict:
        """Readings."""
        return {
            "readings": [Reading("Lima", Unit.CELSIUS)],
            "stations": [Station(name="é1")],
            "day": datetime.date(2026, 11, 23),
            "ids": {7},
        }

    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "report", "{}")]), Reply(content="ok"))
    await make_runner(ep).run(Agent(tools=[report]), "go")
    content = ep.requests[1]["messages"][-1]["content"]
    assert json.loads(content) == {
        "readings": [{"city": "Lima", "unit": "C"}],
        "stations": [{"name": "é1"}],
        "day": "2026-11-23",
        "ids": [7],
    }
    assert "é1" in content  # not \\u-escaped: fewer prompt tokens


async def test_a_result_json_cannot_express_is_sent_as_text():
    @tool
    def loop() -> dict:
        """A self-referencing value."""
        value: dict = {"name": "node"}
        value["self"] = value
        return value

    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "loop", "{}")]), Reply(content="ok"))
    result = await make_runner(ep).run(Agent(tools=[loop]), "go")
    assert ep.requests[1]["messages"][-1]["content"] == "{'name': 'node', 'self': {...}}"
    assert result.final_output == "ok"


async def test_many_sync_calls_of_one_turn_all_run_at_once():
    # More calls than asyncio's default executor has threads (at most 32): each waits for all the others.
    n = 40
    barrier = threading.Barrier(n, timeout=20)

    @tool
    def meet(i: int) -> str:
        """Wait for the others."""
        barrier.wait()
        return f"met {i}"

    calls = [(f"c{i}", "meet", json.dumps({"i": i})) for i in range(n)]
    ep = ScriptedEndpoint(Reply(tool_calls=calls, piece=64), Reply(content="ok"))
    await make_runner(ep).run(Agent(tools=[meet]), "go")
    outputs = [m["content"] for m in ep.requests[1]["messages"] if m["role"] == "tool"]
    assert outputs == [f"met {i}" for i in range(n)]
    # ... and no idle worker threads stay behind once the calls returned.
    tool_threads = [t for t in threading.enumerate() if t.name.startswith("dsv4-agent-tool")]
    for t in tool_threads:
        t.join(5)
    assert not [t for t in tool_threads if t.is_alive()]


async def test_a_tool_that_calls_sys_exit_is_an_error_for_the_model():
    @tool
    def cli(argv: list[str]) -> str:
        """Run a command-line parser."""
        raise SystemExit(2)  # what argparse does on bad arguments

    @tool
    async def quit_async() -> str:
        """Exit."""
        raise SystemExit("bye")

    ep = ScriptedEndpoint(
        Reply(tool_calls=[("c1", "cli", '{"argv": ["--bogus"]}'), ("c2", "quit_async", "{}")]),
        Reply(content="recovered"),
    )
    result = await make_runner(ep).run(Agent(tools=[cli, quit_async]), "go")
    outputs = [m["content"] for m in ep.requests[1]["messages"] if m["role"] == "tool"]
    assert outputs == [
        "Error: tool 'cli' raised RuntimeError: the tool exited (SystemExit: 2)",
        "Error: tool 'quit_async' raised RuntimeError: the tool exited (SystemExit: 'bye')",
    ]
    assert result.final_output == "recovered"


@pytest.mark.timeout(30)
async def test_a_sync_tool_raising_stop_iteration_is_an_error_not_a_hang():
    @tool
    def first(items: list[int]) -> int:
        """The first item."""
        return next(iter(items))

    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "first", '{"items": []}')]), Reply(content="recovered"))
    result = await make_runner(ep).run(Agent(tools=[first]), "go", limits=Limits(tool_timeout=None))
    outputs = [m["content"] for m in ep.requests[1]["messages"] if m["role"] == "tool"]
    assert outputs == ["Error: tool 'first' raised RuntimeError: the tool raised StopIteration"]
    assert result.final_output == "recovered"


# ---- the endpoint misbehaving ------------------------------------------------------------------------------


def in_band_error(message: str, code: int | str | None, type_: str = "InternalServerError") -> dict:
    """What SGLang (and `dsv4-agent serve`) send when a stream fails after its 200 header; OpenAI-style
    servers put a string code ("context_length_exceeded") or only a `type` there."""
    return {
        "error": {
            "object": "error",
            "message": message,
            "type": type_,
            "param": None,
            "code": code,
        }
    }


async def test_an_error_event_inside_the_stream_is_retried_or_typed():
    broken = Raw(
        sse(chunk({"role": "assistant", "content": ""}), in_band_error("Internal error: boom", 500), "[DONE]")
    )
    ep = ScriptedEndpoint(broken, Reply(content="fine"))
    events = [e async for e in make_runner(ep).stream(Agent(), "hi")]
    retried = [e for e in events if isinstance(e, TurnRetried)]
    assert len(retried) == 1 and "Internal error: boom" in retried[0].error and events[-1].output == "fine"

    ep = ScriptedEndpoint(Raw(sse(in_band_error("bad value for top_k", 400), "[DONE]")))
    with pytest.raises(ModelHTTPError, match="bad value for top_k") as info:
        await make_runner(ep).run(Agent(), "hi")
    assert info.value.status_code == 400 and len(ep.requests) == 1  # a client error is not retried

    ep = ScriptedEndpoint(Raw(sse(in_band_error("the prompt is too long", 400), "[DONE]")))
    with pytest.raises(ContextWindowExceeded):
        await make_runner(ep).run(Agent(), "hi")


@pytest.mark.parametrize(
    ("code", "type_", "outcome"),
    [
        ("context_length_exceeded", "invalid_request_error", ContextWindowExceeded),
        (None, "invalid_request_error", ModelHTTPError),
        ("invalid_api_key", "authentication_error", ModelHTTPError),
        ("insufficient_quota", "insufficient_quota", ModelHTTPError),
        ("rate_limit_exceeded", "requests", "retried"),
        ("server_error", "server_error", "retried"),
        (None, None, "retried"),  # nothing says what failed: worth another try
    ],
)
async def test_named_error_codes_inside_the_stream(code, type_, outcome):
    """OpenAI-style string codes are classified like their HTTP statuses (they used to be retried as unknown)."""
    failing = Raw(sse(in_band_error("it failed (a message that names no limit)", code, type_), "[DONE]"))
    ep = ScriptedEndpoint(failing, Reply(content="fine"))
    if outcome == "retried":
        result = await make_runner(ep).run(Agent(), "hi")
        assert result.final_output == "fine" and len(ep.requests) == 2
    else:
        with pytest.raises(outcome):
            await make_runner(ep).run(Agent(), "hi")
        assert len(ep.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        Raw("data: {not json\n\ndata: [DONE]\n\n"),
        Raw("data: [DONE]\n\n"),  # no completion at all
        Raw("<html>sign in</html>", content_type="text/html"),  # a wrong base URL behind a web server
    ],
    ids=["broken-json", "empty", "html"],
)
async def test_an_unreadable_or_empty_answer_is_retried_then_a_typed_error(answer):
    ep = ScriptedEndpoint(answer, Reply(content="fine"))
    assert (await make_runner(ep).run(Agent(), "hi")).final_output == "fine"

    ep = ScriptedEndpoint(answer, answer, answer)
    with pytest.raises(
        ModelHTTPError, match=r"failed after 2 retries: .*endpoint http://scripted.test/v1/"
    ) as info:
        await make_runner(ep).run(Agent(), "hi")
    assert len(ep.requests) == 3 and info.value.result.messages == [{"role": "user", "content": "hi"}]


async def test_listing_the_models_fails_with_a_typed_error():
    ep = ScriptedEndpoint(models_answer=Status(401, '{"error": {"message": "invalid api key"}}'))
    with pytest.raises(ModelHTTPError, match="invalid api key") as info:
        await make_runner(ep).run(Agent(), "hi")
    assert info.value.status_code == 401 and ep.models_requests == 1 and not ep.requests

    ep = ScriptedEndpoint(Reply(content="up now"), models_answer=Status(503))
    runner = make_runner(ep)
    with pytest.raises(ModelHTTPError, match="listing the models failed after 2 retries"):
        await runner.run(Agent(), "hi")
    assert ep.models_requests == 3
    ep.models_answer = None  # the server came up: the next run finds its model
    assert (await runner.run(Agent(), "hi")).final_output == "up now"


async def test_a_404_names_the_url_and_hints_at_the_missing_v1():
    ep = ScriptedEndpoint(Status(404, '{"detail": "Not Found"}'))
    with pytest.raises(ModelHTTPError) as info:
        await make_runner(ep, model="m").run(Agent(), "hi")
    message = str(info.value)
    assert "HTTP 404" in message and "POST http://scripted.test/v1/chat/completions" in message
    assert "end in /v1" in message
    assert info.value.status_code == 404 and len(ep.requests) == 1


async def test_a_call_without_a_name_or_id_has_one_id_in_events_and_history():
    ep = ScriptedEndpoint(Reply(tool_calls=[("", "", '{"a": 1}')]), Reply(content="ok"))
    events = [e async for e in make_runner(ep).stream(Agent(), "go")]
    finished = next(e for e in events if isinstance(e, ToolCallFinished))
    result = next(e for e in events if isinstance(e, ToolResult))
    assistant, tool_msg = ep.requests[1]["messages"][1:]
    assert finished.call_id and finished.call_id == result.call_id == tool_msg["tool_call_id"]
    assert assistant["tool_calls"][0]["id"] == finished.call_id and isinstance(result.error, UnknownToolError)


async def test_event_stream_order_and_completeness_over_several_turns():
    work, _ = recording_tool()
    script = [
        Reply(reasoning="two at once", tool_calls=[("a1", "work", '{"n": 1}'), ("a2", "work", '{"n": 2}')]),
        Reply(content="thinking aloud", tool_calls=[("b1", "work", '{"n": 3}')], usage=(300, 30, 100)),
        Reply(reasoning="done", content="all done"),
    ]
    events = [e async for e in make_runner(ScriptedEndpoint(*script)).stream(Agent(tools=[work]), "go")]
    assert isinstance(events[-1], FinalOutput) and sum(isinstance(e, FinalOutput) for e in events) == 1
    for turn in (1, 2, 3):
        mine = [e for e in events if getattr(e, "turn", None) == turn]
        kinds = [type(e) for e in mine]
        assert kinds[0] is TurnStarted and kinds.count(TurnUsage) == kinds.count(TurnFinished) == 1
        started = {e.call_id: i for i, e in enumerate(mine) if isinstance(e, ToolCallStarted)}
        finished = {e.call_id: i for i, e in enumerate(mine) if isinstance(e, ToolCallFinished)}
        results = {e.call_id: i for i, e in enumerate(mine) if isinstance(e, ToolResult)}
        assert started.keys() == finished.keys() == results.keys()  # every started call is done and answered
        usage_at, finished_at = kinds.index(TurnUsage), kinds.index(TurnFinished)
        for call_id in started:
            deltas = [
                i
                for i, e in enumerate(mine)
                if isinstance(e, ToolCallArgumentsDelta) and e.call_id == call_id
            ]
            assert started[call_id] < min(deltas) <= max(deltas) < finished[call_id] < usage_at < finished_at
            assert finished_at < results[call_id]
    turn_starts = [i for i, e in enumerate(events) if isinstance(e, TurnStarted)]
    assert [events[i].turn for i in turn_starts] == [1, 2, 3]
    assert events[-1].result.usage.total_tokens == sum(
        e.usage.total_tokens for e in events if isinstance(e, TurnUsage)
    )


# ---- streams left early ------------------------------------------------------------------------------------


async def test_breaking_out_of_the_stream_closes_it():
    ep = ScriptedEndpoint(Hang(Reply(reasoning="a long thought"), after=3))
    async for event in make_runner(ep).stream(Agent(), "hi"):
        if isinstance(event, ReasoningDelta):
            break
    for _ in range(100):
        if ep.closed_streams:
            break
        await asyncio.sleep(0.01)
    assert ep.closed_streams == 1
    assert not [t for t in asyncio.all_tasks() if "_pump" in repr(t.get_coro())]  # no run left behind


async def test_a_kept_stream_left_early_does_not_run_ahead():
    work, ran = recording_tool()
    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "work", '{"n": 1}')]), Reply(content="ok"))
    stream = make_runner(ep).stream(Agent(tools=[work]), "go")
    async for event in stream:
        if isinstance(event, ToolCallStarted):
            break
    await asyncio.sleep(0.2)
    assert ran == [] and len(ep.requests) == 1  # the run waits for its consumer
    with pytest.raises(RunCancelled) as info:
        async with stream:
            async for _ in stream:
                stream.cancel()
    assert ran == [] and len(ep.requests) == 1
    assert [m["role"] for m in info.value.result.messages] == ["user"]


async def test_a_cancel_between_events_leaves_every_call_answered():
    @tool
    async def slow() -> str:
        """Slow."""
        await asyncio.sleep(3600)
        return "never"

    ep = ScriptedEndpoint(Reply(tool_calls=[("c1", "slow", "{}"), ("c2", "slow", "{}")]))
    stream = make_runner(ep).stream(Agent(tools=[slow]), "go")
    with pytest.raises(RunCancelled) as info:
        async for event in stream:
            if isinstance(event, TurnFinished):
                stream.cancel()
    await stream.wait_closed()
    messages = info.value.result.messages
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert [m["tool_call_id"] for m in messages[2:]] == ["c1", "c2"]
    assert all("cancelled" in m["content"] for m in messages[2:])


@pytest.mark.timeout(30)
async def test_a_cancel_before_the_run_started_ends_with_run_cancelled():
    """`cancel()` right after the first `__anext__` created the producer, before its first step."""
    ep = ScriptedEndpoint(Reply(content="never read"))
    stream = make_runner(ep).stream(Agent(), "go")
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)  # __anext__ has scheduled the producer; the producer has not run yet
    stream.cancel()
    with pytest.raises(RunCancelled):
        await asyncio.wait_for(first, 10)
    assert ep.requests == []


def test_a_sync_stream_left_early_does_not_go_on_in_the_next_run(caplog):
    work, ran = recording_tool()
    ep = ScriptedEndpoint(
        Reply(reasoning="plan it", tool_calls=[("c1", "work", '{"n": 1}')]),
        Reply(content="second task done"),
    )
    with caplog.at_level(logging.ERROR, logger="asyncio"), Runner(ep.client(), retry=FAST_RETRY) as runner:
        for event in runner.stream_sync(Agent(tools=[work]), "first"):
            if isinstance(event, ReasoningDelta):
                break
        result = runner.run_sync(Agent(tools=[work]), "second")
        assert result.final_output == "second task done"
        assert ran == [] and len(ep.requests) == 2  # the abandoned run neither ran its tool nor asked again
    gc.collect()
    assert runner.client.is_closed() and "destroyed but it is pending" not in caplog.text


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_sync_stream_then_cancel_ends_with_run_cancelled(caplog):
    ep = ScriptedEndpoint(Hang(Reply(reasoning="a long thought"), after=3))
    runner = make_runner(ep)
    stream = runner.stream_sync(Agent(), "hi")

    def press_ctrl_c() -> None:  # once the stream hangs, i.e. while the main thread waits in the loop
        while not ep.hanging.is_set():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                pass
        stream.cancel()  # what the CLI does on Ctrl-C
        assert ep.closed_streams == 1 and stream.snapshot().messages == [{"role": "user", "content": "hi"}]
        with pytest.raises(RunCancelled):  # not swallowed by the call that Ctrl-C interrupted
            next(stream)
        runner.close()
        del stream
        gc.collect()
    assert "never retrieved" not in caplog.text


async def test_runner_as_async_context_manager_closes_its_client():
    ep = ScriptedEndpoint(Reply(content="hi"))
    async with make_runner(ep) as runner:
        assert (await runner.run(Agent(), "hi")).final_output == "hi"
    assert runner.client.is_closed()


async def test_a_reserved_name_never_takes_a_real_parameters_place():
    @tool
    def f(json: int, arg0_: str) -> str:  # `json` needs an internal field name; `arg0_` is a real parameter
        """F."""
        return f"{json} {arg0_}"

    assert list(f.json_schema()["properties"]) == ["json", "arg0_"]
    assert await f.invoke(f.validate('{"json": 1, "arg0_": "x"}')) == "1 x"


def test_close_without_the_sync_api_closes_the_client():
    runner = make_runner(ScriptedEndpoint(Reply(content="hi")))
    assert asyncio.run(runner.run(Agent(), "hi")).final_output == "hi"
    runner.close()
    assert runner.client.is_closed()


def test_run_sync_in_a_running_loop_says_what_to_do():
    async def inside() -> None:
        make_runner(ScriptedEndpoint()).run_sync(Agent(), "hi")

    with pytest.raises(RuntimeError, match="await runner.run"):
        asyncio.run(inside())


# ---- limits and CLI values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Limits(tool_timeout=-1.0), "tool_timeout"),
        (lambda: Limits(max_total_tokens=-1), "max_total_tokens"),
        (lambda: Limits(max_turns=0), "max_turns"),
        (lambda: RetryPolicy(max_retries=-1), "max_retries"),
        (lambda: ContextPolicy(max_prompt_tokens=0), "max_prompt_tokens"),
    ],
)
def test_bad_limits_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--max-turns", "0"], "max_turns"),
        (["--tool-timeout", "-1"], "tool_timeout"),
        (["--max-total-tokens", "-1"], "max_total_tokens"),
        (["--max-prompt-tokens", "-5"], "max_prompt_tokens"),
        (["--shell-timeout", "0"], "shell_timeout"),
    ],
)
def test_cli_bad_values_are_usage_errors(tmp_path, capsys, flags, field):
    assert main(["run", "task", "--workdir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4-agent run: ") and field in err and "Traceback" not in err


def test_cli_without_a_reachable_model_fails_cleanly(tmp_path, capsys):
    denied = Status(401, '{"error": {"message": "invalid api key"}}')
    with ThreadedScriptedServer(models_answer=denied) as server:
        code = main(["run", "task", "--base-url", server.base_url, "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "ModelHTTPError" in err and "invalid api key" in err and "Traceback" not in err


def test_agent_tools_must_be_a_list():
    @tool
    def lookup(key: str) -> str:
        """Lookup."""
        return key

    with pytest.raises(TypeError, match=r"tools: expected a list of tools, got one Tool"):
        Agent(tools=lookup)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tools: expected a list of tools, got one function"):
        Agent(tools=lookup.fn)  # type: ignore[arg-type]
    assert Agent(tools=None).tools == [] and not Agent(tools=None).request_options().get("tools")


async def test_a_finish_chunk_without_a_delta_is_read():
    ep = ScriptedEndpoint(
        Raw(
            sse(
                chunk({"content": "done"}),
                {**chunk({}, "stop"), "choices": [{"index": 0, "finish_reason": "stop"}]},
                "[DONE]",
            )
        )
    )
    events = [e async for e in make_runner(ep).stream(Agent(), "hi")]
    finished = next(e for e in events if isinstance(e, TurnFinished))
    assert finished.finish_reason == "stop" and events[-1].output == "done"
    assert not [e for e in events if isinstance(e, TurnRetried)]


def test_a_tool_timeout_must_not_be_negative():
    with pytest.raises(ValueError, match="timeout: expected seconds >= 0"):
        tool(timeout=-1)(lambda: None)
