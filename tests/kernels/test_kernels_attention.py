"""Sparse attention kernel vs the fp32 reference: decode (ring window + paged selected entries) and
extend (packed causal window + per-query entries), bf16 and FP8 KV."""

from __future__ import annotations

import pytest
import torch
from dsv4_agent.kernels import (
    decode_window_ranges,
    extend_window_ranges,
    kv_fp8_sim,
    pack_kv_fp8,
    sparse_attn_decode,
    sparse_attn_extend,
    sparse_attn_ref,
)
from dsv4_agent.kernels.triton_attention import sparse_attn_triton
from kernel_helpers import poisoned_outputs, rel_err, requires_gpu

TOL = 5e-3  # bf16 probabilities in the value product (as the official kernel) vs fp32 softmax


def _model_kv(*shape, device):
    """Random KV vectors as the model makes them: no-rope dims FP8-representable, rope dims bf16."""
    return kv_fp8_sim(torch.randn(*shape, 512, device=device).bfloat16())


def _paged_pool(n_entries: list[int], page_size: int, device):
    """Pool [pages, page_size, 512] + a shuffled page table covering each sequence's entries."""
    pages_per_seq = [max(1, -(-n // page_size)) for n in n_entries]
    total = sum(pages_per_seq) + 1  # one spare page nobody owns
    perm = torch.randperm(total, device=device)
    width = max(pages_per_seq)
    table = torch.zeros(len(n_entries), width, dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[used : used + n].int()
        used += n
    return _model_kv(total, page_size, device=device), table


def _selection(n_entries: list[int], k: int, device, shuffle_pad: bool = False):
    """[B, k] distinct logical entries per sequence (all of them when fewer than k), -1 padded."""
    idx = torch.full((len(n_entries), k), -1, dtype=torch.int32, device=device)
    for b, n in enumerate(n_entries):
        chosen = torch.randperm(n, device=device)[:k].int()
        idx[b, : chosen.numel()] = chosen
        if shuffle_pad:
            idx[b] = idx[b, torch.randperm(k, device=device)]
    return idx


def _decode_case(positions, heads, k, page_size, device, shuffle_pad=False):
    b = len(positions)
    n_entries = [(p + 1) // 4 for p in positions]
    pool, table = _paged_pool(n_entries, page_size, device)
    ring = _model_kv(b + 2, 128, device=device)
    slots = torch.randperm(b + 2, device=device)[:b].int()
    return dict(
        q=torch.randn(b, heads, 512, device=device).bfloat16(),
        sink=torch.randn(heads, device=device),
        win_ring=ring, win_slot=slots, positions=torch.tensor(positions, dtype=torch.int32, device=device),
        cmp_kv=pool, page_table=table, cmp_idx=_selection(n_entries, k, device, shuffle_pad),
    )


def _decode_ref(case):
    start, end = decode_window_ranges(case["win_slot"], case["positions"])
    q_seq = torch.arange(case["q"].shape[0], dtype=torch.int32, device=case["q"].device)
    return sparse_attn_ref(case["q"], case["sink"], case["win_ring"].flatten(0, 1), start, end, case["cmp_kv"],
                           case["page_table"], case["cmp_idx"], q_seq)


def _as_fp8(case):
    return {**case, "win_ring": pack_kv_fp8(case["win_ring"]), "cmp_kv": pack_kv_fp8(case["cmp_kv"])}


DECODE_CASES = {
    "batch1_first_token": ([0], 16),
    "mixed_lengths": ([3, 130, 57, 1000], 16),
    "fewer_entries_than_k": ([9, 21], 16),
    "long": ([2047], 64),
    "batch33_wide_head_tiles": ([1, 5, 9, 130, 300, 7, 64, 129, 4] * 3 + [0, 2, 3, 8, 200, 1000], 8),
}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_reference(name, fp8, device, force_triton):
    positions, k = DECODE_CASES[name]
    case = _decode_case(positions, heads=16, k=k, page_size=16, device=device, shuffle_pad=(name == "mixed_lengths"))
    ref = _decode_ref(case)
    if fp8:
        case = _as_fp8(case)
    with poisoned_outputs():
        out = sparse_attn_decode(**case)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < TOL


SPLIT_CONFIGS = {"s1": dict(num_splits=1), "s2": dict(num_splits=2), "s8": dict(num_splits=8),
                 "s1v2": dict(num_splits=1, v_splits=2), "s3v2n16": dict(num_splits=3, v_splits=2, block_n=16),
                 "s3resolve": dict(num_splits=3, resolve=True),
                 "s1v2resolve": dict(num_splits=1, v_splits=2, resolve=True),
                 "h16s2": dict(block_h=16, num_splits=2, resolve=True)}  # 2 head tiles, the second partial


@pytest.mark.parametrize("fp8,name", [(False, name) for name in SPLIT_CONFIGS]
                         + [(True, name) for name in ("s8", "s1v2", "s3v2n16", "s3resolve", "h16s2")])
def test_decode_split_counts_agree(name, fp8, device):
    """Key splits (partials merged by the combine kernel) and value halves give the same result."""
    case = _decode_case([5, 300, 77], heads=20, k=32, page_size=8, device=device)  # heads not a block multiple
    ref = _decode_ref(case)
    if fp8:
        case = _as_fp8(case)
    start, end = decode_window_ranges(case["win_slot"], case["positions"])
    q_seq = torch.arange(3, dtype=torch.int32, device=device)
    with poisoned_outputs():
        out = sparse_attn_triton(case["q"], case["sink"], case["win_ring"].flatten(0, 1), start, end, case["cmp_kv"],
                                 case["page_table"], case["cmp_idx"], q_seq, **SPLIT_CONFIGS[name])
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_long_windows_with_resolved_rows(fp8, device):
    """Window ranges longer than the decode window (generic `sparse_attn` layout) with the per-program
    entry-row buffer: every program still finds room for its selected entries."""
    case = _decode_case([300, 900], heads=16, k=24, page_size=8, device=device)
    win = _model_kv(700, device=device)
    start = torch.tensor([0, 250], dtype=torch.int32, device=device)
    end = torch.tensor([230, 700], dtype=torch.int32, device=device)
    q_seq = torch.arange(2, dtype=torch.int32, device=device)
    ref = sparse_attn_ref(case["q"], case["sink"], win, start, end, case["cmp_kv"], case["page_table"],
                          case["cmp_idx"], q_seq)
    pool = case["cmp_kv"]
    if fp8:
        win, pool = pack_kv_fp8(win), pack_kv_fp8(pool)
    for config in (dict(num_splits=3, resolve=True), dict(num_splits=1, v_splits=2, block_n=64, resolve=True)):
        with poisoned_outputs():
            out = sparse_attn_triton(case["q"], case["sink"], win, start, end, pool, case["page_table"],
                                     case["cmp_idx"], q_seq, **config)
        assert rel_err(out, ref) < TOL


def test_decode_rejects_unknown_config(device):
    case = _decode_case([5], heads=4, k=4, page_size=4, device=device)
    start, end = decode_window_ranges(case["win_slot"], case["positions"])
    with pytest.raises(ValueError, match="block_m"):
        sparse_attn_triton(case["q"], case["sink"], case["win_ring"].flatten(0, 1), start, end, case["cmp_kv"],
                           case["page_table"], case["cmp_idx"], torch.zeros(1, dtype=torch.int32, device=device),
                           block_m=16)


def test_window_only_layer_and_empty_batch(device, force_triton):
    case = _decode_case([0, 200], heads=8, k=4, page_size=4, device=device)
    case.update(cmp_kv=None, page_table=None, cmp_idx=torch.zeros(2, 0, dtype=torch.int32, device=device))
    with poisoned_outputs():
        out = sparse_attn_decode(**case)
    assert rel_err(out, _decode_ref(case)) < TOL
    empty = {**case, "q": case["q"][:0], "win_slot": case["win_slot"][:0], "positions": case["positions"][:0],
             "cmp_idx": case["cmp_idx"][:0]}
    assert sparse_attn_decode(**empty).shape == (0, 8, 512)


def test_sink_only_softmax_mass(device, force_triton):
    """One key with logit 0 and sink 0: output is exactly half the value vector."""
    ring = torch.zeros(1, 128, 512, device=device, dtype=torch.bfloat16)
    ring[0, 0] = torch.randn(512, device=device).bfloat16()
    q = torch.zeros(1, 16, 512, device=device, dtype=torch.bfloat16)
    out = sparse_attn_decode(q, torch.zeros(16, device=device), ring, torch.zeros(1, dtype=torch.int32, device=device),
                             torch.zeros(1, dtype=torch.int32, device=device), None, None,
                             torch.zeros(1, 0, dtype=torch.int32, device=device))
    torch.testing.assert_close(out[0], (ring[0, 0].float() / 2).bfloat16().expand(16, -1), rtol=0, atol=0)


def _extend_case(q_lens, prefix_lens, heads, k, page_size, device):
    """Per sequence: `prefix` earlier window rows then the query tokens' rows; positions continue
    from a start position; entries available per query = (p + 1) // 4."""
    starts = [max(pl, 200 * i) for i, pl in enumerate(prefix_lens)]  # a sequence may start mid-stream
    kv_lens = [pl + ql for pl, ql in zip(prefix_lens, q_lens, strict=True)]
    n_entries = [(s + ql) // 4 for s, ql in zip(starts, q_lens, strict=True)]
    pool, table = _paged_pool(n_entries, page_size, device)
    idx_rows = []
    for s, ql in zip(starts, q_lens, strict=True):
        for j in range(ql):
            idx_rows.append(_selection([(s + j + 1) // 4], k, device)[0])
    t = sum(q_lens)
    return dict(
        q=torch.randn(t, heads, 512, device=device).bfloat16(),
        sink=torch.randn(heads, device=device),
        kv=_model_kv(sum(kv_lens), device=device),
        cu_seqlens_q=torch.tensor([0, *q_lens], device=device).cumsum(0).int(),
        cu_seqlens_kv=torch.tensor([0, *kv_lens], device=device).cumsum(0).int(),
        cmp_kv=pool, page_table=table,
        cmp_idx=torch.stack(idx_rows) if idx_rows else torch.zeros(0, k, dtype=torch.int32, device=device),
    )


def _extend_ref(case):
    start, end, q_seq = extend_window_ranges(case["cu_seqlens_q"], case["cu_seqlens_kv"])
    return sparse_attn_ref(case["q"], case["sink"], case["kv"], start, end, case["cmp_kv"], case["page_table"],
                           case["cmp_idx"], q_seq)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("q_lens,prefix_lens,k", [([1], [0], 16), ([23, 5, 1], [0, 127, 60], 16)])
def test_extend_matches_reference(q_lens, prefix_lens, k, fp8, device, force_triton):
    case = _extend_case(q_lens, prefix_lens, heads=16, k=k, page_size=16, device=device)
    ref = _extend_ref(case)
    if fp8:
        case = {**case, "kv": pack_kv_fp8(case["kv"]), "cmp_kv": pack_kv_fp8(case["cmp_kv"])}
    with poisoned_outputs():
        out = sparse_attn_extend(**case)
    assert rel_err(out, ref) < TOL


def test_extend_window_is_causal_and_128_wide(device):
    start, end, q_seq = extend_window_ranges(torch.tensor([0, 3, 203], device=device),
                                             torch.tensor([0, 5, 205], device=device))
    assert q_seq.tolist() == [0, 0, 0] + [1] * 200
    assert (start[:3].tolist(), end[:3].tolist()) == ([0, 0, 0], [3, 4, 5])  # 2 prefix rows, then the queries
    assert (end - start).max().item() == 128 and end[-1].item() == 205 and start[-1].item() == 205 - 128


def test_bad_inputs_name_the_field(device):
    case = _decode_case([10], heads=4, k=4, page_size=4, device=device)
    with pytest.raises(ValueError, match="sink"):
        sparse_attn_decode(**{**case, "sink": torch.zeros(5, device=device)})
    with pytest.raises(ValueError, match="win_ring"):
        sparse_attn_decode(**{**case, "win_ring": case["win_ring"][:, :64]})


GPU_CONFIGS = {"default": {}, "no_resolve": dict(resolve=False), "v2": dict(v_splits=2),
               "n64s2": dict(block_n=64, num_stages=2), "split5resolve": dict(num_splits=5, resolve=True)}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("config", list(GPU_CONFIGS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_decode_full_shapes_gpu(batch, fp8, config):
    """V4-Flash: 64 heads x 512, window 128 + top-512 of up to 64K-token contexts, page size 64."""
    positions = torch.randint(1, 65536, (batch,)).tolist()
    positions[0] = 700  # fewer than 512 entries
    if batch > 1:
        positions[1] = 77  # window not full, fewer than 32 entries
    case = _decode_case(positions, heads=64, k=512, page_size=64, device="cuda", shuffle_pad=True)
    ref = _decode_ref(case)
    if fp8:
        case = _as_fp8(case)
    start, end = decode_window_ranges(case["win_slot"], case["positions"])
    q_seq = torch.arange(batch, dtype=torch.int32, device="cuda")
    with poisoned_outputs():
        out = sparse_attn_triton(case["q"], case["sink"], case["win_ring"].flatten(0, 1), start, end, case["cmp_kv"],
                                 case["page_table"], case["cmp_idx"], q_seq, **GPU_CONFIGS[config])
    assert rel_err(out, ref) < TOL


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_replays_in_cuda_graph(batch):
    """Captured once, replayed with new inputs (the combine kernel is a programmatic dependent launch on
    Hopper: its edge to the split kernel must survive graph capture)."""
    case = _decode_case([5000] * batch, heads=64, k=512, page_size=64, device="cuda")
    start, end = decode_window_ranges(case["win_slot"], case["positions"])
    q_seq = torch.arange(batch, dtype=torch.int32, device="cuda")

    def attend():
        return sparse_attn_triton(case["q"], case["sink"], case["win_ring"].flatten(0, 1), start, end, case["cmp_kv"],
                                  case["page_table"], case["cmp_idx"], q_seq)

    attend()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend()
    for _ in range(3):
        case["q"].copy_(torch.randn_like(case["q"]))
        case["sink"].copy_(torch.randn_like(case["sink"]))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, _decode_ref(case)) < TOL


@pytest.mark.gpu
@requires_gpu
def test_extend_full_shapes_gpu():
    case = _extend_case([300, 77], [0, 127], heads=64, k=512, page_size=64, device="cuda")
    ref = _extend_ref(case)
    with poisoned_outputs():
        out = sparse_attn_extend(**case)
    assert rel_err(out, ref) < TOL
