"""Pure-torch stand-in for `sgl_kernel` (the `sglang-kernel` wheel), for CPU-only hosts.

The wheel on PyPI is a CUDA build: importing it needs `libcuda.so.1`, and SGLang 0.5.23 imports it
unconditionally once `SGLANG_USE_CPU_ENGINE=1` selects the CPU code paths. `dsv4-agent serve` puts the
directory above this package first on the server's PYTHONPATH (server process only, CPU only), so this
module shadows the wheel.

Only one kernel is actually called on a CPU without AMX (`assign_req_to_token_pool_cpu`); it is written
here in torch. Every other name resolves to a function that raises, so imports succeed and an unexpected
call fails loudly, naming the symbol. Tied to sglang==0.5.23.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__version__ = "0.0.0+dsv4agent.cpu"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,  # [bs] rows of req_to_token
    req_to_token: torch.Tensor,  # [pool_rows, max_context] KV slot of each token position
    start_offset: torch.Tensor,  # [bs] first position to fill
    end_offset: torch.Tensor,  # [bs] one past the last position to fill
    out_cache_loc: torch.Tensor,  # [sum(end - start)] newly allocated KV slots, request after request
    pool_len: int,  # row length of req_to_token (unused: slicing is bounds-checked by torch)
) -> None:
    """Write the new KV slots of each request into its row: req_to_token[r, start:end] = next slots."""
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    taken = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[taken : taken + n].to(req_to_token.dtype)
        taken += n


def __getattr__(name: str) -> Callable[..., None]:
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available in the dsv4-agent CPU stand-in (sglang 0.5.23 on CPU)"
        )

    missing.__name__ = name
    return missing
