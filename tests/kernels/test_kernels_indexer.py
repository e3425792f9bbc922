"""Indexer scoring and radix top-k vs the fp32 reference (bf16 and FP8 key layouts, causal availability,
fewer entries than k, ties)."""

from __future__ import annotations

import pytest
import torch
from dsv4_agent.kernels import (
    fp4_fake_quant,
    indexer_scores,
    indexer_scores_ref,
    indexer_topk,
    pack_index_keys_fp8,
    topk_indices,
    topk_indices_ref,
    unpack_index_keys_fp8,
)
from kernel_helpers import POISON_INT, poisoned_outputs, rel_err, requires_gpu


def assert_same_selection(out: torch.Tensor, scores: torch.Tensor, n_avail: torch.Tensor, k: int) -> None:
    """`out` selects min(k, n) distinct available entries whose scores equal the top-k multiset
    (so exact ties may pick either index), and pads the rest with -1."""
    ref = topk_indices_ref(scores, n_avail, k)
    assert out.shape == ref.shape and out.dtype == torch.int32
    assert not (out == POISON_INT).any(), "unwritten top-k slot"
    for i in range(out.shape[0]):
        want = min(k, int(n_avail[i]), scores.shape[1])
        chosen = out[i][out[i] >= 0]
        assert chosen.numel() == want and bool((out[i][out[i] < 0] == -1).all())
        assert chosen.unique().numel() == want and bool((chosen < max(int(n_avail[i]), 0)).all())
        got = scores[i, chosen.long()].sort().values
        exp = scores[i, ref[i][ref[i] >= 0].long()].sort().values
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize(
    "rows,n_cols,k",
    [
        ([0, 5, 1000, 777], 1000, 16),  # nothing available, fewer than k, full, partial
        ([10000, 9000, 4097], 10000, 100),  # several chunks per row
        ([50, 3], 50, 64),  # k larger than the row
        ([1], 1, 1),
    ],
)
def test_topk_random(rows, n_cols, k, device, force_triton):
    scores = torch.randn(len(rows), n_cols, device=device)
    n_avail = torch.tensor(rows, dtype=torch.int32, device=device)
    with poisoned_outputs():
        out = topk_indices(scores, n_avail, k)
    assert_same_selection(out, scores, n_avail, k)


@pytest.mark.parametrize("kind,n", [("few_values", 3000), ("all_equal", 3000), ("relu_zeros", 3000),
                                    ("all_equal", 9000)])  # the last: more candidates than one register tile
def test_topk_ties(kind, n, device, force_triton):
    if kind == "few_values":
        scores = torch.randint(0, 5, (2, n), device=device).float()
    elif kind == "all_equal":
        scores = torch.zeros(2, n, device=device)
    else:  # mostly exact zeros, a few positive and negative: the ReLU-weighted case
        scores = torch.randn(2, n, device=device).clamp(min=0) * (torch.rand(2, n, device=device) < 0.01)
        scores[:, :7] = -1.0
    n_avail = torch.tensor([n, n - 1], dtype=torch.int32, device=device)
    with poisoned_outputs():
        out = topk_indices(scores, n_avail, 64)
    assert_same_selection(out, scores, n_avail, 64)


@pytest.mark.parametrize("rank_block", [16, 128])
@pytest.mark.parametrize("kind", ["sorted", "reversed", "random", "ties_across_chunks"])
def test_topk_small_tiles(kind, rank_block, device):
    """Many programs per row, candidates from several programs through the shared list, resolved by rank
    (short list) or by histograms (in one tile or streamed), at small sizes."""
    from dsv4_agent.kernels.triton_indexer import topk_indices_triton

    n = 3001
    if kind == "sorted":
        scores = torch.linspace(-3, 3, n, device=device).repeat(3, 1)
    elif kind == "reversed":
        scores = torch.linspace(3, -3, n, device=device).repeat(3, 1)
    elif kind == "random":
        scores = torch.randn(3, n, device=device)
    else:  # the k-th score repeated in every chunk, more copies than needed
        scores = torch.randn(3, n, device=device)
        scores[:, ::37] = 2.0
    n_avail = torch.tensor([n, 2999, 130], dtype=torch.int32, device=device)
    with poisoned_outputs():
        out = topk_indices_triton(scores, n_avail, 100, chunk=256, block=32, rank_block=rank_block, num_warps=4)
    assert_same_selection(out, scores, n_avail, 100)


