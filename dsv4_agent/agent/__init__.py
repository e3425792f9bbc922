"""dsv4_agent.agent: an agent SDK for DeepSeek-V4 with interleaved thinking, on the official `openai` client.

    from dsv4_agent.agent import Agent, Runner, tool

    @tool
    def add(a: int, b: int) -> int:
        '''Add two integers.'''
        return a + b

    result = Runner().run_sync(Agent(instructions="Be brief.", tools=[add]), "What is 2 + 40?")
    print(result.final_output)

Imports only `openai`, `pydantic`, `httpx` and the standard library (never torch), so it installs and starts
fast on a client machine. See README.md beside this file.
"""

from dsv4_agent.agent.agent import Agent, ModelSettings, ReasoningEffort
from dsv4_agent.agent.context import ContextPolicy
from dsv4_agent.agent.errors import (
    AgentError,
    ContextWindowExceeded,
    MaxTurnsExceeded,
    ModelHTTPError,
    RunCancelled,
    TokenBudgetExceeded,
    ToolArgumentsError,
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
from dsv4_agent.agent.runner import Limits, RetryPolicy, Runner, RunResult, RunStream, SyncRunStream
from dsv4_agent.agent.tools import Tool, tool

__all__ = [
    "Agent",
    "ModelSettings",
    "ReasoningEffort",
    "Runner",
    "RunResult",
    "RunStream",
    "SyncRunStream",
    "Limits",
    "RetryPolicy",
    "ContextPolicy",
    "Tool",
    "tool",
    "Usage",
    "Event",
    "TurnStarted",
    "ReasoningDelta",
    "ContentDelta",
    "ToolCallStarted",
    "ToolCallArgumentsDelta",
    "ToolCallFinished",
    "TurnUsage",
    "TurnFinished",
    "ToolResult",
    "TurnRetried",
    "ContextTrimmed",
    "FinalOutput",
    "AgentError",
    "MaxTurnsExceeded",
    "TokenBudgetExceeded",
    "ContextWindowExceeded",
    "RunCancelled",
    "ModelHTTPError",
    "ToolCallError",
    "ToolArgumentsError",
    "UnknownToolError",
    "ToolTimeoutError",
    "ToolExecutionError",
]
