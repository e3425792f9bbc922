"""Compressor entry formation (CSA overlap / HCA; main and indexer post-processing) vs the fp32
reference, in bulk and incrementally, with the partial-state ring carried between calls."""

from __future__ import annotations

import pytest
import torch
from dsv4_agent.kernels import compress_tokens, compress_tokens_ref, unpack_kv_fp8
from kernel_helpers import rel_err, requires_gpu


def _yarn_inv_freq(device, base=160000.0, factor=16.0, orig=65536, beta_fast=32, beta_slow=1):
    """§2.2 YaRN-adjusted frequencies of the 32 rope pairs."""
    import math

    theta = 1.0 / base ** (torch.arange(0, 64, 2, dtype=torch.float32, device=device) / 64)
    corr = lambda n: 64 * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), 63)
    ramp = ((torch.arange(32, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
    return theta / factor * ramp + theta * (1 - ramp)


class Layer:
    """One compressor's parameters and state buffers; `run` feeds a batch of new-token runs."""

    def __init__(self, ratio, c, indexer, page_size, n_seq, device, pack=False, dtype=torch.float32):
        self.ratio, self.indexer, self.pack, self.dtype = ratio, indexer, pack, dtype
        self.kappa = 2 if ratio == 4 else 1
        kc = self.kappa * c
        self.kc, self.c, self.device = kc, c, device
        self.ape = torch.randn(ratio, kc, device=device)
        self.norm_weight = torch.rand(c, device=device) + 0.5
        self.inv_freq = _yarn_inv_freq(device)
        rows = self.kappa * ratio
        self.state_kv = torch.randn(n_seq + 1, rows, kc, device=device)  # garbage rows must not leak in
        self.state_score = torch.randn(n_seq + 1, rows, kc, device=device)
        self.slots = torch.randperm(n_seq + 1, device=device)[:n_seq].int()
        pages_per_seq = 8
        self.page_table = torch.randperm(n_seq * pages_per_seq + 1, device=device)[: n_seq * pages_per_seq]
        self.page_table = self.page_table.view(n_seq, -1).int()
        width = 584 if pack else c
        dt = torch.uint8 if pack else torch.bfloat16
        self.pool = torch.zeros(n_seq * pages_per_seq + 1, page_size, width, device=device, dtype=dt)
        if not pack:
            self.pool.fill_(float("nan"))  # entries not written stay NaN

    def clone_state(self):
        return self.state_kv.clone(), self.state_score.clone(), self.pool.clone()

    def run(self, lens, starts, fn, state):
        n = sum(lens)
        kv = torch.randn(n, self.kc, device=self.device).to(self.dtype)
        score = (2 * torch.randn(n, self.kc, device=self.device)).to(self.dtype)
        cu = torch.tensor([0, *lens], device=self.device).cumsum(0).int()
        st_kv, st_score, pool = state
        fn(kv, score, self.ape, self.norm_weight, self.inv_freq, cu,
           torch.tensor(starts, dtype=torch.int32, device=self.device), st_kv, st_score, self.slots[: len(lens)],
           pool, self.page_table, self.ratio, self.indexer)
        return kv, score


def _run_both(layer, lens, starts, kernel=compress_tokens, seed=7):
    """The same random new tokens through the reference and through `kernel`, each on its own copy of
    the layer's state: returns (reference state, kernel state)."""
    ref_state, out_state = layer.clone_state(), layer.clone_state()
    torch.manual_seed(seed)
    layer.run(lens, starts, compress_tokens_ref, ref_state)
    torch.manual_seed(seed)
    layer.run(lens, starts, kernel, out_state)
    return ref_state, out_state


def _compare(layer, ref_state, out_state, tol):
    ref_pool, out_pool = ref_state[2], out_state[2]
    if layer.pack:
        ref_pool, out_pool = unpack_kv_fp8(ref_pool), unpack_kv_fp8(out_pool)
    written = ~torch.isnan(ref_pool.float())
    assert torch.equal(written, ~torch.isnan(out_pool.float())), "entries written differ from the reference"
    assert rel_err(out_pool[written], ref_pool[written]) < tol
    torch.testing.assert_close(out_state[0], ref_state[0], rtol=0, atol=0)
    torch.testing.assert_close(out_state[1], ref_state[1], rtol=1e-6, atol=1e-6)


CASES = {
    "csa_main_mixed": (4, 128, False, [1, 7, 13], [0, 3, 9]),
    "csa_indexer": (4, 128, True, [13, 5, 4], [0, 2, 8]),
    "hca16_lengths_not_multiple": (16, 128, False, [40, 3, 17], [0, 13, 60]),
    "hca128_one_block_from_state": (128, 64 * 2, False, [130, 1], [5, 127]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bulk_matches_reference(name, device, force_triton):
    ratio, c, indexer, lens, starts = CASES[name]
    layer = Layer(ratio, c, indexer, page_size=4, n_seq=len(lens), device=device)
    ref_state, out_state = _run_both(layer, lens, starts)
    _compare(layer, ref_state, out_state, tol=1e-2)


def test_fp8_packed_pool_and_bf16_inputs(device, force_triton):
    layer = Layer(4, 512, False, page_size=4, n_seq=2, device=device, pack=True, dtype=torch.bfloat16)
    ref_state, out_state = _run_both(layer, [9, 6], [0, 7], seed=3)
    ref_vals, out_vals = unpack_kv_fp8(ref_state[2]).float(), unpack_kv_fp8(out_state[2]).float()
    assert rel_err(out_vals, ref_vals) < 1e-2 and (ref_vals != 0).any()


@pytest.mark.parametrize("ratio,indexer", [(4, False), (4, True), (16, False)])
def test_prefill_then_decode_equals_one_bulk_call(ratio, indexer, device, force_triton):
    """Chunked prefill + single-token decode steps form the same entries as one bulk prefill."""
    total, first = 3 * ratio + 3, ratio + 1
    bulk = Layer(ratio, 128, indexer, page_size=4, n_seq=1, device=device)
    bulk.state_kv.zero_()
    kv = torch.randn(total, bulk.kc, device=device)
    score = torch.randn(total, bulk.kc, device=device)
    args = (bulk.ape, bulk.norm_weight, bulk.inv_freq)

    def call(state, lo, hi):
        cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=device)
        compress_tokens(kv[lo:hi], score[lo:hi], *args, cu, torch.tensor([lo], dtype=torch.int32, device=device),
                        state[0], state[1], bulk.slots, state[2], bulk.page_table, ratio, indexer)

    one_shot, stepped = bulk.clone_state(), bulk.clone_state()
    call(one_shot, 0, total)
    call(stepped, 0, first)
    for p in range(first, total):
        call(stepped, p, p + 1)
    written = ~torch.isnan(one_shot[2].float())
    assert int(written.any(-1).sum()) == total // ratio
    torch.testing.assert_close(stepped[2], one_shot[2], rtol=0, atol=0, equal_nan=True)


def test_bad_state_shape_names_the_field(device):
    layer = Layer(4, 128, False, page_size=4, n_seq=1, device=device)
    with pytest.raises(ValueError, match="state_kv"):
        layer.run([4], [0], compress_tokens, (layer.state_kv[:, :4], layer.state_score, layer.pool))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("ratio,c,indexer", [(4, 512, False), (4, 128, True), (128, 512, False)])
def test_full_shapes_gpu(ratio, c, indexer):
    lens, starts = [1000, 1, 300], [0, 4095, 1 << 19]
    layer = Layer(ratio, c, indexer, page_size=64, n_seq=3, device="cuda")
    layer.page_table = torch.arange(3 * 8200, device="cuda").view(3, -1).int()  # room for 512K-token positions
    layer.pool = torch.full((3 * 8200, 64, c), float("nan"), device="cuda", dtype=torch.bfloat16)
    ref_state, out_state = _run_both(layer, lens, starts, seed=5)
    _compare(layer, ref_state, out_state, tol=1e-2)


def test_hadamard_dot_variant_matches_reference(device):
    """The indexer compressor's tensor-core Hadamard product (alternative to the default butterflies)."""
    from functools import partial

    from dsv4_agent.kernels.triton_compressor import compress_tokens_triton

    layer = Layer(4, 128, True, page_size=4, n_seq=2, device=device)
    ref_state, out_state = _run_both(layer, [9, 6], [0, 3], partial(compress_tokens_triton, hadamard="dot"),
                                     seed=11)
    _compare(layer, ref_state, out_state, tol=1e-2)


@pytest.mark.parametrize("name,split,rows", [("hca128_one_block_from_state", 2, 32), ("hca16_lengths_not_multiple", 4, 16),
                                             ("csa_main_mixed", 2, 8), ("csa_indexer", 4, 4)])
def test_channel_split_matches_reference(name, split, rows, device):
    """Each entry's channels pooled by `split` programs, the last one post-processing (the bulk path for
    few long entries)."""
    from functools import partial

    from dsv4_agent.kernels.triton_compressor import compress_tokens_triton

    ratio, c, indexer, lens, starts = CASES[name]
    layer = Layer(ratio, c, indexer, page_size=4, n_seq=len(lens), device=device)
    ref_state, out_state = _run_both(layer, lens, starts, partial(compress_tokens_triton, split=split, rows=rows),
                                     seed=13)
    _compare(layer, ref_state, out_state, tol=1e-2)
