"""One switch deciding between the Triton kernels and the PyTorch references.

`DSV4_KERNELS` = `auto` (default: Triton when every tensor argument is on CUDA and Triton imports),
`triton` (always Triton; on CPU this needs `TRITON_INTERPRET=1`) or `torch` (always the reference).
"""

from __future__ import annotations

import functools
import os

import torch

_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("DSV4_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"DSV4_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the op on these tensors should run the Triton kernel."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return triton_available() and all(t.is_cuda for t in tensors if t is not None)
