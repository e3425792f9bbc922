"""DeepSeek-V4 as an SGLang model class (``DSV4AgentForCausalLM``), built on :mod:`dsv4_agent.model`.

The math is :class:`dsv4_agent.model.DeepSeekV4`; this wrapper only translates an SGLang ``ForwardBatch``
into the model's :class:`Step` s (one per request: prefill, chunk or decode, mixed freely) over the pages
of :class:`dsv4_agent.serve.v4pool.V4KVPool` and the request's tail, and returns the last-token logits.

Official ``DeepseekV4ForCausalLM`` checkpoints are served by this class when the CLI overrides
``architectures`` (the upstream class needs CUDA-only kernels and switches on V4-specific pools).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool
from torch import nn

from dsv4_agent.model import PAGE_SIZE, DeepSeekV4, DeepSeekV4Config, Numerics, SequenceCache, Step
from dsv4_agent.model.checkpoint import load_state_dict
from dsv4_agent.serve.tp import shard_model
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


class DSV4AgentForCausalLM(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.quant_config = None  # weights are dequantized by our loader; SGLang's FP8 methods do not apply
        self.cfg = config_of(config)
        self.numerics = numerics_for(torch.get_default_dtype())
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # the model holds dequantized weights in fp32
        try:
            self.model = DeepSeekV4(self.cfg)
        finally:
            torch.set_default_dtype(prev)
        self.model.eval()

    def get_attention_sliding_window_size(self):
        return None  # the window lives in our tails, not in SGLang's SWA pools

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # SGLang's iterator yields the raw FP8/FP4 tensors; our loader validates the whole checkpoint and
        # dequantizes weight + scale pairs, so it reads the directory itself (the lazy iterator is unused).
        state = load_state_dict(model_dir_of(self.config), self.cfg)
        self.model.load_state_dict(state, strict=True)
        if self.tp_size > 1:
            shard_model(self.model, self.tp_rank, self.tp_size)

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
