"""Helpers shared by the kernel tests."""

from __future__ import annotations

import contextlib

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON_INT = -7777


@contextlib.contextmanager
def poisoned_outputs():
    """Fresh buffers from torch.empty/empty_like start as NaN (floats) or POISON_INT (ints), so an
    output element a kernel forgot to write is visible."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(POISON_INT)
        return t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere in `out` fails loudly."""
    assert not torch.isnan(out.float()).any(), "NaN in kernel output"
    ref64 = ref.double()
    return float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30))


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
