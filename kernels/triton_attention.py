"""Triton kernel for `sparse_attention.sparse_attn` (same layout and semantics; see that module).

The key vector of a token is shared by all heads (MQA), so one program takes a query token with a
whole tile of heads (up to 64: the row count of a Hopper `wgmma`) and reads each gathered KV row
once for all of them, FlashMLA-style. Programs: query token x head tile x key split x value half.

* Key list of query i (virtual): positions `[0, n_win)` are window rows, `[n_win, n_win + K)` the
  selected compressed entries, resolved through the page table. Triton's pipeliner prefetches the
  row gathers (`cp.async`) a few tiles ahead; with `resolve` each program first resolves all its
  entries' pool rows (index -> page -> row) into a small buffer, so the loop has one indirection.
* Key splits (small batches): each split writes its partial (max, sum, acc); a second kernel merges
  them and adds the sink. It is a programmatic dependent launch (Hopper+): the split kernel lets it
  launch as soon as all its programs started, so its programs are resident and waiting when the split
  kernel ends (no launch gap between the two).
* Value halves (`V_SPLITS = 2`): each program computes the full 512-dim logits but the value
  product for 256 of the 512 output dims: twice the programs without partials to merge, at the cost
  of recomputing the logits (the pair reads the same rows, mostly from L2).

Online softmax in the exp2 domain with fp32 state; probabilities rounded to bf16 for the value
product (as the official kernel does).

Where the time goes (H100, Triton 3.6, see RESULTS.md): one 32-key tile costs a single program
~2.5 us even with L2-resident rows - the QK dot is issued by both warpgroups of the 64-head tile,
and the softmax row reductions and the probability tile cross warpgroups through shared memory with
barriers in between; the GPU-wide time is this per-tile sequence, not memory traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .numerics import FP8_BLOCK, KV_FP8_BYTES, KV_FP8_ROPE_OFFSET, KV_FP8_SCALE_OFFSET, NOPE_DIM
from .triton_utils import INTERPRET, dot, num_sms, pdl_supported, round_bf16

LOG2E = 1.4426950408889634


@triton.jit
def _dot_acc(a, b, acc, INTERP: tl.constexpr):
    """`acc + a @ b` as one accumulating dot (keeps Hopper's wgmma chain in the tensor cores)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _entry_rows(c, c_hi, idx_row_ptr, pt_row_ptr, page_size):
    """Pool rows [BLOCK_N] of the selected entries in cmp_idx columns c (< c_hi; index -1 = unused slot)."""
    idx = tl.load(idx_row_ptr + c, mask=c < c_hi, other=-1)
    page = tl.load(pt_row_ptr + idx // page_size, mask=idx >= 0, other=0)
    return page.to(tl.int64) * page_size + idx % page_size, idx >= 0


@triton.jit
def _kv_tile(rows, valid, C0: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
             NOPE: tl.constexpr, BLK: tl.constexpr, SCALE_OFF: tl.constexpr):
    """Dims [C0, C0 + W) of the KV rows `rows` as a bf16 tile [BLOCK_N, W]; invalid rows read as 0.
    FP8: the e4m3 dims only, dims >= NOPE read as 0 (the bf16 rope dims come from `_rope_tile`)."""
    if FP8:
        # dims as [W // BLK, BLK] blocks, each e4m3 * 2**(ue8m0 - 127)
        blk = C0 // BLK + tl.arange(0, W // BLK)
        live = valid[:, None] & (blk < NOPE // BLK)[None, :]  # [BLOCK_N, W // BLK]
        sc = tl.load(rows[:, None] + SCALE_OFF + blk[None, :], mask=live, other=0)
        scale = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2**(code - 127), exact
        codes = tl.load(rows[:, None, None] + blk[None, :, None] * BLK + tl.arange(0, BLK)[None, None, :],
                        mask=live[:, :, None], other=0)
        kv3 = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]
        return tl.reshape(kv3, (BLOCK_N, W)).to(tl.bfloat16)
    else:
        return tl.load(rows[:, None] + C0 + tl.arange(0, W)[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _rope_tile(rows, valid, ROPE_OFF: tl.constexpr, ROPE: tl.constexpr):
    """The bf16 rope dims [BLOCK_N, ROPE] of FP8-layout KV rows."""
    rope_ptr = (rows + ROPE_OFF).to(tl.pointer_type(tl.bfloat16))
    return tl.load(rope_ptr[:, None] + tl.arange(0, ROPE)[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _attend_tile(q_own, q_oth, q_rope, rows, valid, m_i, l_i, acc, acc_rope, qk_scale, D: tl.constexpr,
                 V0: tl.constexpr, DV: tl.constexpr, O0: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
                 NOPE: tl.constexpr, BLK: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr,
                 INTERP: tl.constexpr):
    """One online-softmax step (log2 domain) over the key rows `rows` [BLOCK_N] (pointers)."""
    kv = _kv_tile(rows, valid, V0, DV, BLOCK_N, FP8, NOPE, BLK, SCALE_OFF)
    s = dot(q_own, tl.trans(kv), INTERP)  # [BLOCK_H, BLOCK_N]
    if DV < D:
        s = _dot_acc(q_oth, tl.trans(_kv_tile(rows, valid, O0, D - DV, BLOCK_N, FP8, NOPE, BLK, SCALE_OFF)), s, INTERP)
    if FP8:
        rope = _rope_tile(rows, valid, ROPE_OFF, D - NOPE)
        s = _dot_acc(q_rope, tl.trans(rope), s, INTERP)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: keep exp2 finite
    alpha = tl.exp2(m_i - m_safe)
    p32 = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p32, 1)
    p = p32.to(tl.bfloat16)
    acc = acc * alpha[:, None] + dot(p, kv, INTERP)
    if FP8 and V0 + DV > NOPE:
        acc_rope = acc_rope * alpha[:, None] + dot(p, rope, INTERP)
    return m_new, l_i, acc, acc_rope


@triton.jit
def _attend(
    t, offs_h, mask_h, split, v_half, q_ptr, stride_qt, stride_qh, sink_ptr,
    win_ptr, stride_win, win_start_ptr, win_end_ptr,
    cmp_ptr, stride_cmp, page_size, pt_ptr, stride_pt, idx_ptr, stride_idx, n_idx, q_seq_ptr,
    out_ptr, stride_ot, stride_oh, part_acc_ptr, part_ml_ptr, H, qk_scale, rows_buf,
    D: tl.constexpr, V0: tl.constexpr, DV: tl.constexpr, O0: tl.constexpr,
    num_splits, RESOLVE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
    FP8: tl.constexpr, NOPE: tl.constexpr, BLK: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr,
    ROW_FP8: tl.constexpr, INTERP: tl.constexpr,
):
    """Output dims [V0, V0 + DV) of one (query, head tile, key split); the logits also use the other
    dims [O0, O0 + D - DV) when DV < D. FP8: the rope dims [NOPE, D) go through their own tiles."""
    ROPE: tl.constexpr = D - NOPE if FP8 else 16  # bf16: placeholder shape of the unused rope tiles
    if FP8:  # fixed row size: a compile-time stride lets the row gathers be 8-byte (pipelined) copies
        stride_win = ROW_FP8
        stride_cmp = ROW_FP8
    q_rows = q_ptr + t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh
    q_own = tl.load(q_rows + V0 + tl.arange(0, DV)[None, :], mask=mask_h[:, None], other=0.0)
    q_oth = q_own  # unused unless DV < D
    if DV < D:
        q_oth = tl.load(q_rows + O0 + tl.arange(0, D - DV)[None, :], mask=mask_h[:, None], other=0.0)
    q_rope = tl.zeros([BLOCK_H, ROPE], tl.bfloat16)  # unused unless FP8
    if FP8:
        q_rope = tl.load(q_rows + NOPE + tl.arange(0, ROPE)[None, :], mask=mask_h[:, None], other=0.0)

    w_lo = tl.load(win_start_ptr + t)
    n_win = tl.load(win_end_ptr + t) - w_lo
    n_tot = n_win + n_idx
    per_split = tl.cdiv(tl.cdiv(n_tot, BLOCK_N), num_splits) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_tot)
    idx_row = idx_ptr + t.to(tl.int64) * stride_idx
    pt_row = pt_ptr + tl.load(q_seq_ptr + t).to(tl.int64) * stride_pt

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV], tl.float32)
    acc_rope = tl.zeros([BLOCK_H, ROPE], tl.float32)  # FP8 rope dims when they are ours
    offs_n = tl.arange(0, BLOCK_N)
    # Two loops without a pointer select between the sources: Triton pipelines each one's gathers
    # (index -> page -> row included) a few tiles ahead, which it does not do through a select.
    w_hi = tl.minimum(hi, n_win)
    for start in range(lo, w_hi, BLOCK_N):  # window rows: virtual positions [lo, w_hi)
        j = start + offs_n
        m_i, l_i, acc, acc_rope = _attend_tile(
            q_own, q_oth, q_rope, win_ptr + (w_lo + j).to(tl.int64) * stride_win, j < w_hi, m_i, l_i, acc, acc_rope,
            qk_scale, D, V0, DV, O0, BLOCK_N, FP8, NOPE, BLK, ROPE_OFF, SCALE_OFF, INTERP)
    c_lo = tl.maximum(lo, n_win) - n_win
    c_hi = hi - n_win
    if RESOLVE > 0:
        # Resolve all our entries' pool rows at once (two dependent loads per program instead of per
        # tile) into this program's row of `rows_buf`; the loop then gathers through one indirection.
        all_rows, all_valid = _entry_rows(c_lo + tl.arange(0, RESOLVE), c_hi, idx_row, pt_row, page_size)
        tl.store(rows_buf + tl.arange(0, RESOLVE), tl.where(all_valid, all_rows, -1).to(tl.int32))
        tl.debug_barrier()  # makes the stores visible to every thread of the program
    for start in range(c_lo, c_hi, BLOCK_N):  # selected entries: cmp_idx columns
        if RESOLVE > 0:
            r = tl.load(rows_buf + (start - c_lo) + offs_n, mask=start + offs_n < c_hi, other=-1)
            rows, valid = r.to(tl.int64), r >= 0
        else:
            rows, valid = _entry_rows(start + offs_n, c_hi, idx_row, pt_row, page_size)
        m_i, l_i, acc, acc_rope = _attend_tile(
            q_own, q_oth, q_rope, cmp_ptr + rows * stride_cmp, valid, m_i, l_i, acc, acc_rope,
            qk_scale, D, V0, DV, O0, BLOCK_N, FP8, NOPE, BLK, ROPE_OFF, SCALE_OFF, INTERP)

    offs_v = V0 + tl.arange(0, DV)
    mask_v = offs_v < NOPE if FP8 else offs_v < D  # FP8: our rope dims are in acc_rope
    offs_r = NOPE + tl.arange(0, ROPE)
    own_rope: tl.constexpr = FP8 and V0 + DV > NOPE
    if not PARTIAL:
        sink = tl.load(sink_ptr + offs_h, mask=mask_h, other=0.0) * 1.4426950408889634
        # no keys at all: m = -inf, l = 0, acc = 0 -> exp2(+inf) in the denominator gives 0 output
        inv = 1.0 / (l_i + tl.exp2(sink - m_i))[:, None]
        o_rows = out_ptr + t.to(tl.int64) * stride_ot + offs_h[:, None] * stride_oh
        tl.store(o_rows + offs_v[None, :], round_bf16(acc * inv).to(out_ptr.dtype.element_ty),
                 mask=mask_h[:, None] & mask_v[None, :])
        if own_rope:
            tl.store(o_rows + offs_r[None, :], round_bf16(acc_rope * inv).to(out_ptr.dtype.element_ty),
                     mask=mask_h[:, None])
    else:
        base = (t.to(tl.int64) * num_splits + split) * H + offs_h  # [BLOCK_H] rows of the partials
        tl.store(part_acc_ptr + base[:, None] * D + offs_v[None, :], acc, mask=mask_h[:, None] & mask_v[None, :])
        if own_rope:
            tl.store(part_acc_ptr + base[:, None] * D + offs_r[None, :], acc_rope, mask=mask_h[:, None])
        if v_half == 0:  # both halves hold the row's (max, sum), equal up to summation order: keep half 0's
            tl.store(part_ml_ptr + base * 2, m_i, mask=mask_h)
            tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=mask_h)


@triton.jit
def _sparse_attn_kernel(
    q_ptr, stride_qt, stride_qh, sink_ptr,
    win_ptr, stride_win, win_start_ptr, win_end_ptr,
    cmp_ptr, stride_cmp, page_size, pt_ptr, stride_pt, idx_ptr, stride_idx, n_idx, q_seq_ptr,
    out_ptr, stride_ot, stride_oh, part_acc_ptr, part_ml_ptr, rows_buf_ptr,
    H, qk_scale,
    num_splits, RESOLVE: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr, V_SPLITS: tl.constexpr, FP8: tl.constexpr, NOPE: tl.constexpr, BLK: tl.constexpr, ROPE_OFF: tl.constexpr,
    SCALE_OFF: tl.constexpr, ROW_FP8: tl.constexpr, INTERP: tl.constexpr, LAUNCH_COMBINE: tl.constexpr,
):
    if LAUNCH_COMBINE:  # the combine kernel may launch now (it waits for this grid's end itself)
        gdc_launch_dependents()
    t = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2) // V_SPLITS
    v_half = tl.program_id(2) % V_SPLITS
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    program = (t * tl.num_programs(1) + hb) * tl.num_programs(2) + tl.program_id(2)
    rows_buf = rows_buf_ptr + program.to(tl.int64) * RESOLVE
    args = (t, offs_h, mask_h, split, v_half, q_ptr, stride_qt, stride_qh, sink_ptr,
            win_ptr, stride_win, win_start_ptr, win_end_ptr,
            cmp_ptr, stride_cmp, page_size, pt_ptr, stride_pt, idx_ptr, stride_idx, n_idx, q_seq_ptr,
            out_ptr, stride_ot, stride_oh, part_acc_ptr, part_ml_ptr, H, qk_scale, rows_buf)
    # the value half is a compile-time column range: one specialised body per half
    if V_SPLITS == 1:
        _attend(*args, D, 0, D, 0, num_splits, RESOLVE, BLOCK_H, BLOCK_N, PARTIAL, FP8, NOPE, BLK, ROPE_OFF,
                SCALE_OFF, ROW_FP8, INTERP)
    elif v_half == 0:
        _attend(*args, D, 0, D // 2, D // 2, num_splits, RESOLVE, BLOCK_H, BLOCK_N, PARTIAL, FP8, NOPE, BLK, ROPE_OFF,
                SCALE_OFF, ROW_FP8, INTERP)
    else:
        _attend(*args, D, D // 2, D // 2, 0, num_splits, RESOLVE, BLOCK_H, BLOCK_N, PARTIAL, FP8, NOPE, BLK, ROPE_OFF,
                SCALE_OFF, ROW_FP8, INTERP)


