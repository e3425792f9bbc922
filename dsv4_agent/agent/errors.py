"""Exceptions of the agent SDK.

Two families:
* run-ending errors (`AgentError` subclasses raised by `Runner.run` / the event stream): a limit was hit, the
  run was cancelled, the model or the endpoint misbehaved beyond retrying;
* tool-call errors (`ToolCallError` subclasses): never raised out of a run. They are turned into the tool
  result the model reads (so it can correct itself) and are attached to the `ToolResult` event.
"""

from __future__ import annotations

__all__ = [
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


class AgentError(Exception):
    """Base class of the errors that end a run."""


class MaxTurnsExceeded(AgentError):
    """The model was called `max_turns` times and still asked for tools."""

    def __init__(self, max_turns: int) -> None:
        super().__init__(f"the run used its {max_turns} model turns and the model still requested tools")
        self.max_turns = max_turns


class TokenBudgetExceeded(AgentError):
    """The run's total tokens (prompt + completion, summed over turns) passed `max_total_tokens`."""

    def __init__(self, used: int, budget: int) -> None:
        super().__init__(f"the run used {used} tokens, over its budget of {budget}")
        self.used, self.budget = used, budget


class ContextWindowExceeded(AgentError):
    """The conversation does not fit the context window even after the context strategy trimmed it."""


class RunCancelled(AgentError):
    """The run was cancelled (`RunStream.cancel()`, Ctrl-C in the CLI); the history is the last consistent one."""


class ModelHTTPError(AgentError):
    """The endpoint answered with a non-retryable error, or transient errors outlasted the retries.
    `status_code`: the HTTP status (or the in-band error code) of the last failure; None without one."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ToolCallError(Exception):
    """A tool call failed; the message is what the model reads."""

    def __init__(self, tool_name: str, message: str) -> None:
        super().__init__(message)
        self.tool_name = tool_name


class ToolArgumentsError(ToolCallError):
    """The arguments were not JSON or did not validate against the tool's schema."""


class UnknownToolError(ToolCallError):
    """The model called a tool the agent does not have."""


class ToolTimeoutError(ToolCallError):
    """The tool ran past its timeout and was cancelled (a sync tool's thread finishes in the background)."""


class ToolExecutionError(ToolCallError):
    """The tool raised; `__cause__` is the original exception."""
