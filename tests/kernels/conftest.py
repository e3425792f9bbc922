"""Kernel tests: Triton under the CPU interpreter when no CUDA device is present (small shapes), natively
on a GPU (the `gpu`-marked tests add full V4-Flash shapes there)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE

# TRITON_INTERPRET is set by tests/conftest.py, before anything imports triton.


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def force_triton(monkeypatch):
    """Make the public ops take the Triton path (interpreted on CPU)."""
    monkeypatch.setenv("DSV4_KERNELS", "triton")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
