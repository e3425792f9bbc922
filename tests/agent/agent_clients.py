"""Separate virtual environments for agent clients whose pins clash with the server's (openai-agents needs
openai>=3; sglang pins openai==2.8.0). A client talks HTTP to the server, so it can live in its own venv,
as it would in real use. Venvs are cached under .cache/agent-clients/ (git-ignored) and rebuilt when the
requirement list changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "agent-clients"


def client_python(name: str, requirements: list[str]) -> Path:
    """The python of a venv holding `requirements` (created on first use; about 30 s)."""
    venv = CACHE / name
    python = venv / "bin" / "python"
    stamp = venv / "requirements.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == requirements:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(
            f"could not install {requirements} into a client venv (no package index?): {proc.stderr[-500:]}"
        )
    stamp.write_text(json.dumps(requirements))
    return python
