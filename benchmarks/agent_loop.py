"""Client-side cost of the agent loop: what `Runner` adds per model turn over a bare `openai` stream.

Both sides read the same pre-built SSE bytes through `httpx.MockTransport` (no network, no model), so the
difference is the SDK's own work: parsing deltas into typed events, accumulating tool calls, validating
arguments, running K no-op tools concurrently, building the next request.

    python benchmarks/agent_loop.py [--turns 200] [--calls 4] [--chunks 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import openai

from dsv4_agent.agent import Agent, Limits, Runner, tool


def sse(chunks: int, calls: int, final: bool) -> bytes:
    def chunk(delta: dict) -> str:
        body = {"id": "b", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    out = [chunk({"reasoning_content": "think "}) for _ in range(chunks // 2)]
    out += [chunk({"content": "word "}) for _ in range(chunks - chunks // 2)]
    if not final:
        for i in range(calls):
            out.append(chunk({"tool_calls": [{"index": i, "id": f"c{i}", "type": "function",
                                              "function": {"name": "noop", "arguments": '{"x": 1}'}}]}))  # fmt: skip
    usage = {"prompt_tokens": 1000, "completion_tokens": chunks, "total_tokens": 1000 + chunks,
             "prompt_tokens_details": {"cached_tokens": 900}}  # fmt: skip
    out.append(
        f"data: {json.dumps({'id': 'b', 'object': 'chat.completion.chunk', 'created': 0, 'model': 'm', 'choices': [], 'usage': usage})}\n\n"
    )
    return ("".join(out) + "data: [DONE]\n\n").encode()


def client(turns: int, chunks: int, calls: int) -> openai.AsyncOpenAI:
    bodies = [sse(chunks, calls, final=i == turns - 1) for i in range(turns)]
    count = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal count
        body = bodies[count % turns]
        count += 1
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return openai.AsyncOpenAI(base_url="http://bench/v1", api_key="x", http_client=http)


@tool
async def noop(x: int) -> str:
    """Does nothing."""
    return "ok"


async def bare(turns: int, chunks: int, calls: int) -> float:
    c = client(turns, chunks, calls)
    t0 = time.perf_counter()
    for _ in range(turns):
        stream = await c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        async for _chunk in stream:
            pass
    return time.perf_counter() - t0


async def sdk(turns: int, chunks: int, calls: int) -> float:
    runner = Runner(client(turns, chunks, calls), model="m", limits=Limits(max_turns=turns + 1))
    t0 = time.perf_counter()
    result = await runner.run(Agent(tools=[noop]), "x")
    elapsed = time.perf_counter() - t0
    assert result.turns == turns
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--chunks", type=int, default=200)
    a = p.parse_args()
    asyncio.run(sdk(5, a.chunks, a.calls))  # warm-up (imports, pydantic schema build)
    base = min(asyncio.run(bare(a.turns, a.chunks, a.calls)) for _ in range(3))
    full = min(asyncio.run(sdk(a.turns, a.chunks, a.calls)) for _ in range(3))
    per_turn = (full - base) / a.turns * 1e3
    print(f"turns={a.turns} chunks/turn={a.chunks} parallel calls/turn={a.calls}")
    print(f"bare openai stream: {base / a.turns * 1e3:.2f} ms/turn")
    print(f"Runner (events, tools, history): {full / a.turns * 1e3:.2f} ms/turn -> SDK overhead {per_turn:.2f} ms/turn "
          f"({per_turn * 1e3 / a.chunks:.1f} us per streamed chunk incl. tool work)")  # fmt: skip


if __name__ == "__main__":
    main()
