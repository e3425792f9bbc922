"""Fixtures of the agent tests, imported by name into each test module (no conftest.py here: a second
`conftest` module would shadow the root one that other test folders import).

`anyio_backend`: async tests run on asyncio through anyio's pytest plugin (anyio comes with httpx).

`v4_server`: one real `dsv4-agent serve` process with the scripted test model, shared by the end-to-end
tests of this folder (started on first use, with the serve package's own launcher). Set
DSV4_TEST_BASE_URL and DSV4_TEST_SCRIPT to reuse a scripted server that is already running.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
def v4_server_fixture(tmp_path_factory: pytest.TempPathFactory):
    # Developers iterating on these tests can point at a scripted server they already run.
    if os.environ.get("DSV4_TEST_BASE_URL") and os.environ.get("DSV4_TEST_SCRIPT"):
        base = os.environ["DSV4_TEST_BASE_URL"].rstrip("/")
        yield V4Server(base_url=base + "/v1", script=Path(os.environ["DSV4_TEST_SCRIPT"]), model="scripted")
        return
    from dsv4_agent.serve.testing import scripted_server

    server, script = scripted_server(tmp_path_factory.mktemp("agent-v4-server"))
    server.startup_timeout = max(server.startup_timeout, 600.0)  # a first start also trains the tokenizer
    with server:
        yield V4Server(base_url=server.base_url + "/v1", script=script, model=server.model_name())