@triton.jit
def _combine_splits_kernel(part_acc_ptr, part_ml_ptr, sink_ptr, out_ptr, stride_ot, stride_oh, H,
                           num_splits, D: tl.constexpr, SPLITS_POW2: tl.constexpr, WAIT: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    sink = tl.load(sink_ptr + h) * 1.4426950408889634  # not written by the split kernel
    if WAIT:  # launched early: the split kernel's partials are complete and visible after this
        gdc_wait()
    offs_s = tl.arange(0, SPLITS_POW2)
    mask_s = offs_s < num_splits
    rows = (t.to(tl.int64) * num_splits + offs_s) * H + h  # [S]
    m_s = tl.load(part_ml_ptr + rows * 2, mask=mask_s, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + rows * 2 + 1, mask=mask_s, other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_s - m_safe)  # empty splits (m_s = -inf) weigh 0
    offs_d = tl.arange(0, D)
    acc = tl.sum(tl.load(part_acc_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
                 * w[:, None], 0)
    o = acc / (tl.sum(l_s * w, 0) + tl.exp2(sink - m))
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + offs_d, round_bf16(o).to(out_ptr.dtype.element_ty))


def attn_config(n_queries: int, heads: int, max_keys: int, fp8: bool, device: torch.device, **overrides) -> dict:
    """Tile config: the dispatch default with `overrides` applied (block_h, block_n, num_splits,
    v_splits, num_warps, num_stages, resolve: entry rows resolved once per program).

    All heads in one tile (up to 64); key splits up to one wave of programs (one fits per SM: a second
    wave doubles the time). bf16: few queries (latency-bound) take 32-key tiles and value halves (more
    programs in flight), many take 64-key tiles; entry rows resolved up front. FP8 (dequantisation in
    registers): 32-key tiles, 3 stages, no halves or resolve. All measured on H100
    (`benchmarks/kernels.py --sweep`, RESULTS.md)."""
    unknown = set(overrides) - {"block_h", "block_n", "num_splits", "v_splits", "num_warps", "num_stages", "resolve"}
    if unknown:
        raise ValueError(f"sparse_attn_triton: unknown config keys {sorted(unknown)}")
    block_h = min(64, max(16, triton.next_power_of_2(heads)))
    sms = num_sms(device)
    few = n_queries * triton.cdiv(heads, block_h) * 8 <= sms
    if fp8:
        cfg = dict(block_h=block_h, block_n=32, v_splits=1, num_stages=3, resolve=False)
    else:
        cfg = dict(block_h=block_h, block_n=32 if few else 64, v_splits=2 if few else 1, num_stages=3 if few else 2,
                   resolve=True)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["v_splits"] not in (1, 2):
        raise ValueError(f"v_splits: expected 1 or 2, got {cfg['v_splits']}")
    cfg.setdefault("num_warps", 8 if cfg["block_h"] >= 64 else 4)
    if cfg.get("num_splits") is None:
        programs = n_queries * triton.cdiv(heads, cfg["block_h"]) * cfg["v_splits"]
        cfg["num_splits"] = max(1, min(sms // programs, triton.cdiv(max_keys, cfg["block_n"])))
    return cfg


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
    max_window: int = 128,
    **config,
) -> torch.Tensor:
    """`sparse_attn` on the GPU; `config` overrides the tile config (see `attn_config`)."""
    t, h, d = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    fp8 = win_kv.dtype == torch.uint8
    n_idx = cmp_idx.shape[1]
    if cmp_kv is None or n_idx == 0:  # no compressed part: dummy pointers, never read
        cmp_kv, page_table, n_idx = win_kv[None], win_start[None], 0
    cmp_rows = cmp_kv.flatten(0, 1)
    if fp8 and (win_kv.stride(0) != KV_FP8_BYTES or cmp_rows.stride(0) != KV_FP8_BYTES):
        raise ValueError(f"win_kv/cmp_kv: FP8 rows must be contiguous ({KV_FP8_BYTES} bytes apart)")
    scale = (d**-0.5 if softmax_scale is None else softmax_scale) * LOG2E
    cfg = attn_config(t, h, max_window + n_idx, fp8, q.device, **config)
    block_h, num_splits, v_splits = cfg["block_h"], cfg["num_splits"], cfg["v_splits"]
    n_hb = triton.cdiv(h, block_h)
    # resolve: room for every selected entry in each program's row of rows_buf (a program resolves
    # only its own share, whatever the window lengths)
    resolve = triton.next_power_of_2(n_idx) if cfg["resolve"] and n_idx else 0
    rows_buf = torch.empty(t * n_hb * num_splits * v_splits * resolve or 1, device=q.device, dtype=torch.int32)
    if num_splits > 1:
        part_acc = torch.empty(t * num_splits * h, d, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(t * num_splits * h, 2, device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out  # unused
    pdl = num_splits > 1 and pdl_supported(q.device)
    _sparse_attn_kernel[(t, n_hb, num_splits * v_splits)](
        q, q.stride(0), q.stride(1), sink,
        win_kv, win_kv.stride(0), win_start, win_end,
        cmp_rows, cmp_rows.stride(0), cmp_kv.shape[1], page_table, page_table.stride(0),
        cmp_idx, cmp_idx.stride(0), n_idx, q_seq,
        out, out.stride(0), out.stride(1), part_acc, part_ml, rows_buf,
        h, scale,
        num_splits, RESOLVE=resolve,
        D=d, BLOCK_H=block_h, BLOCK_N=cfg["block_n"], PARTIAL=num_splits > 1, V_SPLITS=v_splits, FP8=fp8,
        NOPE=NOPE_DIM, BLK=FP8_BLOCK, ROPE_OFF=KV_FP8_ROPE_OFFSET, SCALE_OFF=KV_FP8_SCALE_OFFSET,
        ROW_FP8=KV_FP8_BYTES, INTERP=INTERPRET, LAUNCH_COMBINE=pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        _combine_splits_kernel[(t, h)](part_acc, part_ml, sink, out, out.stride(0), out.stride(1), h,
                                       num_splits, D=d, SPLITS_POW2=triton.next_power_of_2(num_splits), WAIT=pdl,
                                       num_warps=4, launch_pdl=pdl)
    return out
