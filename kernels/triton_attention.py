"""Triton kernel for `sparse_attention.sparse_attn` (same layout and semantics; see that module).

One program = one query token x BLOCK_H heads x one split of its key list. The key list of query i
is virtual: positions `[0, n_win)` are window rows, `[n_win, n_win + K)` the selected compressed
entries (resolved through the page table in the kernel). Online softmax in the exp2 domain, fp32
state, probabilities rounded to bf16 for the value product (as the official kernel does). With
several splits (small batches: more programs to fill the GPU) the partial (max, sum, acc) are merged
by a second kernel that also adds the sink.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import FP8_BLOCK, KV_FP8_ROPE_OFFSET, KV_FP8_SCALE_OFFSET, NOPE_DIM
from .triton_utils import INTERPRET, dot, num_sms, round_bf16

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(base_ptr, rows, valid, stride_row, D: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
                  NOPE: tl.constexpr, BLK: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr):
    """Rows `rows` [BLOCK_N] of a KV source as a bf16 tile [BLOCK_N, D]; invalid rows read as 0."""
    row_ptr = base_ptr + rows.to(tl.int64) * stride_row
    if FP8:
        # View the 512 dims as [D // BLK, BLK]: blocks < NOPE // BLK are e4m3 * 2**(ue8m0 - 127),
        # the last block is the bf16 rope part.
        NB: tl.constexpr = D // BLK
        blk = tl.arange(0, NB)[None, :, None]
        e = tl.arange(0, BLK)[None, None, :]
        is_nope = blk < NOPE // BLK
        v3 = valid[:, None, None]
        codes = tl.load(row_ptr[:, None, None] + blk * BLK + e, mask=v3 & is_nope, other=0)
        nope = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        blk2 = tl.arange(0, NB)[None, :]
        sc = tl.load(row_ptr[:, None] + SCALE_OFF + blk2, mask=valid[:, None] & (blk2 < NOPE // BLK), other=127)
        scale = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2**(code - 127), exact
        rope_ptr = (row_ptr + ROPE_OFF).to(tl.pointer_type(tl.bfloat16))
        rope = tl.load(rope_ptr[:, None, None] + e + 0 * blk, mask=v3 & (blk == NB - 1), other=0.0)
        kv3 = tl.where(is_nope, nope * scale[:, :, None], rope.to(tl.float32))
        return tl.reshape(kv3, (BLOCK_N, D)).to(tl.bfloat16)
    else:
        offs_d = tl.arange(0, D)
        return tl.load(row_ptr[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _resolve_rows(idx_row_ptr, j, j_end, pt_row_ptr, page_size):
    """Physical pool rows of selected entries j (< j_end; index -1 = unused slot)."""
    idx = tl.load(idx_row_ptr + j, mask=j < j_end, other=-1)
    valid = idx >= 0
    page = tl.load(pt_row_ptr + idx // page_size, mask=valid, other=0)
    return page.to(tl.int64) * page_size + idx % page_size, valid


@triton.jit
def _attend_block(q, kv, valid, m_i, l_i, acc, qk_scale, INTERP: tl.constexpr):
    """One online-softmax step over a key tile (log2 domain)."""
    s = dot(q, tl.trans(kv), INTERP) * qk_scale  # [BLOCK_H, BLOCK_N]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: keep exp2 finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(tl.bfloat16), kv, INTERP)
    return m_new, l_i, acc


@triton.jit
def _sparse_attn_kernel(
    q_ptr, stride_qt, stride_qh, sink_ptr,
    win_ptr, stride_win, win_start_ptr, win_end_ptr,
    cmp_ptr, stride_cmp, page_size, pt_ptr, stride_pt, idx_ptr, stride_idx, n_idx, q_seq_ptr,
    out_ptr, stride_ot, stride_oh, part_acc_ptr, part_ml_ptr,
    H, qk_scale,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    FP8: tl.constexpr, NOPE: tl.constexpr, BLK: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr, INTERP: tl.constexpr,
):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None], other=0.0)

    w_lo = tl.load(win_start_ptr + t)
    n_win = tl.load(win_end_ptr + t) - w_lo
    n_tot = n_win + n_idx
    per_split = tl.cdiv(tl.cdiv(n_tot, BLOCK_N), NUM_SPLITS) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_tot)
    seq = tl.load(q_seq_ptr + t).to(tl.int64)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # window keys: virtual positions [lo, min(hi, n_win))
    w_hi = tl.minimum(hi, n_win)
    for start in range(lo, w_hi, BLOCK_N):
        j = start + offs_n
        valid = j < w_hi
        kv = _load_kv_tile(win_ptr, w_lo + j, valid, stride_win, D, BLOCK_N, FP8, NOPE, BLK, ROPE_OFF, SCALE_OFF)
        m_i, l_i, acc = _attend_block(q, kv, valid, m_i, l_i, acc, qk_scale, INTERP)

    # compressed entries: virtual positions [max(lo, n_win), hi) -> cmp_idx columns. The index ->
    # page -> row lookups of the next tile are issued before this tile's math to hide their latency.
    c_lo = tl.maximum(lo, n_win) - n_win
    c_hi = hi - n_win
    idx_row = idx_ptr + t.to(tl.int64) * stride_idx
    rows, valid = _resolve_rows(idx_row, c_lo + offs_n, c_hi, pt_ptr + seq * stride_pt, page_size)
    for start in range(c_lo, c_hi, BLOCK_N):
        kv = _load_kv_tile(cmp_ptr, rows, valid, stride_cmp, D, BLOCK_N, FP8, NOPE, BLK, ROPE_OFF, SCALE_OFF)
        next_rows, next_valid = _resolve_rows(idx_row, start + BLOCK_N + offs_n, c_hi, pt_ptr + seq * stride_pt,
                                              page_size)
        m_i, l_i, acc = _attend_block(q, kv, valid, m_i, l_i, acc, qk_scale, INTERP)
        rows, valid = next_rows, next_valid

    if NUM_SPLITS == 1:
        sink = tl.load(sink_ptr + offs_h, mask=mask_h, other=0.0) * 1.4426950408889634
        # no keys at all: m = -inf, l = 0, acc = 0 -> exp2(+inf) in the denominator gives 0 output
        o = acc / (l_i + tl.exp2(sink - m_i))[:, None]
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
                 round_bf16(o).to(out_ptr.dtype.element_ty), mask=mask_h[:, None])
    else:
        base = (t.to(tl.int64) * NUM_SPLITS + split) * H + offs_h  # [BLOCK_H] rows of the partials
        tl.store(part_acc_ptr + base[:, None] * D + offs_d[None, :], acc, mask=mask_h[:, None])
        tl.store(part_ml_ptr + base * 2, m_i, mask=mask_h)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=mask_h)


@triton.jit
def _combine_splits_kernel(part_acc_ptr, part_ml_ptr, sink_ptr, out_ptr, stride_ot, stride_oh, H,
                           D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    rows = (t.to(tl.int64) * NUM_SPLITS + offs_s) * H + h  # [S]
    m_s = tl.load(part_ml_ptr + rows * 2)
    l_s = tl.load(part_ml_ptr + rows * 2 + 1)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_s - m_safe)  # empty splits (m_s = -inf) weigh 0
    offs_d = tl.arange(0, D)
    acc = tl.sum(tl.load(part_acc_ptr + rows[:, None] * D + offs_d[None, :]) * w[:, None], 0)
    sink = tl.load(sink_ptr + h) * 1.4426950408889634
    o = acc / (tl.sum(l_s * w, 0) + tl.exp2(sink - m))
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + offs_d, round_bf16(o).to(out_ptr.dtype.element_ty))


def pick_splits(n_programs: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Splits of the key list so that about two waves of programs fill the GPU (power of two, rounded
    up: with small batches more programs in flight hide the gather latency better)."""
    want = min(max(1, (2 * num_sms(device)) // max(n_programs, 1)), max(1, triton.cdiv(max_keys, block_n)))
    return triton.next_power_of_2(want)


def sparse_attn_triton(
    q: torch.Tensor,
    sink: torch.Tensor,
    win_kv: torch.Tensor,
    win_start: torch.Tensor,
    win_end: torch.Tensor,
    cmp_kv: torch.Tensor | None,
    page_table: torch.Tensor | None,
    cmp_idx: torch.Tensor,
    q_seq: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    block_h: int | None = None,
    block_n: int = 32,
    num_splits: int | None = None,
    max_window: int = 128,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    t, h, d = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    fp8 = win_kv.dtype == torch.uint8
    n_idx = cmp_idx.shape[1]
    if cmp_kv is None or n_idx == 0:  # no compressed part: dummy pointers, the loop never runs
        cmp_kv, page_table, n_idx = win_kv[None], win_start[None], 0
    cmp_rows = cmp_kv.flatten(0, 1)
    scale = (d**-0.5 if softmax_scale is None else softmax_scale) * LOG2E
    if block_h is None:  # measured on H100: 16-head tiles for small batches; FP8 dequant prefers 64
        block_h = (64 if fp8 else 32) if t >= 32 else 16
    if num_warps is None:
        num_warps = 8 if block_h >= 64 else 4
    n_hb = triton.cdiv(h, block_h)
    if num_splits is None:
        num_splits = pick_splits(t * n_hb, max_window + n_idx, block_n, q.device)
    if num_splits > 1:
        part_acc = torch.empty(t * num_splits * h, d, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(t * num_splits * h, 2, device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out  # unused
    _sparse_attn_kernel[(t, n_hb, num_splits)](
        q, q.stride(0), q.stride(1), sink,
        win_kv, win_kv.stride(0), win_start, win_end,
        cmp_rows, cmp_rows.stride(0), cmp_kv.shape[1], page_table, page_table.stride(0),
        cmp_idx, cmp_idx.stride(0), n_idx, q_seq,
        out, out.stride(0), out.stride(1), part_acc, part_ml,
        h, scale,
        D=d, BLOCK_H=block_h, BLOCK_N=block_n, NUM_SPLITS=num_splits, FP8=fp8,
        NOPE=NOPE_DIM, BLK=FP8_BLOCK, ROPE_OFF=KV_FP8_ROPE_OFFSET, SCALE_OFF=KV_FP8_SCALE_OFFSET, INTERP=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(t, h)](part_acc, part_ml, sink, out, out.stride(0), out.stride(1), h,
                                       D=d, NUM_SPLITS=num_splits, num_warps=4)
    return out