def test_topk_leaves_its_workspace_at_zero(device):
    """The histograms and counters live in a persistent workspace (no zero fill per call): every call
    leaves the rows it used at zero, so a repeated call selects the same entries."""
    from dsv4_agent.kernels.triton_indexer import NBINS, topk_indices_triton
    from dsv4_agent.kernels.triton_utils import zeroed_workspace

    scores = torch.randn(3, 5000, device=device)
    n_avail = torch.tensor([5000, 100, 3001], dtype=torch.int32, device=device)
    first = topk_indices_triton(scores, n_avail, 200)
    assert not zeroed_workspace(torch.device(device), 3 * (2 * NBINS + 4)).any()
    again = topk_indices_triton(scores, n_avail, 200)  # the same set; its order follows the programs' atomics
    assert torch.equal(again.sort(dim=-1).values, first.sort(dim=-1).values)
    assert_same_selection(first, scores, n_avail, 200)


def test_topk_empty_batch_and_zero_k(device, force_triton):
    assert topk_indices(torch.randn(0, 10, device=device), torch.zeros(0, dtype=torch.int32, device=device), 4).shape == (0, 4)
    assert topk_indices(torch.randn(2, 10, device=device), torch.full((2,), 10, dtype=torch.int32, device=device), 0).shape == (2, 0)


def _index_case(n_avail: list[int], q_seq: list[int], heads: int, page_size: int, device, dim: int = 128):
    n_seq = max(q_seq) + 1 if q_seq else 1
    n_max = max(n_avail, default=0)
    pages_per_seq = max(1, -(-n_max // page_size))
    total = n_seq * pages_per_seq + 1
    keys = fp4_fake_quant(torch.randn(total, page_size, dim, device=device))  # FP4-simulated like the model
    table = torch.randperm(total, device=device)[: n_seq * pages_per_seq].view(n_seq, -1).int()
    t = len(n_avail)
    return dict(
        q=fp4_fake_quant(torch.randn(t, heads, dim, device=device)),
        weights=(torch.randn(t, heads, device=device) * heads**-0.5).bfloat16(),
        keys=keys, page_table=table,
        q_seq=torch.tensor(q_seq, dtype=torch.int32, device=device),
        n_avail=torch.tensor(n_avail, dtype=torch.int32, device=device),
        n_max=n_max,
    )


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize(
    "n_avail,q_seq",
    [([37], [0]), ([0, 1, 2, 130, 131], [0, 0, 0, 0, 0]), ([5, 300, 64], [2, 0, 1])],
    ids=["decode1", "prefill_causal", "mixed_batch"],
)
def test_scores_match_reference(n_avail, q_seq, fp8, device, force_triton):
    case = _index_case(n_avail, q_seq, heads=16, page_size=16, device=device)
    ref = indexer_scores_ref(**case)
    if fp8:
        packed = pack_index_keys_fp8(case["keys"])
        torch.testing.assert_close(unpack_index_keys_fp8(packed, 16, 128), case["keys"], rtol=0, atol=0)
        case = {**case, "keys": packed, "page_size": 16}
    with poisoned_outputs():
        out = indexer_scores(**case)
    avail = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), avail) and bool((out[~avail] == float("-inf")).all())
    if avail.any():
        assert rel_err(out[avail], ref[avail]) < 1e-5


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("block_n,tiles_per_program", [(64, 1), (32, 3), (128, 2)])
def test_scores_tilings(fp8, block_n, tiles_per_program, device):
    """Programs that loop over several entry tiles (strided), and other tile sizes, agree with the reference."""
    from dsv4_agent.kernels.triton_indexer import indexer_scores_triton

    case = _index_case([5, 300, 64, 1, 0], [2, 0, 1, 1, 0], heads=16, page_size=16, device=device)
    ref = indexer_scores_ref(**case)
    if fp8:
        case = {**case, "keys": pack_index_keys_fp8(case["keys"]), "page_size": 16}
    with poisoned_outputs():
        out = indexer_scores_triton(**case, block_n=block_n, tiles_per_program=tiles_per_program)
    avail = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), avail) and bool((out[~avail] == float("-inf")).all())
    assert rel_err(out[avail], ref[avail]) < 1e-5


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_scores_with_bf16_intermediates(fp8, device, force_triton):
    """The model's released-precision rounding (dots, weighted terms, head sum in bf16): the kernel equals the
    reference up to the fp32 summation order, which moves a rare value by one bf16 ulp."""
    case = _index_case([0, 1, 77, 300], [0, 1, 1, 2], heads=16, page_size=16, device=device)
    ref = indexer_scores_ref(**case, bf16_intermediates=True)
    if fp8:
        case = {**case, "keys": pack_index_keys_fp8(case["keys"]), "page_size": 16}
    with poisoned_outputs():
        out = indexer_scores(**case, bf16_intermediates=True)
    avail = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), avail)
    assert torch.equal(out[avail].bfloat16().float(), out[avail])  # bf16 values
    assert rel_err(out[avail], ref[avail]) < 1e-3
    assert (out[avail] == ref[avail]).float().mean() > 0.99
    assert not torch.equal(ref, indexer_scores_ref(**case))  # the option changes the result


