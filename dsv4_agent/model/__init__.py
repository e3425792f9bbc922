"""DeepSeek-V4 in PyTorch: config, official checkpoint loading, the forward pass and its paged cache.

Public API: :func:`reference_logits` (conformance entry point), :class:`DeepSeekV4Config` /
:func:`load_config`, :func:`load_model` / :func:`save_random_checkpoint`, the cache types
(:class:`PagePool`, :class:`SequenceCache`, :class:`ResumeState`, :class:`TailState`), :class:`Step`,
:func:`kv_bytes_per_token`. The functional ops live in :mod:`dsv4_agent.model.ops`.
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
