"""Sparse MQA attention with a sink (spec §4.6): window keys + selected compressed entries.

Every key is also the value: one 512-wide vector per token or compressed entry, shared by all heads.
For query `i`, head `h`, with key set `U_i`:

    l[h, u] = (q[i, h] . v_u) * scale          (fp32 accumulation of bf16 inputs)
    M[h]    = max_u l[h, u]                     (the sink does not take part in the max)
    o[i, h] = sum_u exp(l - M) v_u / (sum_u exp(l - M) + exp(sink[h] - M))

Layout (one call may mix sequences of any lengths):

* `win_kv` [N_win, 512]: window vectors. Query `i` uses the rows `[win_start[i], win_end[i])`
  (the order of keys does not matter, so a ring buffer's valid slots form one range).
* `cmp_kv` [num_pages, page_size, 512]: the compressed-entry pool of the layer. Logical entry `e` of
  sequence `s` lives at `cmp_kv[page_table[s, e // page_size], e % page_size]`. Query `i` belongs
  to sequence `q_seq[i]` and attends the logical entries `cmp_idx[i, :]` (`-1` = unused slot).
* KV dtype: bf16 [..., 512], or the FP8 layout uint8 [..., 584] (see `numerics.pack_kv_fp8`):
  e4m3 dims 0..447 | bf16 dims 448..511 | 7 ue8m0 scales (one per 64 dims) | pad. Both sources
  must use the same one.

`sparse_attn_decode` and `sparse_attn_extend` build these ranges from the usual decode ring and
packed-prefill layouts.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .numerics import HEAD_DIM, KV_FP8_BYTES, unpack_kv_fp8

WINDOW = 128


def _kv_as_bf16(kv: torch.Tensor) -> torch.Tensor:
    return unpack_kv_fp8(kv) if kv.dtype == torch.uint8 else kv


def _check_inputs(q, sink, win_kv, win_start, win_end, cmp_kv, page_table, cmp_idx, q_seq) -> None:
    if q.dim() != 3:
        raise ValueError(f"q: expected [tokens, heads, dim], got {tuple(q.shape)}")
    t, h, d = q.shape
    fp8 = win_kv.dtype == torch.uint8
    width = KV_FP8_BYTES if fp8 else d
    if fp8 and d != HEAD_DIM:
        raise ValueError(f"q: the FP8 KV layout needs head dim {HEAD_DIM}, got {d}")
    if win_kv.dim() != 2 or win_kv.shape[1] != width:
        raise ValueError(f"win_kv: expected [rows, {width}], got {tuple(win_kv.shape)}")
    if sink.shape != (h,):
        raise ValueError(f"sink: expected [{h}], got {tuple(sink.shape)}")
    for name, x in (("win_start", win_start), ("win_end", win_end), ("q_seq", q_seq)):
        if x.shape != (t,):
            raise ValueError(f"{name}: expected [{t}], got {tuple(x.shape)}")
    if cmp_idx.dim() != 2 or cmp_idx.shape[0] != t:
        raise ValueError(f"cmp_idx: expected [{t}, k], got {tuple(cmp_idx.shape)}")
    if cmp_idx.shape[1] > 0:
        if cmp_kv is None or page_table is None:
            raise ValueError("cmp_kv/page_table: required when cmp_idx selects entries")
        if cmp_kv.dim() != 3 or cmp_kv.shape[2] != width or cmp_kv.dtype != win_kv.dtype:
            raise ValueError(f"cmp_kv: expected [pages, page_size, {width}] {win_kv.dtype}, got "
                             f"{tuple(cmp_kv.shape)} {cmp_kv.dtype}")


def sparse_attn_ref(
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
) -> torch.Tensor:
    """fp32 reference of `sparse_attn`; returns bf16 [T, H, D]."""
    t, h, d = q.shape
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    win = _kv_as_bf16(win_kv).float()
    n_win = int((win_end - win_start).max()) if t else 0
    offs = torch.arange(max(n_win, 1), device=q.device)
    win_rows = win_start.long()[:, None] + offs  # [T, W]
    win_valid = win_rows < win_end.long()[:, None]
    keys = [win[win_rows.clamp(max=max(win.shape[0] - 1, 0))]] if win.shape[0] else [win.new_zeros(t, offs.numel(), d)]
    valid = [win_valid]
    if cmp_idx.shape[1] > 0:
        pool = _kv_as_bf16(cmp_kv).float().flatten(0, 1)  # [pages * page_size, D]
        page_size = cmp_kv.shape[1]
        idx = cmp_idx.long()
        sel = idx >= 0
        pages = page_table.long()[q_seq.long()[:, None], idx.clamp(min=0) // page_size]
        keys.append(pool[pages * page_size + idx.clamp(min=0) % page_size])
        valid.append(sel)
    kv = torch.cat(keys, 1)  # [T, L, D]
    mask = torch.cat(valid, 1)  # [T, L]
    logits = torch.einsum("thd,tld->thl", q.float(), kv) * scale
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink.float()[None, :, None] - m)
    return (torch.einsum("thl,tld->thd", p, kv) / denom).to(torch.bfloat16)


def sparse_attn(
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
) -> torch.Tensor:
    """Sparse attention over window rows + selected compressed entries (layout in the module doc).

    q [T, H, D] bf16; sink [H] fp32; win_start/win_end/q_seq [T] int32; cmp_idx [T, K] int32.
    Returns bf16 [T, H, D]. Dispatches to Triton on CUDA (see `dispatch`).
    """
    _check_inputs(q, sink, win_kv, win_start, win_end, cmp_kv, page_table, cmp_idx, q_seq)
    args = (q, sink, win_kv, win_start, win_end, cmp_kv, page_table, cmp_idx, q_seq, softmax_scale)
    if use_triton(q, win_kv, cmp_kv):
        from .triton_attention import sparse_attn_triton

        return sparse_attn_triton(*args)
    return sparse_attn_ref(*args)


def decode_window_ranges(win_slot: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ranges of the valid ring slots: a request at position p owns ring row `win_slot`, whose
    slots `0..min(p, 127)` hold positions `max(0, p-127)..p` (slot = position mod 128)."""
    start = win_slot.int() * WINDOW
    return start, start + (positions.int() + 1).clamp(max=WINDOW)


