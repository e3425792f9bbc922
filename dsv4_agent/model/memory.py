"""KV-cache memory accounting (spec section 10).

Entries are counted in the packed layout that is lossless w.r.t. the reference values (spec 7): an
attention vector (window vector or main compressed entry) is ``D - r`` e4m3 bytes + ``r`` bf16 rope dims +
one e8m0 scale per 64 non-rope dims, padded to a multiple of 8 bytes (V4: 448 + 128 + 7 + 1 = 584 B); an
indexer key is ``D_I / 2`` bytes of packed e2m1 + one e8m0 scale per 32 dims (V4: 64 + 4 = 68 B).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DeepSeekV4Config


def attention_entry_bytes(cfg: DeepSeekV4Config) -> int:
    nope, rope = cfg.nope_head_dim, cfg.qk_rope_head_dim
    raw = nope + 2 * rope + nope // 64
    return -(-raw // 8) * 8


def indexer_key_bytes(cfg: DeepSeekV4Config) -> int:
    return cfg.index_head_dim // 2 + cfg.index_head_dim // 32


@dataclass(frozen=True)
class KVCacheBytes:
    """Bytes of one sequence's attention state at ``context_len`` tokens (main layers; MTP not counted)."""

    context_len: int
    csa_main: int
    csa_indexer: int
    hca: int
    window: int  # every layer's 128-vector ring (constant per sequence)
    compressor_state_fp32: int  # partial compressor state in the reference's fp32 layout (constant)

    @property
    def total(self) -> int:
        """Entries + windows (spec 10's total; the fp32 compressor state comes on top)."""
        return self.csa_main + self.csa_indexer + self.hca + self.window


def kv_cache_bytes(cfg: DeepSeekV4Config, context_len: int) -> KVCacheBytes:
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    E, I = attention_entry_bytes(cfg), indexer_key_bytes(cfg)
    D, DI = cfg.head_dim, cfg.index_head_dim
    csa_main = csa_idx = hca = state = 0
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        if m == 4:
            csa_main += (context_len // 4) * E
            csa_idx += (context_len // 4) * I
            state += 2 * (8 * 2 * D) * 4 + 2 * (8 * 2 * DI) * 4  # kv + score rows, main and indexer
        elif m:
            hca += (context_len // m) * E
            state += 2 * (m * D) * 4
    window = cfg.n_layers * min(context_len, cfg.sliding_window) * E
    return KVCacheBytes(context_len, csa_main, csa_idx, hca, window, state)


def kv_bytes_per_token(cfg: DeepSeekV4Config, context_len: int) -> float:
    """Average KV bytes per token of a sequence of ``context_len`` tokens (entries + windows, spec 10):
    V4-Flash at 1,048,576 tokens: 3,688,172,544 B in total, 3517.3 B/token."""
    if context_len <= 0:
        raise ValueError(f"context_len must be positive, got {context_len}")
    return kv_cache_bytes(cfg, context_len).total / context_len


def marginal_kv_bytes_per_token(cfg: DeepSeekV4Config) -> float:
    """Bytes added per token once the windows are full (spec 10: V4-Flash 3514.25, V4-Pro 5031.4375)."""
    E, I = attention_entry_bytes(cfg), indexer_key_bytes(cfg)
    total = 0.0
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        if m == 4:
            total += (E + I) / 4
        elif m:
            total += E / m
    return total
