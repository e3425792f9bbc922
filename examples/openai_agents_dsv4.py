"""openai-agents (the OpenAI Agents SDK) against a DeepSeek-V4 server, with reasoning replayed.

    pip install openai-agents        # in its own environment: it needs openai>=3, sglang pins openai 2.8
    DSV4_BASE_URL=http://127.0.0.1:30000/v1 python examples/openai_agents_dsv4.py "What's 12 * 34 + 5?"

The settings that matter for V4:
* Chat Completions (`OpenAIChatCompletionsModel`), not the Responses API: V4 servers speak Chat Completions.
* `should_replay_reasoning_content=lambda ctx: True`: the SDK sends `reasoning_content` back on assistant
  turns only when the model name contains "deepseek"; with this hook it does for any served name, so every
  tool-call step keeps its reasoning (our server would also restore it, but replaying it is exact).
* `ModelSettings(reasoning=Reasoning(effort="high"|"max"), extra_body={"thinking": {"type": "enabled"}})`:
  the effort goes out as `reasoning_effort`; `thinking` is DeepSeek's switch (`"disabled"` for Non-think).
* `parallel_tool_calls=True`: V4 emits several calls in one turn; the SDK runs function tools concurrently.
* Tracing is disabled (it would upload traces to OpenAI).
"""

from __future__ import annotations

import asyncio
import os
import sys

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from openai.types.shared import Reasoning

# openai-agents makes strict JSON-schema tools by default; the server then constrains the arguments to the
# schema with a grammar. DSV4_STRICT_TOOLS=0 makes plain (unconstrained) function tools instead.
STRICT = os.environ.get("DSV4_STRICT_TOOLS", "1") == "1"


@function_tool(strict_mode=STRICT)
def multiply(a: float, b: float) -> float:
    """Multiply two numbers.

    Args:
        a: first factor.
        b: second factor.
    """
    return a * b


@function_tool(strict_mode=STRICT)
def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: first term.
        b: second term.
    """
    return a + b


def build_agent(base_url: str, model: str) -> Agent:
    client = AsyncOpenAI(base_url=base_url, api_key=os.environ.get("DSV4_API_KEY", "EMPTY"))
    return Agent(
        name="calculator",
        instructions="Use the tools for every arithmetic step, then answer with the number.",
        tools=[multiply, add],
        model=OpenAIChatCompletionsModel(
            model=model, openai_client=client, should_replay_reasoning_content=lambda ctx: True
        ),
        model_settings=ModelSettings(
            reasoning=Reasoning(effort=os.environ.get("DSV4_REASONING_EFFORT", "high")),
            extra_body={"thinking": {"type": "enabled"}},
            parallel_tool_calls=True,
        ),
    )


async def main() -> None:
    set_tracing_disabled(True)
    base_url = os.environ.get("DSV4_BASE_URL", "http://127.0.0.1:30000/v1")
    model = (
        os.environ.get("DSV4_MODEL")
        or (await AsyncOpenAI(base_url=base_url, api_key="EMPTY").models.list()).data[0].id
    )
    result = await Runner.run(build_agent(base_url, model), " ".join(sys.argv[1:]) or "What's 12 * 34 + 5?")
    print(result.final_output)


if __name__ == "__main__":
    asyncio.run(main())
