"""Shared test fixtures: where the ground-truth data lives (`../shared/` beside the project root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSV4_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"ground-truth folder not found at {SHARED} (set DSV4_SHARED)")
    return SHARED
