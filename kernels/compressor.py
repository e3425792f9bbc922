"""KV compressor entry formation, fused with the entry's post-processing (spec §4.4, §9).

Inputs are the compressor projections of the new tokens (GEMMs stay outside): `kv = wkv . x`
[N, kc] and the raw gate logits `score = wgate . x` [N, kc] (without `ape`), packed over sequences by
`cu_seqlens`; sequence b's new tokens have positions `start_pos[b] ..`. With ratio m (4 = CSA with
overlap, kappa = 2; otherwise kappa = 1) and width c = kc / kappa, entry i pools per channel j

    C_i[j] = sum_cand softmax_cand(S_cand[j]) K_cand[j]

over the B halves of block i's m tokens and (overlap only) the A halves of block i-1's tokens
(S includes `ape[t mod m]`). Post-processing: bf16, RMSNorm(`norm_weight`), RoPE at position m*i on the
last rope_dim = 2 * len(inv_freq) dims (64 in V4), then either FP8 fake quantization of the first
c - rope_dim dims (main compressor) or a Hadamard rotation + FP4 fake quantization (indexer compressor,
`indexer=True`). These are the steps of the model's compressor in its released precision.

Partial state (per request slot, fp32): `state_kv`, `state_score` [R, kappa*m, kc]; token t lives in
row `t mod (kappa*m)` with its score already including `ape`. It must hold the tokens before
`start_pos` (the previous block too, for overlap); the call appends the new ones.

Output: every entry completed by the new tokens (i in [start // m, (start + len) // m)) is written to
the pool `out` at logical index i through `page_table` (same paging as `sparse_attention`):
bf16 [pages, page_size, c], or for c = 512 main entries the FP8 layout uint8 [pages, page_size, 584].
"""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .numerics import (
    KV_FP8_BYTES,
    ROPE_DIM,
    apply_rope,
    fp4_fake_quant,
    hadamard_rotate,
    kv_fp8_sim,
    pack_kv_fp8,
    rms_norm,
)


def _postprocess_ref(c: torch.Tensor, positions: torch.Tensor, norm_weight, inv_freq, indexer: bool, eps: float):
    """bf16 -> RMSNorm -> RoPE at `positions` -> FP8 (main) or Hadamard + FP4 (indexer). c: [n, c] fp32."""
    y = apply_rope(rms_norm(c.to(torch.bfloat16), norm_weight, eps), positions, inv_freq)
    if indexer:
        return fp4_fake_quant(hadamard_rotate(y))
    return kv_fp8_sim(y, 2 * inv_freq.numel())


def _check(kv, score, ape, norm_weight, inv_freq, cu_seqlens, start_pos, state_kv, state_score, state_slot, out,
           page_table, ratio) -> tuple[int, int]:
    kappa = 2 if ratio == 4 else 1
    if kv.dim() != 2 or score.shape != kv.shape:
        raise ValueError(f"kv/score: expected equal [tokens, kc], got {tuple(kv.shape)}, {tuple(score.shape)}")
    kc = kv.shape[1]
    c = kc // kappa
    if ape.shape != (ratio, kc):
        raise ValueError(f"ape: expected [{ratio}, {kc}], got {tuple(ape.shape)}")
    if norm_weight.shape != (c,):
        raise ValueError(f"norm_weight: expected [{c}], got {tuple(norm_weight.shape)}")
    rope = 2 * inv_freq.numel()
    if inv_freq.dim() != 1 or rope > c or (out.dtype == torch.uint8 and rope != ROPE_DIM):
        raise ValueError(f"inv_freq: expected [rope_dim / 2] with rope_dim <= {c} ({ROPE_DIM} for the FP8 layout), "
                         f"got {tuple(inv_freq.shape)}")
    b = start_pos.shape[0]
    if cu_seqlens.shape != (b + 1,) or state_slot.shape != (b,) or page_table.shape[0] < b:
        raise ValueError("cu_seqlens/state_slot/page_table: expected [B+1], [B], [>= B, pages] for B = len(start_pos)")
    for name, st in (("state_kv", state_kv), ("state_score", state_score)):
        if st.dim() != 3 or st.shape[1:] != (kappa * ratio, kc) or st.dtype != torch.float32:
            raise ValueError(f"{name}: expected fp32 [slots, {kappa * ratio}, {kc}], got {st.dtype} {tuple(st.shape)}")
    width = KV_FP8_BYTES if out.dtype == torch.uint8 else c
    if out.dim() != 3 or out.shape[2] != width or (out.dtype == torch.uint8 and c != 512):
        raise ValueError(f"out: expected [pages, page_size, {width}] (FP8 layout only for c = 512), got {tuple(out.shape)}")
    return kappa, c


