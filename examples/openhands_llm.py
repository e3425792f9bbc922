"""OpenHands SDK `LLM` settings for a DeepSeek-V4 server (`dsv4-agent serve`).

    pip install openhands-sdk        # Python >= 3.12
    python examples/openhands_llm.py

Why these values:
* `model="openai/<served name>"` + `base_url`: litellm's OpenAI-compatible route to our server.
* `model_canonical_name="deepseek/deepseek-v4-flash"`: OpenHands sends `reasoning_content` back only for
  models on its list (deepseek/deepseek-v4-*, ...); the served name does not match, the canonical name
  does. Without it the server restores the reasoning of tool-call turns itself (by tool_call_id).
* `litellm_extra_body={"thinking": {"type": "enabled"}}`: DeepSeek's thinking switch. litellm drops
  `reasoning_effort` on the `openai/` route (OpenHands sets drop_params), so the effort goes in the body.
* `native_tool_calling=True`: V4 has native tool calls (the server parses DSML into `tool_calls`).
* temperature/top_p 1.0: V4's recommended sampling.
"""

from __future__ import annotations

import os

from openhands.sdk import LLM
from pydantic import SecretStr

BASE_URL = os.environ.get("DSV4_BASE_URL", "http://127.0.0.1:30000/v1")
SERVED = os.environ.get("DSV4_MODEL", "deepseek-v4")

llm = LLM(
    model=f"openai/{SERVED}",
    base_url=BASE_URL,
    api_key=SecretStr(os.environ.get("DSV4_API_KEY", "EMPTY")),
    model_canonical_name="deepseek/deepseek-v4-flash",
    native_tool_calling=True,
    temperature=1.0,
    top_p=1.0,
    litellm_extra_body={"thinking": {"type": "enabled"}, "reasoning_effort": "high"},
)

if __name__ == "__main__":
    from openhands.sdk import Message, TextContent

    reply = llm.completion([Message(role="user", content=[TextContent(text="Say hello in one word.")])])
    print(reply.message)
