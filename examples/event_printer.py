"""A UI-less event printer: every event of a run as one plain line, from the async streaming API.

    python examples/event_printer.py "Add 2 and 40, then tell me a fun fact about the result."

Shows the shape of the stream a UI would consume: reasoning and content deltas, tool calls being written
(arguments streaming in), tool results as they complete, per-turn usage with cached prompt tokens, and the
final output. Ctrl-C cancels the run cleanly (the HTTP stream is closed, running tools are cancelled).
"""

from __future__ import annotations

import asyncio
import os
import sys

from dsv4_agent.agent import (
    Agent,
    ContentDelta,
    FinalOutput,
    ReasoningDelta,
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
    tool,
)


@tool
async def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


def describe(event: object) -> str:
    match event:
        case TurnStarted(turn=t):
            return f"turn {t} started"
        case ReasoningDelta(text=text):
            return f"  reasoning  {text!r}"
        case ContentDelta(text=text):
            return f"  content    {text!r}"
        case ToolCallStarted(index=i, call_id=cid, name=name):
            return f"  call #{i} {name} started (id {cid})"
        case ToolCallArgumentsDelta(index=i, delta=d):
            return f"  call #{i} arguments += {d!r}"
        case ToolCallFinished(index=i, name=name, arguments=args):
            return f"  call #{i} {name}({args}) complete"
        case TurnUsage(turn=t, usage=u):
            return f"  usage: prompt {u.prompt_tokens} (cached {u.cached_tokens}), completion {u.completion_tokens}"
        case TurnFinished(turn=t, finish_reason=reason):
            return f"turn {t} finished ({reason})"
        case ToolResult(index=i, name=name, output=out, error=err, duration_s=s):
            status = f"error {type(err).__name__}" if err else "ok"
            return f"  result #{i} {name} [{status}, {s * 1000:.0f} ms]: {out[:200]!r}"
        case TurnRetried(attempt=a, error=e, delay_s=d):
            return f"  retry {a} in {d:.1f}s after {e} (discard this turn's deltas)"
        case FinalOutput(output=out, result=r):
            return f"final output after {r.turns} turns: {out!r}"
    return repr(event)


async def main() -> None:
    task = " ".join(sys.argv[1:]) or "Add 2 and 40, then tell me a fun fact about the result."
    agent = Agent(instructions="Use the tools for arithmetic.", tools=[add])
    runner = Runner(model=os.environ.get("DSV4_MODEL"))
    try:
        async with runner.stream(agent, task) as stream:
            async for event in stream:
                print(describe(event), flush=True)
    except RunCancelled as e:
        print(f"cancelled; {len(e.result.messages)} messages kept")  # type: ignore[attr-defined]
    finally:
        await runner.client.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print("\ninterrupted")
