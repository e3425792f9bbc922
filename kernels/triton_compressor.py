"""Triton kernels for `compressor.compress_tokens` (semantics and layouts there).

`_compress_entry_kernel`: one program = one entry to form (or one of SPLIT channel slices of it, when
there are too few entries to fill the GPU): streams its kappa*m candidate rows in tiles of ROWS (from
the new tokens or, for earlier positions, the partial-state ring), keeps a per-channel online softmax,
then does bf16 rounding, RMSNorm, RoPE and the FP8 or Hadamard+FP4 quantization in registers and writes
the entry through the page table. With SPLIT > 1 each slice stores its pooled channels to a workspace
and the slice that finishes last post-processes the whole entry.
`_state_append_kernel`: copies the last kappa*m new tokens (score + ape) into the ring; it runs after
the entries so that rows still needed by them are not overwritten first.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .numerics import FP4_BLOCK, FP8_BLOCK, KV_FP8_ROPE_OFFSET, KV_FP8_SCALE_OFFSET, hadamard_matrix
from .triton_utils import INTERPRET, arrive, dot, num_sms, round_bf16


@triton.jit
def _rne(x):
    """Round to nearest integer, ties to even (|x| < 2**22): the fp32 add/sub of 1.5 * 2**23 trick."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _pow2_ceil(x):
    """(2**ceil(log2 x), its unbiased exponent) for positive normal fp32 x, from the bit pattern."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (e << 23).to(tl.float32, bitcast=True), e - 127


@triton.jit
def _round_e4m3(v):
    """Round |v| <= 448 onto the float8 e4m3fn grid (ties to even): 3 mantissa bits, min exponent -6."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _rne(v / ulp) * ulp


@triton.jit
def _round_e2m1(v):
    """Round |v| <= 6 onto {0, .5, 1, 1.5, 2, 3, 4, 6} (ties to the even code)."""
    a = tl.abs(v)
    r = tl.where(a < 2.0, _rne(a * 2.0) * 0.5, tl.where(a < 4.0, _rne(a), _rne(a * 0.5) * 2.0))
    return tl.where(v < 0, -r, r)


@triton.jit
def _fwht(x, C: tl.constexpr, LOG2C: tl.constexpr):
    """x @ H_C (Sylvester order) by butterflies: stage s maps pairs (a, b) at distance 2**s to (a+b, a-b)."""
    for s in tl.static_range(LOG2C):
        x3 = tl.permute(tl.reshape(x, (C >> (s + 1), 2, 1 << s)), (0, 2, 1))  # [block, offset, half]
        a, b = tl.split(x3)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (C,))
    return x


