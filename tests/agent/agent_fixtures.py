"""Fixtures of the agent tests, imported by name into each test module (no conftest.py here: a second
`conftest` module would shadow the root one that other test folders import).

`anyio_backend`: async tests run on asyncio through anyio's pytest plugin (anyio comes with httpx).

`v4_server`: the real `dsv4-agent serve` process with the scripted test model that the whole session
shares (the root `scripted_server` fixture), seen as an OpenAI base URL plus the script to write rules to.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


EOS = "<｜end▁of▁sentence｜>"


@dataclasses.dataclass
class V4Server:
    base_url: str  # with /v1
    script: Path
    model: str

    def script_rules(self, *rules: dict[str, str]) -> None:
        """Replace the scripted model's rules (first match wins; see dsv4_agent/serve/models/scripted.py)."""
        from dsv4_agent.serve.testing import write_script

        write_script(self.script, list(rules))


def completion_text(
    reasoning: str = "", content: str = "", calls: list[tuple[str, dict[str, Any]]] = ()
) -> str:
    """The raw text a V4 model writes in thinking mode for this turn (what the scripted model replays)."""
    from dsv4_agent.encoding import render_assistant

    tool_calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for i, (name, args) in enumerate(calls)
    ]
    message = {
        "role": "assistant",
        "reasoning_content": reasoning,
        "content": content,
        "tool_calls": tool_calls,
    }
    text = render_assistant(message, "thinking")
    assert text.endswith(EOS)
    return text[: -len(EOS)]


@pytest.fixture(scope="session", name="v4_server")
def v4_server_fixture(scripted_server) -> V4Server:
    """The session's shared scripted server (tests/conftest.py `scripted_server`; set DSV4_SCRIPTED_URL and
    DSV4_SCRIPTED_DIR there to reuse one that is already running)."""
    return V4Server(
        base_url=scripted_server.base_url + "/v1",
        script=scripted_server.script_path,
        model=scripted_server.model,
    )