def test_indexer_topk_end_to_end(device, force_triton):
    case = _index_case([3, 200, 90], [0, 1, 1], heads=16, page_size=32, device=device)
    with poisoned_outputs():
        sel = indexer_topk(**case, k=64)
    assert_same_selection(sel, indexer_scores_ref(**case), case["n_avail"], 64)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_indexer_full_shapes_gpu(fp8):
    """V4-Flash: 64 heads x 128, top-512, up to 70K entries (280K tokens), batch 8, page size 64."""
    n_avail = [70000, 511, 512, 513, 1, 0, 33333, 4096]
    case = _index_case(n_avail, list(range(8)), heads=64, page_size=64, device="cuda")
    ref = indexer_scores_ref(**case)
    if fp8:
        case = {**case, "keys": pack_index_keys_fp8(case["keys"]), "page_size": 64}
    with poisoned_outputs():
        out = indexer_scores(**case)
        sel = topk_indices(out, case["n_avail"], 512)
    avail = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), avail)
    assert rel_err(out[avail], ref[avail]) < 1e-5
    assert_same_selection(sel, out, case["n_avail"], 512)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("block_n,tiles_per_program", [(64, 1), (64, 4), (128, 4)])
def test_indexer_tilings_full_shapes_gpu(block_n, tiles_per_program):
    from dsv4_agent.kernels.triton_indexer import indexer_scores_triton

    n_avail = [65537, 513, 1, 0]
    case = _index_case(n_avail, list(range(4)), heads=64, page_size=64, device="cuda")
    ref = indexer_scores_ref(**case)
    case = {**case, "keys": pack_index_keys_fp8(case["keys"]), "page_size": 64}
    with poisoned_outputs():
        out = indexer_scores_triton(**case, block_n=block_n, tiles_per_program=tiles_per_program)
    avail = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), avail)
    assert rel_err(out[avail], ref[avail]) < 1e-5


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("kind", ["randn", "ties", "sorted"])
def test_topk_256k_gpu(kind):
    """top-512 of 256K scores, batch 1 and a mixed batch (fewer than k, lengths not multiple of 4 / 128)."""
    n = 1 << 18
    for rows in ([n], [n, 511, 100003, 0, 262139]):
        scores = torch.randn(len(rows), n, device="cuda")
        if kind == "ties":
            scores = scores.round(decimals=1)
        elif kind == "sorted":
            scores = scores.sort(-1).values
        n_avail = torch.tensor(rows, dtype=torch.int32, device="cuda")
        for _ in range(3):  # the last-arriving program differs run to run
            with poisoned_outputs():
                out = topk_indices(scores, n_avail, 512)
            assert_same_selection(out, scores, n_avail, 512)


@pytest.mark.gpu
@requires_gpu
def test_topk_replays_in_cuda_graph():
    """Captured once, replayed on new scores: the workspace zeroes itself between replays, and on Hopper
    the programmatic dependent launches keep their order through graph capture."""
    n = 1 << 18
    scores = torch.randn(2, n, device="cuda")
    n_avail = torch.tensor([n, 100003], dtype=torch.int32, device="cuda")
    topk_indices(scores, n_avail, 512)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = topk_indices(scores, n_avail, 512)
    for _ in range(3):
        scores.copy_(torch.randn_like(scores))
        graph.replay()
        torch.cuda.synchronize()
        assert_same_selection(out, scores, n_avail, 512)
