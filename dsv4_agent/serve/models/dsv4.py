"""DeepSeek-V4 as an SGLang model class (``DSV4AgentForCausalLM``), built on :mod:`dsv4_agent.model`.

The math is :class:`dsv4_agent.model.DeepSeekV4`; this wrapper only translates an SGLang ``ForwardBatch``
into the model's :class:`Step` s (one per request: prefill, chunk or decode, mixed freely) over the pages
of :class:`dsv4_agent.serve.v4pool.V4KVPool` and the request's tail, and returns the last-token logits.

Its linears are SGLang's ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``ReplicatedLinear`` (split as
:class:`dsv4_agent.model.TensorParallel` says) with :class:`StoredWeightMethod`: weights stay as the checkpoint
stores them (FP8 + block scales, packed FP4 + scales, BF16) and each weight loader keeps only this rank's
slice of the tensor SGLang's weight iterator yields, so a rank materialises its shard and nothing more.

Official ``DeepseekV4ForCausalLM`` checkpoints are served by this class when the CLI overrides
``architectures`` (the upstream class needs CUDA-only kernels and switches on V4-specific pools).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from sglang.srt.distributed.communication_op import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from sglang.srt.distributed.utils import get_group_rank_size
from sglang.srt.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool
from sglang.srt.utils import set_weight_attrs
from torch import nn

from dsv4_agent.model import PAGE_SIZE, DeepSeekV4, DeepSeekV4Config, Numerics, SequenceCache, Step, ops
from dsv4_agent.model.checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    check_keys,
    check_tensor,
    expected_tensors,
)
from dsv4_agent.model.config import FP8_WEIGHT_BLOCK
from dsv4_agent.model.model import Split, TensorParallel
from dsv4_agent.serve.v4pool import ARCH, PageView, V4KVPool

log = logging.getLogger(__name__)


def model_dir_of(hf_config) -> Path:
    path = getattr(hf_config, "_name_or_path", None) or getattr(hf_config, "name_or_path", None)
    if not path or not (Path(path) / "config.json").exists():
        raise ValueError(f"{ARCH}: cannot find the checkpoint directory of this config (got {path!r})")
    return Path(path)


@lru_cache(maxsize=8)
def _config_from_file(path: str) -> DeepSeekV4Config:
    hf = json.loads((Path(path) / "config.json").read_text())
    return DeepSeekV4Config.from_hf(hf)


def config_of(hf_config) -> DeepSeekV4Config:
    """Our typed config, read from the checkpoint's own config.json (transformers renames rope keys)."""
    return _config_from_file(str(model_dir_of(hf_config)))


def numerics_for(dtype: torch.dtype) -> Numerics:
    """``--dtype float32``: exact fp32 reference numerics; otherwise the released (bf16, quantized) ones."""
    return Numerics.from_mode("fp32" if dtype == torch.float32 else "quant")


# ---------------------------------------------------------------------------------------------------------
# SGLang parallel linears holding checkpoint-precision weights
# ---------------------------------------------------------------------------------------------------------
def _block_span(start: int, n: int, block: int) -> tuple[int, int]:
    """Scale blocks [first, end) covering elements [start, start + n)."""
    return start // block, -(-(start + n) // block)


def _slice_loader(rows: tuple[int, int],
                  cols: tuple[int, int] | None = None) -> Callable[[nn.Parameter, torch.Tensor], None]:
    """A weight loader keeping ``loaded[rows, cols]`` (this rank's part of the full checkpoint tensor)."""

    def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
        part = loaded[rows[0]:rows[1]] if cols is None else loaded[rows[0]:rows[1], cols[0]:cols[1]]
        if part.shape != param.shape:
            raise CheckpointError(f"shard {list(part.shape)} of a {list(loaded.shape)} tensor does not fit the "
                                  f"parameter {list(param.shape)}")
        param.data.copy_(part)

    return load


