"""Typed events of a run, in the order a consumer sees them.

Per model turn: `TurnStarted`, then interleaved `ReasoningDelta` / `ContentDelta` / `ToolCallStarted` /
`ToolCallArgumentsDelta` as the response streams, then `ToolCallFinished` for each call (call order),
`TurnUsage`, `TurnFinished`; then, if there were calls, one `ToolResult` per call *as each completes*
(`index` gives its place in call order). A run ends with `FinalOutput`. `TurnRetried` means the deltas of
that turn so far are void (a transient error restarted the request); `ContextTrimmed` reports that the
context strategy edited old history before a turn.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv4_agent.agent.runner import RunResult

__all__ = [
    "Usage",
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
    "Event",
]


@dataclasses.dataclass
class Usage:
    """Token counts; `cached_tokens` is the part of the prompt served from the server's prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class TurnStarted:
    turn: int  # 1-based model call number within the run


@dataclasses.dataclass(frozen=True)
class ReasoningDelta:
    turn: int
    text: str


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    turn: int
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallStarted:
    turn: int
    index: int  # position of the call in the response (call order)
    call_id: str
    name: str


@dataclasses.dataclass(frozen=True)
class ToolCallArgumentsDelta:
    turn: int
    index: int
    call_id: str
    delta: str


@dataclasses.dataclass(frozen=True)
class ToolCallFinished:
    turn: int
    index: int
    call_id: str
    name: str
    arguments: str  # the exact JSON text the model produced


@dataclasses.dataclass(frozen=True)
class TurnUsage:
    turn: int
    usage: Usage


@dataclasses.dataclass(frozen=True)
class TurnFinished:
    turn: int
    finish_reason: str | None
    message: dict[str, Any]  # the assistant message as appended to the history (and sent back next turn)


@dataclasses.dataclass(frozen=True)
class ToolResult:
    turn: int
    index: int
    call_id: str
    name: str
    output: str  # what the model reads (for a failed call: the error text)
    error: BaseException | None  # a ToolCallError subclass when the call failed
    duration_s: float


@dataclasses.dataclass(frozen=True)
class TurnRetried:
    turn: int
    attempt: int  # 1 for the first retry
    error: str
    delay_s: float


@dataclasses.dataclass(frozen=True)
class ContextTrimmed:
    turn: int
    elided_tool_results: int
    dropped_messages: int
    estimated_tokens_before: int
    estimated_tokens_after: int


@dataclasses.dataclass(frozen=True)
class FinalOutput:
    output: str
    result: RunResult


Event = (
    TurnStarted
    | ReasoningDelta
    | ContentDelta
    | ToolCallStarted
    | ToolCallArgumentsDelta
    | ToolCallFinished
    | TurnUsage
    | TurnFinished
    | ToolResult
    | TurnRetried
    | ContextTrimmed
    | FinalOutput
)
