"""Shared test fixtures: where the ground-truth data lives (`../shared/` beside the project root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ground_truth import SHARED

if not torch.cuda.is_available():
    # The Triton kernels run in Triton's CPU interpreter here. Triton reads this switch when a @triton.jit
    # function is defined, its own tl.* helpers included, so it must be set before anything (SGLang,
    # FlashInfer, our kernels) imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"ground-truth folder not found at {SHARED} (set DSV4_SHARED)")
    return SHARED


# ---- real servers (dsv4_agent.serve.testing): each start costs 15-30 s and ~4 GB, so they are shared --------


@pytest.fixture(scope="session")
def scripted_server(tmp_path_factory):
    """A running `dsv4-agent serve` on the scripted test model, shared by the whole session.

    `scripted_server.script([{"when": "...", "reply": "..."}])` sets what it answers (rules: see
    dsv4_agent/serve/models/scripted.py; without a matching rule it behaves as a seeded random model);
    `.base_url` (add "/v1" for OpenAI clients), `.model` (served name), `.model_dir` (its tokenizer).
    DSV4_SCRIPTED_URL + DSV4_SCRIPTED_DIR reuse a scripted server already running (started with
    `dsv4_agent.serve.testing.ScriptedServer(DIR)`), to iterate on tests without restarts.
    """
    pytest.importorskip("sglang")
    from dsv4_agent.serve.testing import ScriptedServer

    if os.environ.get("DSV4_SCRIPTED_URL"):
        yield ScriptedServer.attach(os.environ["DSV4_SCRIPTED_URL"], os.environ["DSV4_SCRIPTED_DIR"])
        return
    server = ScriptedServer(tmp_path_factory.mktemp("scripted-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server():
    """`dsv4-agent serve` with no arguments: the embedded tiny random DeepSeek-V4 model on our model class."""
    pytest.importorskip("sglang")
    from dsv4_agent.serve.testing import ServerProcess

    server = ServerProcess([]).start()
    yield server
    server.stop()
