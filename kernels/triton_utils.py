"""Small pieces shared by the Triton kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter multiplies bf16 tiles as their raw 16-bit patterns in `tl.dot`; under it
# the kernels upcast dot operands to fp32 first (same math, exact products).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def dot(a, b, INTERPRET: tl.constexpr):
    """`a @ b` with fp32 accumulation."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def round_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32. Used instead of `.to(tl.bfloat16)` for
    intermediate roundings because the CPU interpreter's conversion does not round to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    """A CUDA device's index (plain `cuda` is the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (`launch_pdl`, griddepcontrol): a CUDA device of compute capability 9+."""
    return device.type == "cuda" and not INTERPRET and _capability(_index(device)) >= 9


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 elsewhere: the interpreter only needs a plausible grid)."""
    return _sm_count(_index(device)) if device.type == "cuda" else 4


@triton.jit
def arrive(counter_ptr):
    """Count this program in at `counter_ptr` after all its stores; returns the count before (its ticket: the
    program that gets n - 1 of n arrives last and, through the acq_rel, sees every other program's stores).
    A scalar atomic is issued by one thread, so its release covers only that thread's stores: the barrier
    orders every thread's first."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")


# per device: int32 workspaces at zero between launches (each kernel using one zeroes what it used)
_WORKSPACES: dict[torch.device, list[torch.Tensor]] = {}


def zeroed_workspace(device: torch.device, n: int) -> torch.Tensor:
    """n int32 words at zero for kernels that leave them at zero, so a launch (or a CUDA graph replay) needs
    no memset: persistent per device, so launches sharing it must not overlap (one stream per device). While
    a CUDA graph is being captured before the device's first large-enough workspace exists, a fresh zeroed
    one (its zero fill is captured)."""
    if device.type == "cuda":
        device = torch.device("cuda", _index(device))
    kept = _WORKSPACES.setdefault(device, [])
    if not kept or kept[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, device=device, dtype=torch.int32)
        # older workspaces stay alive: graphs captured with them keep replaying
        kept.append(torch.zeros(max(n, 1 << 16, 2 * kept[-1].numel() if kept else 0), device=device,
                                dtype=torch.int32))
    return kept[-1][:n]
