"""Kernel tests: Triton under the CPU interpreter when no CUDA device is present (small shapes), natively
on a GPU (the `gpu`-marked tests add full V4-Flash shapes there)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before the kernel modules define their @triton.jit functions
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import DEVICE


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