def compress_tokens_ref(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    cu_seqlens: torch.Tensor,
    start_pos: torch.Tensor,
    state_kv: torch.Tensor,
    state_score: torch.Tensor,
    state_slot: torch.Tensor,
    out: torch.Tensor,
    page_table: torch.Tensor,
    ratio: int,
    indexer: bool = False,
    eps: float = 1e-6,
) -> None:
    """fp32 reference of `compress_tokens` (updates `out`, `state_kv`, `state_score` in place)."""
    kappa, c = _check(kv, score, ape, norm_weight, inv_freq, cu_seqlens, start_pos, state_kv, state_score, state_slot, out,
                      page_table, ratio)
    rows = kappa * ratio
    page_size = out.shape[1]
    for b in range(start_pos.shape[0]):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        start, end, slot = int(start_pos[b]), int(start_pos[b]) + hi - lo, int(state_slot[b])
        pos = torch.arange(start, end, device=kv.device)
        new_k = kv[lo:hi].float()
        new_s = score[lo:hi].float() + ape[pos % ratio].float()
        # every token from the ring's oldest up to the last new one, indexed by position - first
        first = max(start - rows, 0)
        old = torch.arange(first, start, device=kv.device)
        all_k = torch.cat([state_kv[slot, old % rows], new_k])
        all_s = torch.cat([state_score[slot, old % rows], new_s])
        for i in range(start // ratio, end // ratio):
            cand_k = [all_k[ratio * i - first : ratio * (i + 1) - first, (kappa - 1) * c :]]
            cand_s = [all_s[ratio * i - first : ratio * (i + 1) - first, (kappa - 1) * c :]]
            if kappa == 2 and i > 0:  # A halves of the previous block
                cand_k.append(all_k[ratio * (i - 1) - first : ratio * i - first, :c])
                cand_s.append(all_s[ratio * (i - 1) - first : ratio * i - first, :c])
            weights = torch.cat(cand_s).softmax(0)
            entry = (weights * torch.cat(cand_k)).sum(0, keepdim=True)
            entry = _postprocess_ref(entry, torch.tensor([ratio * i], device=kv.device), norm_weight, inv_freq,
                                     indexer, eps)
            page = int(page_table[b, i // page_size])
            out[page, i % page_size] = pack_kv_fp8(entry)[0] if out.dtype == torch.uint8 else entry[0].to(out.dtype)
        keep = slice(max(0, hi - lo - rows), hi - lo)
        state_kv[slot, pos[keep] % rows] = new_k[keep]
        state_score[slot, pos[keep] % rows] = new_s[keep]


def compress_tokens(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    cu_seqlens: torch.Tensor,
    start_pos: torch.Tensor,
    state_kv: torch.Tensor,
    state_score: torch.Tensor,
    state_slot: torch.Tensor,
    out: torch.Tensor,
    page_table: torch.Tensor,
    ratio: int,
    indexer: bool = False,
    eps: float = 1e-6,
    max_seqlen: int | None = None,
) -> None:
    """Form the entries completed by the new tokens and append the tokens to the partial state.

    Bulk (prefill: many tokens per sequence) and incremental (decode: `cu_seqlens = arange(B+1)`,
    `start_pos` = positions) use the same call. `max_seqlen` (longest new-token run, a host int)
    sizes the Triton grid without a device sync; inv_freq [32] fp32 is the layer's RoPE table.
    """
    _check(kv, score, ape, norm_weight, inv_freq, cu_seqlens, start_pos, state_kv, state_score, state_slot, out, page_table,
           ratio)
    if use_triton(kv, state_kv, out):
        from .triton_compressor import compress_tokens_triton

        compress_tokens_triton(kv, score, ape, norm_weight, inv_freq, cu_seqlens, start_pos, state_kv, state_score,
                               state_slot, out, page_table, ratio, indexer, eps, max_seqlen)
    else:
        compress_tokens_ref(kv, score, ape, norm_weight, inv_freq, cu_seqlens, start_pos, state_kv, state_score,
                            state_slot, out, page_table, ratio, indexer, eps)