def sparse_attn_decode(
    q: torch.Tensor,
    sink: torch.Tensor,
    win_ring: torch.Tensor,
    win_slot: torch.Tensor,
    positions: torch.Tensor,
    cmp_kv: torch.Tensor | None,
    page_table: torch.Tensor | None,
    cmp_idx: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Decode: one query per sequence.

    q [B, H, D]; win_ring [R, 128, D] (or [R, 128, 584] uint8) with the new token already written at
    slot `p mod 128`; win_slot [B] the ring row of each sequence; positions [B] the query position p;
    page_table [B, max_pages]; cmp_idx [B, K] selected logical entries (-1 padded).
    """
    if win_ring.dim() != 3 or win_ring.shape[1] != WINDOW:
        raise ValueError(f"win_ring: expected [requests, {WINDOW}, width], got {tuple(win_ring.shape)}")
    start, end = decode_window_ranges(win_slot, positions)
    q_seq = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    return sparse_attn(q, sink, win_ring.flatten(0, 1), start, end, cmp_kv, page_table, cmp_idx, q_seq,
                       softmax_scale)


def extend_window_ranges(cu_q: torch.Tensor, cu_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(win_start, win_end, q_seq) for the packed extend layout of `sparse_attn_extend`."""
    n_seq = cu_q.numel() - 1
    q_len = (cu_q[1:] - cu_q[:-1]).long()
    kv_len = (cu_kv[1:] - cu_kv[:-1]).long()
    if bool((kv_len < q_len).any()):
        raise ValueError("cu_seqlens_kv: every sequence needs at least as many kv rows as queries")
    q_seq = torch.repeat_interleave(torch.arange(n_seq, device=cu_q.device), q_len)
    j = torch.arange(int(cu_q[-1]), device=cu_q.device) - cu_q.long()[q_seq]  # index within the sequence's queries
    row = cu_kv.long()[q_seq] + (kv_len - q_len)[q_seq] + j  # kv row of the query token itself
    start = torch.maximum(row - (WINDOW - 1), cu_kv.long()[q_seq])
    return start.int(), (row + 1).int(), q_seq.int()


def sparse_attn_extend(
    q: torch.Tensor,
    sink: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    cmp_kv: torch.Tensor | None,
    page_table: torch.Tensor | None,
    cmp_idx: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Prefill / extend: many query tokens per sequence, causal window + per-query selected entries.

    q [T, H, D] packed by `cu_seqlens_q` [B+1]; kv [N, D] (or [N, 584] uint8) packed by
    `cu_seqlens_kv` [B+1]: per sequence the window vectors of up to 127 earlier tokens (from the ring,
    in position order) followed by the vectors of its query tokens, so the queries are the last rows.
    Query at kv row r attends rows `[max(seq_start, r-127), r]`. cmp_idx [T, K] per query.
    """
    start, end, q_seq = extend_window_ranges(cu_seqlens_q, cu_seqlens_kv)
    return sparse_attn(q, sink, kv, start, end, cmp_kv, page_table, cmp_idx, q_seq, softmax_scale)

