"""The model's functional ops (`dsv4_agent.model.ops`) give the same results through the Triton kernels
(DSV4_KERNELS=triton; interpreted on CPU) as through their own PyTorch bodies (DSV4_KERNELS=torch)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, rel_err

from dsv4_agent.model import ops


def _both(monkeypatch, fn):
    monkeypatch.setenv("DSV4_KERNELS", "torch")
    ref = fn()
    monkeypatch.setenv("DSV4_KERNELS", "triton")
    return ref, fn()


@pytest.mark.parametrize("n,d", [(3, 64), (1, 4096)] if DEVICE == "cuda" else [(3, 64)])
def test_hc_pre_post(n, d, monkeypatch):
    x = torch.randn(n, 4, d, device=DEVICE).bfloat16()
    fn, scale, base = torch.randn(24, 4 * d, device=DEVICE) * 0.05, torch.rand(3, device=DEVICE) + 0.5, \
        torch.randn(24, device=DEVICE)
    ref, out = _both(monkeypatch, lambda: ops.hc_pre(x, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20))
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == r.dtype and rel_err(o, r) < 1e-3
    v = torch.randn(n, d, device=DEVICE).bfloat16()
    ref, out = _both(monkeypatch, lambda: ops.hc_post(v, x, ref[1], ref[2]))
    assert rel_err(out, ref) < 1e-3


def test_sparse_attention(monkeypatch):
    heads, dim = (64, 512) if DEVICE == "cuda" else (8, 128)
    q = torch.randn(5, heads, dim, device=DEVICE).bfloat16()
    kv = torch.randn(300, dim, device=DEVICE).bfloat16()
    idx = torch.stack([torch.randperm(300, device=DEVICE)[:40] for _ in range(5)])
    idx[1, 7:] = -1
    idx[2] = -1  # a query with only the sink
    sink = torch.randn(heads, device=DEVICE)
    ref, out = _both(monkeypatch, lambda: ops.sparse_attention(q, kv, idx, sink, dim**-0.5, True))
    assert rel_err(out, ref) < 5e-3


def test_indexer_topk_same_set(monkeypatch):
    scores = torch.randn(4, 3000, device=DEVICE)
    n_avail = torch.tensor([3000, 10, 0, 2999], device=DEVICE)
    ref, out = _both(monkeypatch, lambda: ops.indexer_topk(scores, n_avail, 64))
    assert out.dtype == ref.dtype == torch.long and out.shape == ref.shape
    for o, r in zip(out, ref, strict=True):
        assert sorted(o.tolist()) == sorted(r.tolist())


@pytest.mark.parametrize("n,N", [(1, 1), (5, 77), (3, 200)])
def test_indexer_scores_bf16(n, N, monkeypatch):
    """Released precision (bf16 intermediates): equal up to the fp32 summation order (one bf16 ulp, rarely)."""
    q = ops.fp4_sim(torch.randn(n, 16, 128, device=DEVICE).bfloat16())
    keys = ops.fp4_sim(torch.randn(N, 128, device=DEVICE).bfloat16())
    w = torch.randn(n, 16, device=DEVICE).bfloat16()
    ref, out = _both(monkeypatch, lambda: ops.indexer_scores(q, w, keys, torch.bfloat16))
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape == (n, N)
    assert rel_err(out, ref) < 1e-3 and (out == ref).float().mean() > 0.98
