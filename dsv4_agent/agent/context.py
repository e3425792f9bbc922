"""Context-length strategy: fit a growing agent history into the window while keeping the prompt prefix stable.

Why this shape. A V4 server reuses the KV of the longest prompt prefix it has seen (radix/prefix cache). With
tools declared, the V4 encoder renders history append-only (spec 6.1: every assistant turn keeps its
reasoning), so an untouched history costs only the new tokens each turn. Any edit of an old message
invalidates the cache from that message on. Hence:

* Nothing is edited while the estimated prompt fits `max_prompt_tokens`; the history grows append-only.
* When it does not fit, the history is trimmed *once, in whole blocks, down to a low watermark*
  (`low_watermark * max_prompt_tokens`), not just below the limit, so that the next many turns are again
  append-only against the new prefix. One cache miss buys a long run of hits.
* Oldest first, least information first:
  1. tool results of earlier turns are replaced by a short elision note (the call, its arguments and the
     assistant's reasoning stay, so the model still knows what it did and can call the tool again);
  2. then whole earlier tasks (a user message and every assistant/tool message up to the next user
     message) are dropped;
  the system message, the current task's user message and the newest tool results (which the model has
  not read yet) are never touched.
* If the remainder still does not fit, `ContextWindowExceeded` is raised rather than cutting the current
  task mid-chain (which would orphan tool calls from their results).

Token counts are estimates: the server's `prompt_tokens + completion_tokens` of the last turn anchors the
count of the history it covered, and text appended since is estimated at `chars_per_token`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dsv4_agent.agent.errors import ContextWindowExceeded

__all__ = ["ContextPolicy", "ELISION_PREFIX"]

ELISION_PREFIX = "[elided to fit the context window:"
_MESSAGE_OVERHEAD_TOKENS = 4  # role markers, </think>, EOS, tool_result tags


@dataclasses.dataclass
class ContextPolicy:
    """`max_prompt_tokens=None` disables trimming (the server's own limit then applies)."""

    max_prompt_tokens: int | None = None
    low_watermark: float = 0.6
    chars_per_token: float = 3.0

    def __post_init__(self) -> None:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: expected >= 1 or None, got {self.max_prompt_tokens}")
        if not 0.0 < self.low_watermark <= 1.0:
            raise ValueError(f"low_watermark: expected a fraction in (0, 1], got {self.low_watermark}")
        if self.chars_per_token <= 0:
            raise ValueError(f"chars_per_token: expected > 0, got {self.chars_per_token}")

    def estimate(self, messages: list[dict[str, Any]], anchor: tuple[int, int] | None = None) -> int:
        """Estimated prompt tokens of `messages`. `anchor=(n, tokens)`: the first `n` messages are known to
        take `tokens` (server-reported), only the rest is estimated."""
        start, known = anchor if anchor is not None and anchor[0] <= len(messages) else (0, 0)
        return known + sum(self._message_tokens(m) for m in messages[start:])

    def fit(
        self, system: list[dict[str, Any]], history: list[dict[str, Any]], anchor: tuple[int, int] | None
    ) -> tuple[list[dict[str, Any]], dict[str, int]] | None:
        """Return None when `system + history` fits, else (trimmed history, stats). `anchor` counts over
        `system + history`. Raise ContextWindowExceeded when trimming cannot make it fit."""
        if self.max_prompt_tokens is None:
            return None
        before = self.estimate(system + history, anchor)
        if before <= self.max_prompt_tokens:
            return None
        target = int(self.low_watermark * self.max_prompt_tokens)
        fixed = self.estimate(system)
        tokens = [self._message_tokens(m) for m in history]
        # Scale per-message estimates so that they add up to the anchored total: trimming then removes
        # roughly the right number of real tokens.
        scale = max(before - fixed, 1) / max(sum(tokens), 1)
        total = before
        trimmed = list(history)
        protected = _current_task_start(history)
        unread = _unread_tool_results_start(history)
        elided: list[int] = []
        for i, m in enumerate(history[:unread]):
            if total <= target:
                break
            if m.get("role") == "tool" and not str(m.get("content", "")).startswith(ELISION_PREFIX):
                note = f"{ELISION_PREFIX} an older result of {len(str(m.get('content', '')))} characters]"
                saved = tokens[i] - self._message_tokens({**m, "content": note})
                if saved > 0:  # short results stay: the note would not be shorter
                    trimmed[i] = {**m, "content": note}
                    total -= round(saved * scale)
                    elided.append(i)
        # Then drop whole earlier tasks, oldest first; a task runs from a user message to the next one.
        cut = 0
        while total > target and cut < protected:
            end = cut + 1
            while end < protected and history[end].get("role") != "user":
                end += 1
            total -= round(sum(self._message_tokens(m) for m in trimmed[cut:end]) * scale)
            cut = end
        trimmed = trimmed[cut:]
        if total > self.max_prompt_tokens:
            raise ContextWindowExceeded(
                f"the current task needs about {total} prompt tokens after trimming older history, over "
                f"max_prompt_tokens={self.max_prompt_tokens}"
            )
        stats = {"elided": sum(i >= cut for i in elided), "dropped": cut, "before": before, "after": total}
        return trimmed, stats

    def _message_tokens(self, m: dict[str, Any]) -> int:
        chars = len(str(m.get("content") or "")) + len(str(m.get("reasoning_content") or ""))
        for call in m.get("tool_calls") or ():
            fn = call.get("function", {})
            chars += len(str(fn.get("name", ""))) + len(str(fn.get("arguments", ""))) + 40  # DSML tags
        for t in m.get("tools") or ():
            chars += len(str(t))
        return _MESSAGE_OVERHEAD_TOKENS + round(chars / self.chars_per_token)


def _current_task_start(history: list[dict[str, Any]]) -> int:
    """Index of the last user message (start of the task being worked on); 0 if none."""
    for i in range(len(history) - 1, -1, -1):
        if history[i].get("role") == "user":
            return i
    return 0


def _unread_tool_results_start(history: list[dict[str, Any]]) -> int:
    """Index after the last assistant message: tool results from there on have not been read by the model."""
    for i in range(len(history) - 1, -1, -1):
        if history[i].get("role") == "assistant":
            return i + 1
    return len(history)
