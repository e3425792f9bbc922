"""DeepSeek-V4 in PyTorch: config, official checkpoint loading, the forward pass and its paged cache.

* :func:`reference_logits` - the documented entry point for conformance checks (modes fp32 / fp32_sim /
  quant / mtp, optional prefill + decode split, per-layer hidden states).
* :class:`DeepSeekV4Config` (``from_hf`` / ``from_file`` / ``to_hf``), :func:`load_config`, :func:`tiny_config`.
* :func:`load_model` / :func:`load_state_dict` (official safetensors format, validated, as stored, with
  progress), :func:`save_random_checkpoint` (seeded random weights written in the released format),
  :func:`expected_tensors`.
* :class:`DeepSeekV4` with :meth:`~DeepSeekV4.forward` over :class:`Step` s (mixed prefills / decodes),
  :meth:`~DeepSeekV4.forward_mtp`, :meth:`~DeepSeekV4.head_logits`. Linear weights stay in checkpoint
  precision (FP8 / FP4 / BF16 + scales, dequantized at use); ``DeepSeekV4(cfg, tp)`` takes a
  :class:`~dsv4_agent.model.model.TensorParallel` (linear factory + all-reduce) for an engine's parallel layers.
* The cache (see :mod:`dsv4_agent.model.cache`): :class:`PagePool`, :class:`SequenceCache`,
  :class:`ResumeState`, :class:`TailState`, :class:`LayerTail`, ``PAGE_SIZE``.
* :func:`kv_bytes_per_token`, :func:`kv_cache_bytes`, :func:`marginal_kv_bytes_per_token` (spec section 10).
* :mod:`dsv4_agent.model.ops` - the functional pieces (quantizers, RoPE, mHC, compressor, indexer, sparse
  attention, routing) with documented shapes; :class:`Numerics` selects the rounding mode.
"""

from .cache import PAGE_SIZE, LayerTail, PagePool, ResumeState, SequenceCache, TailState
from .checkpoint import (
    CheckpointError,
    LoadProgress,
    expected_tensors,
    load_model,
    load_state_dict,
    save_random_checkpoint,
)
from .config import ConfigError, DeepSeekV4Config, load_config, tiny_config
from .memory import KVCacheBytes, kv_bytes_per_token, kv_cache_bytes, marginal_kv_bytes_per_token
from .model import DeepSeekV4, Step, StepOutput
from .ops import Numerics
from .reference import reference_logits

__all__ = [
    "PAGE_SIZE", "CheckpointError", "ConfigError", "DeepSeekV4", "DeepSeekV4Config", "KVCacheBytes",
    "LayerTail", "LoadProgress", "Numerics", "PagePool", "ResumeState", "SequenceCache", "Step", "StepOutput",
    "TailState", "expected_tensors", "kv_bytes_per_token", "kv_cache_bytes", "load_config", "load_model",
    "load_state_dict", "marginal_kv_bytes_per_token", "reference_logits", "save_random_checkpoint", "tiny_config",
]
