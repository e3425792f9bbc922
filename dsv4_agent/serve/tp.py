"""Tensor parallelism for :class:`dsv4_agent.model.DeepSeekV4`, sharded the way SGLang shards DeepSeek.

Per rank ``r`` of ``n`` (the Megatron pattern SGLang's Column/RowParallelLinear implement):

* attention: query heads split in contiguous blocks (``wq_b`` rows, ``attn_sink``); the output groups
  follow their heads (``wo_a`` rows of the rank's groups, ``o_groups / n`` per rank); ``wo_b`` is
  row-parallel (its input columns split) and its partial outputs are all-reduced. The single shared KV
  vector, the compressors and the indexer are computed redundantly on every rank (MQA: one KV head), so
  every rank's pool holds the full compressed entries, like SGLang's MLA pools under TP;
* MoE: every expert's (and the shared expert's) intermediate dim is split (``w1``/``w3`` rows, ``w2``
  columns); the routed + shared sum is all-reduced once per layer;
* embedding, head, norms, mHC and the gate are replicated.

Requires ``n_heads``, ``o_groups`` and the intermediate width divisible by ``n``. With released-precision
numerics the activation quantization blocks (128) of the split linears must not straddle ranks, so the
split widths must stay multiples of 128 (true for V4-Flash/Pro at TP <= 8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv4_agent.model import DeepSeekV4


class AllReduced(nn.Module):
    """Runs ``inner`` and sums its (partial) output over the tensor-parallel ranks."""

    def __init__(self, inner: nn.Module, all_reduce: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner = inner
        self.all_reduce = all_reduce

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.all_reduce(self.inner(*args, **kwargs))


def _rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[0] // size
    return t[rank * n:(rank + 1) * n].clone()


def _cols(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[1] // size
    return t[:, rank * n:(rank + 1) * n].clone()


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value


def _sglang_all_reduce(x: torch.Tensor) -> torch.Tensor:
    from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x)


def shard_model(model: DeepSeekV4, rank: int, size: int,
                all_reduce: Callable[[torch.Tensor], torch.Tensor] = _sglang_all_reduce) -> DeepSeekV4:
    """Keep this rank's shard of a fully loaded model, in place (see the module docstring)."""
    cfg = model.config
    for name, value in (("num_attention_heads", cfg.num_attention_heads), ("o_groups", cfg.o_groups),
                        ("moe_intermediate_size", cfg.moe_intermediate_size)):
        if value % size:
            raise ValueError(f"tensor parallel size {size} does not divide {name} = {value}")
    for block in [*model.layers, *model.mtp]:
        attn = block.attn
        D = attn.head_dim
        _set(attn.wq_b.weight, _rows(attn.wq_b.weight.view(attn.n_heads, D, -1), rank, size).flatten(0, 1))
        _set(attn.attn_sink, _rows(attn.attn_sink, rank, size))
        _set(attn.wo_a.weight, _rows(attn.wo_a.weight.view(attn.n_groups, attn.o_rank, -1), rank, size)
             .flatten(0, 1))
        _set(attn.wo_b.weight, _cols(attn.wo_b.weight, rank, size))
        attn.n_heads //= size
        attn.n_groups //= size
        attn.wo_b = AllReduced(attn.wo_b, all_reduce)
        for expert in [*block.ffn.experts, block.ffn.shared_experts]:
            _set(expert.w1.weight, _rows(expert.w1.weight, rank, size))
            _set(expert.w3.weight, _rows(expert.w3.weight, rank, size))
            _set(expert.w2.weight, _cols(expert.w2.weight, rank, size))
        block.ffn = AllReduced(block.ffn, all_reduce)
    return model