@triton.jit
def _compress_entry_kernel(
    kv_ptr, score_ptr, stride_tok, ape_ptr, norm_w_ptr, inv_freq_ptr,
    cu_ptr, start_ptr, st_kv_ptr, st_score_ptr, stride_slot, stride_strow, slot_ptr,
    out_ptr, stride_page, stride_pslot, page_size, pt_ptr, stride_pt, had_ptr, eps,
    RATIO: tl.constexpr, KAPPA: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
    INDEXER: tl.constexpr, PACK_FP8: tl.constexpr, ROPE: tl.constexpr, QB: tl.constexpr,
    ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr, INTERP: tl.constexpr, HAD_BUTTERFLY: tl.constexpr,
    LOG2C: tl.constexpr, SPLIT: tl.constexpr, pooled_ptr, count_ptr,
):
    b = tl.program_id(0)
    tok0 = tl.load(cu_ptr + b)
    start = tl.load(start_ptr + b)
    end = start + tl.load(cu_ptr + b + 1) - tok0
    i = start // RATIO + tl.program_id(1)
    if i < end // RATIO:
        NROWS: tl.constexpr = KAPPA * RATIO
        CS: tl.constexpr = C // SPLIT  # channels pooled by this program (program_id(2) picks the slice)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        ch = tl.arange(0, C)
        if SPLIT > 1:
            cs = tl.program_id(2) * CS + tl.arange(0, CS)
        else:  # the whole entry: plain channel offsets
            cs = ch
        m_c = tl.full([CS], float("-inf"), tl.float32)
        l_c = tl.zeros([CS], tl.float32)
        acc = tl.zeros([CS], tl.float32)
        for r0 in range(0, NROWS, ROWS):
            r = r0 + tl.arange(0, ROWS)
            t = RATIO * i - (KAPPA - 1) * RATIO + r  # candidate token; rows < (kappa-1)*m are A halves
            col = (r >= (KAPPA - 1) * RATIO).to(tl.int32) * ((KAPPA - 1) * C)
            cols = col[:, None] + cs[None, :]
            is_new = (t >= start)[:, None]
            from_state = ((t >= 0) & (t < start))[:, None]
            new_off = (tok0 + t - start).to(tl.int64)[:, None] * stride_tok + cols
            st_off = slot * stride_slot + (t % NROWS).to(tl.int64)[:, None] * stride_strow + cols
            k = tl.load(kv_ptr + new_off, mask=is_new, other=0.0).to(tl.float32) + \
                tl.load(st_kv_ptr + st_off, mask=from_state, other=0.0)
            s_new = tl.load(score_ptr + new_off, mask=is_new, other=0.0).to(tl.float32) + \
                tl.load(ape_ptr + (t % RATIO)[:, None] * (KAPPA * C) + cols, mask=is_new, other=0.0)
            s = tl.where(is_new, s_new, tl.load(st_score_ptr + st_off, mask=from_state, other=float("-inf")))
            m_new = tl.maximum(m_c, tl.max(s, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # tile of absent candidates only
            alpha = tl.exp(m_c - m_safe)
            p = tl.exp(s - m_safe[None, :])
            l_c = l_c * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p * k, 0)
            m_c = m_new
        x = round_bf16(acc / l_c)
        if SPLIT > 1:
            # each slice stores its channels; the program finishing the entry last post-processes it
            entry = b.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
            tl.store(pooled_ptr + entry * C + cs, x)
            done = arrive(count_ptr + entry) == SPLIT - 1  # the last slice sees the other slices' stores
            x = tl.load(pooled_ptr + entry * C + ch, mask=done & (ch >= 0), other=0.0, cache_modifier=".cg")
        else:
            done = True
        if done:
            _postprocess_entry(x, i, b, norm_w_ptr, inv_freq_ptr, out_ptr, stride_page, stride_pslot, page_size,
                               pt_ptr, stride_pt, had_ptr, eps, RATIO, C, INDEXER, PACK_FP8, ROPE, QB, ROPE_OFF,
                               SCALE_OFF, INTERP, HAD_BUTTERFLY, LOG2C)


@triton.jit
def _postprocess_entry(x, i, b, norm_w_ptr, inv_freq_ptr, out_ptr, stride_page, stride_pslot, page_size,
                       pt_ptr, stride_pt, had_ptr, eps, RATIO: tl.constexpr, C: tl.constexpr,
                       INDEXER: tl.constexpr, PACK_FP8: tl.constexpr, ROPE: tl.constexpr, QB: tl.constexpr,
                       ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr, INTERP: tl.constexpr,
                       HAD_BUTTERFLY: tl.constexpr, LOG2C: tl.constexpr):
    """Pooled entry i (x [C] fp32, bf16 values) -> RMSNorm -> RoPE -> FP8 or Hadamard + FP4 -> the pool."""
    ch = tl.arange(0, C)
    # RMSNorm (weighted), bf16 out
    w = tl.load(norm_w_ptr + ch).to(tl.float32)
    x = round_bf16(w * (x * tl.rsqrt(tl.sum(x * x, 0) / C + eps)))

    # RoPE on the last ROPE dims at position RATIO * i: interleaved pairs (even, odd)
    even, odd = tl.split(tl.reshape(x, (C // 2, 2)))
    pair = tl.arange(0, C // 2)
    rot = pair >= (C - ROPE) // 2
    freq = tl.load(inv_freq_ptr + pair - (C - ROPE) // 2, mask=rot, other=0.0)
    angle = (RATIO * i).to(tl.float32) * freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    x = tl.reshape(tl.join(tl.where(rot, even * cos - odd * sin, even), tl.where(rot, even * sin + odd * cos, odd)),
                   (C,))
    x = round_bf16(x)

    page = tl.load(pt_ptr + b.to(tl.int64) * stride_pt + i // page_size).to(tl.int64)
    dst = out_ptr + page * stride_page + (i % page_size).to(tl.int64) * stride_pslot
    if INDEXER:
        if HAD_BUTTERFLY:
            y = _fwht(x, C, LOG2C) * (C ** -0.5)
        else:
            # y = x H / sqrt(C) on the tensor cores: x is bf16-exact and H is +-1, so the products
            # are exact (rows of the broadcast operand are identical; max picks one)
            hmat = tl.load(had_ptr + tl.arange(0, C)[:, None] * C + ch[None, :])
            xb = tl.broadcast_to(x.to(tl.bfloat16)[None, :], (16, C))
            y = tl.max(dot(xb, hmat, INTERP), 0) * (C ** -0.5)
        y = tl.reshape(round_bf16(y), (C // QB, QB))
        scale, _ = _pow2_ceil(tl.maximum(tl.max(tl.abs(y), 1), 6.0 * 2.0 ** -126) / 6.0)
        q = _round_e2m1(tl.minimum(tl.maximum(y / scale[:, None], -6.0), 6.0)) * scale[:, None]
        tl.store(dst + ch, tl.reshape(q, (C,)).to(dst.dtype.element_ty))
    else:
        # FP8 fake quantization of the first C - ROPE dims in blocks of QB; the rope block is kept
        NB: tl.constexpr = C // QB
        y = tl.reshape(x, (NB, QB))
        blk = tl.arange(0, NB)
        nope = blk < (C - ROPE) // QB
        scale, exponent = _pow2_ceil(tl.maximum(tl.max(tl.abs(y), 1), 1e-4) * (1.0 / 448.0))
        codes = _round_e4m3(tl.minimum(tl.maximum(y / scale[:, None], -448.0), 448.0))
        if PACK_FP8:
            # bytes: [0, C-ROPE) e4m3 codes | bf16 rope dims | one ue8m0 per block | pad
            e4m3 = tl.reshape(codes, (C,)).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            tl.store(dst + ch, e4m3, mask=ch < C - ROPE)
            rope_dst = (dst + ROPE_OFF).to(tl.pointer_type(tl.bfloat16))
            tl.store(rope_dst + ch - (C - ROPE), x.to(tl.bfloat16), mask=ch >= C - ROPE)
            tl.store(dst + SCALE_OFF + blk, (exponent + 127).to(tl.uint8), mask=nope)
            tl.store(dst + SCALE_OFF + NB - 1, tl.zeros([], tl.uint8))  # pad byte
        else:
            q = tl.where(nope[:, None], codes * scale[:, None], y)
            tl.store(dst + ch, tl.reshape(q, (C,)).to(dst.dtype.element_ty))


@triton.jit
def _state_append_kernel(kv_ptr, score_ptr, stride_tok, ape_ptr, cu_ptr, start_ptr,
                         st_kv_ptr, st_score_ptr, stride_slot, stride_strow, slot_ptr,
                         RATIO: tl.constexpr, NROWS: tl.constexpr, KC: tl.constexpr):
    b = tl.program_id(0)
    r = tl.program_id(1)
    tok0 = tl.load(cu_ptr + b)
    start = tl.load(start_ptr + b)
    end = start + tl.load(cu_ptr + b + 1) - tok0
    t = end - 1 - (end - 1 - r + NROWS) % NROWS  # newest position <= end-1 living in ring row r
    if t >= start:
        ch = tl.arange(0, KC)
        src = (tok0 + t - start).to(tl.int64) * stride_tok + ch
        dst = tl.load(slot_ptr + b).to(tl.int64) * stride_slot + r * stride_strow + ch
        tl.store(st_kv_ptr + dst, tl.load(kv_ptr + src).to(tl.float32))
        s = tl.load(score_ptr + src).to(tl.float32) + tl.load(ape_ptr + (t % RATIO) * KC + ch)
        tl.store(st_score_ptr + dst, s)


@functools.cache
def _hadamard_bf16(n: int, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(n, device).to(torch.bfloat16)


def compress_tokens_triton(kv, score, ape, norm_weight, inv_freq, cu_seqlens, start_pos, state_kv, state_score,
                           state_slot, out, page_table, ratio, indexer=False, eps=1e-6, max_seqlen=None, *,
                           rows=None, num_warps=None, hadamard="butterfly", split=None):
    kappa = 2 if ratio == 4 else 1
    n_seq = start_pos.shape[0]
    kc = kv.shape[1]
    if n_seq == 0 or kv.shape[0] == 0:
        return
    if kv.stride() != score.stride() or kv.stride(1) != 1:
        raise ValueError("kv/score: need the same strides with contiguous channels")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    c = kc // kappa
    max_entries = triton.cdiv(max_seqlen, ratio)
    if split is None and kappa * ratio >= 64 and kv.is_cuda:
        # long (HCA) entries, tuned on H100: one program per entry once there are enough of them, else (and
        # for bf16 inputs) each entry's channels pooled by several one-warp programs; small tiles keep the
        # per-channel reductions inside a thread and the registers low
        if kv.element_size() == 4 and n_seq * max_entries >= 2 * num_sms(kv.device):
            split, rows, num_warps = 1, rows or 4, num_warps or 4
        elif kv.element_size() == 4:
            split, rows, num_warps = min(8, c // 64), rows or 32, num_warps or 1
        else:
            split, rows, num_warps = min(4, c // 128), rows or 16, num_warps or 1
    split = split or 1
    if rows is None:  # candidate rows per tile (CSA, and HCA without CUDA: 8 measured best on H100 before the split)
        rows = min(kappa * ratio, 8)
    if num_warps is None:
        num_warps = 8 if rows * c >= 8192 else 4
    if (kappa * ratio) % rows or c % split:
        raise ValueError(f"rows={rows} must divide the {kappa * ratio} candidate rows, split={split} the {c} channels")
    pack = out.dtype == torch.uint8
    pooled = counts = kv  # unused placeholders unless split
    if split > 1:
        pooled = torch.empty(n_seq * max_entries, c, device=kv.device, dtype=torch.float32)
        counts = torch.zeros(n_seq * max_entries, device=kv.device, dtype=torch.int32)
    _compress_entry_kernel[(n_seq, max_entries, split)](
        kv, score, kv.stride(0), ape, norm_weight, inv_freq,
        cu_seqlens, start_pos, state_kv, state_score, state_kv.stride(0), state_kv.stride(1), state_slot,
        out, out.stride(0), out.stride(1), out.shape[1], page_table, page_table.stride(0),
        _hadamard_bf16(c, kv.device) if indexer else norm_weight, eps,
        RATIO=ratio, KAPPA=kappa, C=c, ROWS=rows, INDEXER=indexer, PACK_FP8=pack, ROPE=2 * inv_freq.numel(),
        QB=FP4_BLOCK if indexer else FP8_BLOCK, ROPE_OFF=KV_FP8_ROPE_OFFSET, SCALE_OFF=KV_FP8_SCALE_OFFSET,
        INTERP=INTERPRET, HAD_BUTTERFLY=hadamard == "butterfly", LOG2C=c.bit_length() - 1, SPLIT=split,
        pooled_ptr=pooled, count_ptr=counts, num_warps=num_warps,
    )
    _state_append_kernel[(n_seq, kappa * ratio)](
        kv, score, kv.stride(0), ape, cu_seqlens, start_pos,
        state_kv, state_score, state_kv.stride(0), state_kv.stride(1), state_slot,
        RATIO=ratio, NROWS=kappa * ratio, KC=kc, num_warps=4,
    )