class StoredWeightMethod(LinearMethodBase):
    """SGLang linear method for a V4 weight as the checkpoint stores it (``stored``: "fp8" / "fp4" / "bf16",
    see :class:`dsv4_agent.model.model.Linear`), multiplied as ``gemm`` says after an exact dequantization.

    This rank's part of W [out, in] is rows [r0, r0 + rows) x columns [c0, c0 + cols) (column-parallel: rows
    split; row-parallel: columns split). The FP8 scale keeps the 128 x 128 blocks that part touches and the
    layer remembers where the part starts inside its first block (``block_offset``): with split widths that are
    not multiples of 128 (small models; V4-Flash / Pro at TP <= 8 are block-aligned) a block straddles two ranks,
    which SGLang's own ``narrow``-by-shard-size loader cannot express, so the loaders here slice by element.
    """

    def __init__(self, stored: str, gemm: str):
        self.stored, self.gemm = stored, gemm

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        rank, _ = get_group_rank_size(layer.tp_group)
        r0 = rank * rows if rows != output_size else 0
        c0 = rank * cols if cols != input_size else 0
        (w_shape, w_dtype), scale = ops.stored_weight_shapes(rows, cols, self.stored)
        if self.stored == "fp8":
            (b0, b1), (k0, k1) = _block_span(r0, rows, FP8_WEIGHT_BLOCK), _block_span(c0, cols, FP8_WEIGHT_BLOCK)
            w_slice, s_slice = ((r0, r0 + rows), (c0, c0 + cols)), ((b0, b1), (k0, k1))
            scale = ((b1 - b0, k1 - k0), scale[1])
            layer.block_offset = (r0 % FP8_WEIGHT_BLOCK, c0 % FP8_WEIGHT_BLOCK)
        elif self.stored == "fp4":
            if c0 % 2 or cols % 2:
                raise ValueError(f"packed FP4 weights split at an odd column ({c0}, width {cols})")
            k0, k1 = _block_span(c0, cols, ops.FP4_WEIGHT_BLOCK)
            w_slice, s_slice = ((r0, r0 + rows), (c0 // 2, (c0 + cols) // 2)), ((r0, r0 + rows), (k0, k1))
            scale = ((rows, k1 - k0), scale[1])
            layer.block_offset = (0, c0 % ops.FP4_WEIGHT_BLOCK)
        else:
            w_slice, s_slice = ((r0, r0 + rows), (c0, c0 + cols)), None
            layer.block_offset = (0, 0)
        layer.register_parameter("weight", nn.Parameter(torch.zeros(w_shape, dtype=w_dtype), requires_grad=False))
        set_weight_attrs(layer.weight, {"weight_loader": _slice_loader(*w_slice)})
        layer.register_parameter("scale", None)
        if scale is not None:
            layer.scale = nn.Parameter(torch.zeros(scale[0], dtype=scale[1]), requires_grad=False)
            set_weight_attrs(layer.scale, {"weight_loader": _slice_loader(*s_slice)})

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return ops.dequant_weight(layer.weight, layer.scale, self.stored, layer.block_offset)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, *,
              num: Numerics) -> torch.Tensor:
        if bias is not None:
            raise ValueError("DeepSeek-V4 linears have no bias")
        return ops.linear(x, self.dequantize(layer), self.gemm, num)


class StoredWeights(QuantizationConfig):
    """The quantization config handing :class:`StoredWeightMethod` to one SGLang linear."""

    def __init__(self, stored: str, gemm: str):
        super().__init__()
        self.stored, self.gemm = stored, gemm

    def get_name(self) -> str:
        return "dsv4_stored"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StoredWeights:
        return cls(config["stored"], config["gemm"])

    def get_quant_method(self, layer: nn.Module, prefix: str) -> StoredWeightMethod:
        return StoredWeightMethod(self.stored, self.gemm)

    def get_scaled_act_names(self) -> list[str]:
        return []


class _ModelLinear:
    """The model's linear protocol (``layer(x, numerics)``, ``dequantized()``) on an SGLang linear layer."""

    def dequantized(self) -> torch.Tensor:
        return self.quant_method.dequantize(self)

    def forward(self, x: torch.Tensor, num: Numerics) -> torch.Tensor:
        return self.quant_method.apply(self, x, num=num)


class V4ColumnParallelLinear(_ModelLinear, ColumnParallelLinear):
    pass


class V4RowParallelLinear(_ModelLinear, RowParallelLinear):
    pass


class V4ReplicatedLinear(_ModelLinear, ReplicatedLinear):
    pass


class V4ParallelLMHead(ParallelLMHead):
    """The head over SGLang's vocab-parallel layout: this rank's logits, gathered over the ranks and cut to the
    vocabulary (SGLang pads the vocabulary at the end of the last rank's block), as its LogitsProcessor does."""

    def forward(self, x: torch.Tensor, num: Numerics) -> torch.Tensor:
        logits = ops.linear(x, self.weight.float(), "fp32", num)  # bf16 as stored, used in fp32 (spec 7)
        if self.tp_size > 1:
            logits = tensor_model_parallel_all_gather(logits.contiguous(), dim=-1)
        return logits[..., :self.org_vocab_size]


def sglang_linear(in_features: int, out_features: int, stored: str, gemm: str, split: Split,
                  prefix: str) -> nn.Module:
    """The :class:`TensorParallel` linear factory over SGLang's parallel layers."""
    if split == "vocab":
        if (stored, gemm) != ("bf16", "fp32"):
            raise ValueError(f"{prefix}: the vocab-parallel head holds a bf16 weight used in fp32")
        return V4ParallelLMHead(out_features, in_features, params_dtype=torch.bfloat16, prefix=prefix)
    quant = StoredWeights(stored, gemm)
    if split == "column":
        return V4ColumnParallelLinear(in_features, out_features, bias=False, quant_config=quant, prefix=prefix)
    if split == "row":  # partial sums; the model all-reduces (once per MoE layer, not per expert)
        return V4RowParallelLinear(in_features, out_features, bias=False, reduce_results=False, quant_config=quant,
                                   prefix=prefix)
    return V4ReplicatedLinear(in_features, out_features, bias=False, quant_config=quant, prefix=prefix)


def sglang_embedding(vocab_size: int, dim: int) -> nn.Module:
    """The :class:`TensorParallel` embedding factory: SGLang's vocab-parallel embedding, bf16 as stored."""
    return VocabParallelEmbedding(vocab_size, dim, params_dtype=torch.bfloat16)


def _copy_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    param.data.copy_(loaded)  # replicated: whole tensor, cast to the parameter's dtype (bf16 norms -> fp32)


class DSV4AgentForCausalLM(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.quant_config = None  # the linears carry their own method (StoredWeights); SGLang's FP8 one is CUDA-only
        self.cfg = config_of(config)
        self.numerics = numerics_for(torch.get_default_dtype())
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # norms, mHC, sinks: fp32 as the reference holds them
        try:
            tp = TensorParallel(self.tp_size, sglang_linear, sglang_embedding, tensor_model_parallel_all_reduce)
            self.model = DeepSeekV4(self.cfg, tp)
        finally:
            torch.set_default_dtype(prev)
        self.model.eval()
        for block in [*self.model.layers, *self.model.mtp]:  # the sink logits follow their query heads
            n = block.attn.n_heads
            set_weight_attrs(block.attn.attn_sink,
                             {"weight_loader": _slice_loader((self.tp_rank * n, (self.tp_rank + 1) * n))})

    def get_attention_sliding_window_size(self):
        return None  # the window lives in our tails, not in SGLang's SWA pools

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream SGLang's (name, tensor) iterator: each tensor is checked against the config's expected layout
        (errors name the key) and its weight loader keeps this rank's part; every key must come exactly once."""
        expected = expected_tensors(self.cfg)
        dtype_names = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
        targets = dict(self.model.named_parameters())
        targets.update(self.model.named_buffers())  # gate.tid2eid
        seen: set[str] = set()
        for name, loaded in weights:
            check_tensor(expected, name, tuple(loaded.shape), dtype_names.get(loaded.dtype, str(loaded.dtype)))
            if name in seen:
                raise CheckpointError(f"checkpoint has tensor {name!r} twice")
            target = targets[name]
            try:
                getattr(target, "weight_loader", _copy_loader)(target, loaded)
            except CheckpointError as e:
                raise CheckpointError(f"tensor {name!r}: {e}") from None
            seen.add(name)
        check_keys(expected, seen)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch, **kwargs) -> LogitsProcessorOutput:
        if forward_batch.forward_mode.is_idle() or input_ids.numel() == 0:
            return LogitsProcessorOutput(next_token_logits=torch.zeros(0, self.cfg.vocab_size))
        pool = get_token_to_kv_pool()
        if not isinstance(pool, V4KVPool):
            raise RuntimeError(f"{ARCH} needs its own KV pool; load the dsv4_agent SGLang plugin")
        req_to_token = get_req_to_token_pool().req_to_token
        rows = forward_batch.req_pool_indices.tolist()
        if forward_batch.forward_mode.is_decode():
            lengths = [1] * len(rows)
        else:
            lengths = list(forward_batch.extend_seq_lens_cpu)
        input_ids, positions = input_ids.long().cpu(), positions.long().cpu()

        steps, new_pages, offset = [], [], 0
        for row, n in zip(rows, lengths, strict=True):
            start = int(positions[offset])
            table = req_to_token[row]
            first, done = start // PAGE_SIZE, (start + n) // PAGE_SIZE
            pages = (table[0:first * PAGE_SIZE:PAGE_SIZE] // PAGE_SIZE).tolist()
            new_pages += (table[first * PAGE_SIZE:done * PAGE_SIZE:PAGE_SIZE] // PAGE_SIZE).tolist()
            snaps = tuple(sorted(b for b in pool.snapshot_requests.get(row, ()) if start < b <= start + n))
            seq = SequenceCache(None, pages, pool.tail_for(row, start), None)
            steps.append((row, seq, Step(seq, input_ids[offset:offset + n], snapshot_at=snaps)))
            offset += n

        view = PageView(pool, new_pages)
        for _, seq, _ in steps:
            seq.pool = view
        outs = self.model.forward([st for _, _, st in steps], numerics=self.numerics, compute_logits=False)
        view.check_consumed()

        last = torch.stack([out.streams[-1] for out in outs])  # [B, hc, d]
        m = self.model
        logits = m._head(last, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, m.norm, self.numerics)
        for (row, seq, _), out in zip(steps, outs, strict=True):
            pool.tails[row] = seq.tail
            for b, state in out.snapshots.items():
                pool.snapshots.setdefault(row, {})[b] = state.tail
        return LogitsProcessorOutput(next_token_logits=logits.float())


EntryClass = [DSV4AgentForCausalLM]
