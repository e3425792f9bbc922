"""ContextPolicy: trims in whole blocks, oldest first, down to the low watermark, never the current task."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_agent.agent import ContextPolicy, ContextWindowExceeded
from dsv4_agent.agent.context import ELISION_PREFIX

SYSTEM = [{"role": "system", "content": "s"}]


def task(n: int, calls: int, result_chars: int) -> list[dict]:
    msgs: list[dict] = [{"role": "user", "content": f"task {n}"}]
    for c in range(calls):
        cid = f"t{n}c{c}"
        msgs.append(
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "r" * 30,
                "tool_calls": [{"id": cid, "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            }
        )
        msgs.append({"role": "tool", "tool_call_id": cid, "content": "x" * result_chars})
    msgs.append({"role": "assistant", "content": f"answer {n}", "reasoning_content": "r"})
    return msgs


def test_fitting_history_is_left_alone():
    policy = ContextPolicy(max_prompt_tokens=10_000)
    assert policy.fit(SYSTEM, task(0, 3, 300), None) is None
    assert ContextPolicy().fit(SYSTEM, task(0, 50, 30_000), None) is None  # no limit set


def test_elides_oldest_tool_results_first_down_to_the_low_watermark():
    history = task(0, 2, 3000) + task(1, 2, 3000) + [{"role": "user", "content": "now"}]
    policy = ContextPolicy(max_prompt_tokens=3000, low_watermark=0.5)
    trimmed, stats = policy.fit(SYSTEM, history, None)
    assert stats["dropped"] == 0 and stats["elided"] == 3
    assert stats["after"] <= 1500 < 3000 < stats["before"]
    elided = [i for i, m in enumerate(trimmed) if str(m.get("content")).startswith(ELISION_PREFIX)]
    tools = [i for i, m in enumerate(history) if m["role"] == "tool"]
    assert elided == tools[:3]  # the three oldest
    assert all(
        t["tool_call_id"] == h["tool_call_id"]
        for t, h in zip(trimmed, history, strict=True)
        if h["role"] == "tool"
    )
    assert [m["role"] for m in trimmed] == [m["role"] for m in history]  # structure kept
    assert trimmed[-1] == history[-1]
    # The result is stable: fitting again changes nothing (the next turns are append-only).
    assert policy.fit(SYSTEM, trimmed, None) is None


def test_unread_tool_results_are_never_elided():
    history = task(0, 1, 30) + [{"role": "user", "content": "go"}] + task(1, 1, 12_000)[1:-1]
    with pytest.raises(ContextWindowExceeded, match="current task"):
        ContextPolicy(max_prompt_tokens=2000).fit(SYSTEM, history, None)


def test_drops_whole_earlier_tasks_when_elision_is_not_enough():
    history = task(0, 1, 10) + task(1, 0, 0) + [{"role": "user", "content": "q" * 9000}]
    policy = ContextPolicy(max_prompt_tokens=3050, low_watermark=0.99)
    trimmed, stats = policy.fit(SYSTEM, history, None)
    assert stats["dropped"] == len(task(0, 1, 10)) + len(task(1, 0, 0)) and stats["elided"] == 0
    assert trimmed == history[-1:]
    assert trimmed[0]["role"] == "user"


def test_anchor_counts_server_tokens():
    history = task(0, 1, 30) + [{"role": "user", "content": "more"}]
    policy = ContextPolicy(max_prompt_tokens=1000, low_watermark=0.5)
    estimate = policy.estimate(SYSTEM + history)
    assert policy.estimate(SYSTEM + history, (len(SYSTEM) + len(history) - 1, 5000)) > 5000 > estimate
    assert policy.fit(SYSTEM, history, None) is None
    # The server says the covered history is much larger than estimated: the earlier task goes.
    trimmed, stats = policy.fit(SYSTEM, history, (len(SYSTEM) + len(history) - 1, 5000))
    assert stats["before"] > 5000 and stats["dropped"] == len(history) - 1 and trimmed == history[-1:]


def test_bad_settings():
    with pytest.raises(ValueError, match="low_watermark"):
        ContextPolicy(low_watermark=0)
    with pytest.raises(ValueError, match="chars_per_token"):
        ContextPolicy(chars_per_token=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4000)), min_size=1, max_size=6),
    st.integers(500, 6000),
    st.floats(0.2, 1.0),
)
def test_trim_invariants(tasks, budget, low):
    history = [m for n, (calls, chars) in enumerate(tasks) for m in task(n, calls, chars)]
    history.append({"role": "user", "content": "current"})
    policy = ContextPolicy(max_prompt_tokens=budget, low_watermark=low)
    try:
        fitted = policy.fit(SYSTEM, history, None)
    except ContextWindowExceeded:
        return
    if fitted is None:
        assert policy.estimate(SYSTEM + history) <= budget
        return
    trimmed, stats = fitted
    assert trimmed[-1] == history[-1] and trimmed[0]["role"] == "user"
    kept = history[stats["dropped"] :]
    assert len(trimmed) == len(kept)
    for new, old in zip(trimmed, kept, strict=True):
        assert new == old or (old["role"] == "tool" and new["content"].startswith(ELISION_PREFIX))
    # Every kept tool call still has its result, and the estimate honours the budget.
    calls = {c["id"] for m in trimmed for c in m.get("tool_calls") or ()}
    assert calls == {m["tool_call_id"] for m in trimmed if m["role"] == "tool"}
    assert policy.estimate(SYSTEM + trimmed) <= budget
