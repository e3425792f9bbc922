"""`Agent`: what to say to the model (instructions, tools, reasoning mode, sampling settings)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

from dsv4_agent.agent.tools import Tool, tool

__all__ = ["Agent", "ModelSettings", "ReasoningEffort"]

# DeepSeek-V4 has three modes: Non-think ("none"), Think High ("high"), Think Max ("max"). "low"/"medium"
# are accepted for OpenAI-style callers and sent as given; the server maps them (ours: to "high").
ReasoningEffort = Literal["none", "low", "medium", "high", "max"]
_EFFORTS = ("none", "low", "medium", "high", "max")


@dataclasses.dataclass
class ModelSettings:
    """Sampling and request settings. `None` leaves the server default (V4 recommends T=1.0, top_p=1.0).

    `extra_body` is merged into every request body (last, so it can override what the SDK sets; a key set
    to None is removed, e.g. `{"chat_template_kwargs": None}` for an endpoint that rejects it).
    """

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None  # per model turn
    parallel_tool_calls: bool | None = None
    seed: int | None = None
    extra_body: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Agent:
    """An agent: instructions (the system message), tools, a reasoning mode and model settings.

    `reasoning_effort="none"` switches thinking off (Non-think); "high" and "max" select Think High / Think Max.
    `tools` may hold `Tool` objects or plain functions (wrapped with `@tool`).
    """

    instructions: str | None = None
    tools: Sequence[Tool | Callable[..., Any]] | None = ()
    model: str | None = None  # None: the Runner's model (or the endpoint's only model)
    reasoning_effort: ReasoningEffort = "high"
    settings: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    name: str = "agent"

    def __post_init__(self) -> None:
        if self.reasoning_effort not in _EFFORTS:
            raise ValueError(f"reasoning_effort: expected one of {_EFFORTS}, got {self.reasoning_effort!r}")
        if isinstance(self.tools, Tool) or callable(self.tools):
            raise TypeError(
                f"tools: expected a list of tools, got one {type(self.tools).__name__}: tools=[...]"
            )
        self.tools = [t if isinstance(t, Tool) else tool(t) for t in self.tools or ()]
        names = [t.name for t in self.tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tools: duplicate tool names {duplicates}")

    @property
    def thinking(self) -> bool:
        return self.reasoning_effort != "none"

    def tool_map(self) -> dict[str, Tool]:
        return {t.name: t for t in self.tools}  # type: ignore[union-attr]

    def request_options(self) -> dict[str, Any]:
        """Request fields other than model/messages/stream (`extra_body` is merged into the body).

        The thinking switch is sent in the two spellings V4 servers read: DeepSeek's `thinking: {type}` and
        SGLang's `chat_template_kwargs.thinking`; the effort goes in the top-level `reasoning_effort`.
        """
        s = self.settings
        opts: dict[str, Any] = {}
        if self.tools:
            opts["tools"] = [t.to_openai() for t in self.tools]  # type: ignore[union-attr]
            if s.parallel_tool_calls is not None:
                opts["parallel_tool_calls"] = s.parallel_tool_calls
        for key in ("temperature", "top_p", "max_tokens", "seed"):
            if getattr(s, key) is not None:
                opts[key] = getattr(s, key)
        if self.thinking:
            opts["reasoning_effort"] = self.reasoning_effort
        extra = {
            "thinking": {"type": "enabled" if self.thinking else "disabled"},
            "chat_template_kwargs": {"thinking": self.thinking},
        }
        extra.update(s.extra_body)
        opts["extra_body"] = {k: v for k, v in extra.items() if v is not None}
        return opts
