"""Triton kernels for the DeepSeek-V4 hot paths, each with its plain PyTorch (fp32) reference.

Every public op dispatches through `use_triton` (env `DSV4_KERNELS` = auto | triton | torch): CUDA
tensors run the Triton kernel, anything else the `*_ref` reference. Layouts are documented in each
module: `sparse_attention` (window rows + paged compressed entries, bf16 or 584-byte FP8 KV),
`indexer` (paged indexer keys, scoring and radix top-k), `compressor` (entry formation with its
partial-state ring), `mhc` (hyper-connection mixing). This package imports only torch and triton.
"""

from .compressor import compress_tokens, compress_tokens_ref
from .dispatch import kernel_mode, use_triton
from .indexer import (
    indexer_scores,
    indexer_scores_ref,
    indexer_topk,
    pack_index_keys_fp8,
    topk_indices,
    topk_indices_ref,
    unpack_index_keys_fp8,
)
from .mhc import hc_post, hc_post_ref, hc_pre, hc_pre_ref, sinkhorn_ref
from .numerics import (  # also the model's numerics (dsv4_agent.model.ops imports them)
    KV_FP8_BYTES,
    apply_rope,
    fp4_fake_quant,
    fp8_fake_quant,
    hadamard_rotate,
    kv_fp8_sim,
    pack_kv_fp8,
    rms_norm,
    unpack_kv_fp8,
)
from .sparse_attention import (
    decode_window_ranges,
    extend_window_ranges,
    sparse_attn,
    sparse_attn_decode,
    sparse_attn_extend,
    sparse_attn_ref,
)

__all__ = [
    "KV_FP8_BYTES",
    "apply_rope",
    "compress_tokens",
    "compress_tokens_ref",
    "decode_window_ranges",
    "extend_window_ranges",
    "fp4_fake_quant",
    "fp8_fake_quant",
    "hadamard_rotate",
    "hc_post",
    "hc_post_ref",
    "hc_pre",
    "hc_pre_ref",
    "indexer_scores",
    "indexer_scores_ref",
    "indexer_topk",
    "kernel_mode",
    "kv_fp8_sim",
    "pack_index_keys_fp8",
    "pack_kv_fp8",
    "rms_norm",
    "sinkhorn_ref",
    "sparse_attn",
    "sparse_attn_decode",
    "sparse_attn_extend",
    "sparse_attn_ref",
    "topk_indices",
    "topk_indices_ref",
    "unpack_index_keys_fp8",
    "unpack_kv_fp8",
    "use_triton",
]
