"""Literal strings of the DeepSeek-V4 chat format (spec sections 1, 7, 8).

Every marker below is a single token of the V4 tokenizer. `｜` is U+FF5C, `▁` is U+2581; the ASCII
look-alikes are different strings (the lenient parser still recognises `|DSML|`, see parser.py).
"""

from __future__ import annotations

import json
from typing import Any

THINKING_MODES = ("chat", "thinking")  # Non-think; Think High / Think Max (with reasoning_effort)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
REMINDER = "<｜latest_reminder｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DSML = "｜DSML｜"

TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
EXTRACTED_URL = "<｜extracted_url｜>"

# Every string the tokenizer maps to one control token. Injection safety (encoder.encode_segments)
# hinges on this list: text from messages is tokenized with none of these recognised.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, USER, ASSISTANT, REMINDER, THINK_OPEN, THINK_CLOSE, DSML, EXTRACTED_URL, *TASK_TOKENS.values(),
)

# DSML tags as the encoder writes them.
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter>"
# The reference recognises a tool block only with exactly this lead-in (a blank line before the tag).
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"

TOOLS_PREAMBLE = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    f'writing a "<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_OPEN}), you MUST output your complete reasoning inside "
    f"{THINK_OPEN}...{THINK_CLOSE} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_CLOSE} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_TRAILER = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

EFFORT_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)


def to_json(value: Any) -> str:
    """The one JSON serialisation of the format (spec 7.2): `json.dumps` defaults, non-ASCII written raw."""
    return json.dumps(value, ensure_ascii=False)
