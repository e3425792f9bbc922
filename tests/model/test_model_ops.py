"""The functional ops against plain float64 references on fresh random inputs at several (awkward) shapes."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4_agent.model import ops

G = torch.Generator().manual_seed(1234)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("nb,m,c,overlap", [(1, 4, 8, True), (5, 4, 16, True), (3, 16, 8, False), (2, 128, 4, False),
                                            (1, 1, 3, False)])
def test_compress_entries(nb, m, c, overlap):
    k = 2 if overlap else 1
    kv, score = randn(nb, m, k * c), randn(nb, m, k * c, scale=3)
    prev_kv, prev_score = (randn(nb, m, k * c), randn(nb, m, k * c, scale=3)) if overlap else (None, None)
    if overlap:
        prev_score[0] = float("-inf")  # block 0 has no predecessor
    got = ops.compress_entries(kv, score, prev_kv, prev_score)
    want = torch.zeros(nb, c, dtype=torch.float64)
    for b in range(nb):
        for j in range(c):
            cands = [(score[b, t, j + (c if overlap else 0)], kv[b, t, j + (c if overlap else 0)]) for t in range(m)]
            if overlap:
                cands += [(prev_score[b, t, j], prev_kv[b, t, j]) for t in range(m)]
            s = torch.tensor([float(x) for x, _ in cands], dtype=torch.float64)
            v = torch.tensor([float(y) for _, y in cands], dtype=torch.float64)
            want[b, j] = (torch.softmax(s, 0) * v).sum()
    assert rel(got, want) <= 1e-6


@pytest.mark.parametrize("n,H,D,N", [(1, 1, 32, 1), (7, 4, 64, 13), (3, 16, 128, 40), (0, 2, 32, 5)])
def test_indexer_scores_and_topk(n, H, D, N):
    q, w, keys = randn(n, H, D), randn(n, H), randn(N, D)
    got = ops.indexer_scores(q, w, keys, torch.float32)
    want = (w.double()[..., None] * torch.relu(torch.einsum("nhd,kd->nhk", q.double(), keys.double()))).sum(1)
    if n:
        assert rel(got, want) <= 1e-5
    n_avail = torch.randint(0, N + 1, (n,), generator=G)
    for k in (1, 3, N + 2):
        sel = ops.indexer_topk(got, n_avail, k)
        assert sel.shape == (n, min(k, N))
        for t in range(n):
            avail = int(n_avail[t])
            expect = set(torch.argsort(want[t, :avail], descending=True)[: min(k, avail)].tolist())
            chosen = set(sel[t][sel[t] >= 0].tolist())
            assert chosen == expect and (sel[t] < 0).sum() == min(k, N) - len(expect)


def dense_sink_attention(q, kv, idx, sink, scale):
    """float64 softmax over the listed keys plus one sink key with value 0."""
    n, H, D = q.shape
    out = torch.zeros(n, H, D, dtype=torch.float64)
    for t in range(n):
        rows = idx[t][idx[t] >= 0]
        keys = kv[rows].double()
        logits = torch.cat([(q[t].double() @ keys.T) * scale, sink.double()[:, None]], dim=1)
        p = torch.softmax(logits, dim=1)
        out[t] = p[:, :-1] @ keys
    return out


@pytest.mark.parametrize("n,H,D,N,K", [(1, 1, 16, 1, 1), (5, 4, 64, 37, 20), (9, 8, 128, 150, 70), (3, 2, 32, 6, 6)])
def test_sparse_attention(n, H, D, N, K):
    q, kv, sink = randn(n, H, D, scale=0.3), randn(N, D), randn(H)
    idx = torch.stack([torch.randperm(N, generator=G)[:K] for _ in range(n)]) if N >= K else None
    idx[torch.rand(n, K, generator=G) < 0.3] = -1
    idx[0] = -1  # a query with no key at all: only the sink, output 0
    want = dense_sink_attention(q, kv, idx, sink, D**-0.5)
    got = ops.sparse_attention(q, kv, idx, sink, D**-0.5, bf16_probs=False)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1)
    rough = ops.sparse_attention(q, kv, idx, sink, D**-0.5, bf16_probs=True)
    assert (rough.double() - want).abs().max() <= 1e-2 * want.abs().max().clamp_min(1)
    assert ops.sparse_attention(q[:0], kv, idx[:0], sink, 1.0, False).shape == (0, H, D)


def sinkhorn_ref(mixes, scale, base, hc, iters, eps):
    mixes, scale, base = mixes.double(), scale.double(), base.double()
    pre = torch.sigmoid(scale[0] * mixes[:, :hc] + base[:hc]) + eps
    post = 2 * torch.sigmoid(scale[1] * mixes[:, hc:2 * hc] + base[hc:2 * hc])
    c = torch.softmax((scale[2] * mixes[:, 2 * hc:] + base[2 * hc:]).view(-1, hc, hc), -1) + eps
    c = c / (c.sum(1, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(2, keepdim=True) + eps)
        c = c / (c.sum(1, keepdim=True) + eps)
    return pre, post, c


@pytest.mark.parametrize("n,hc,d", [(1, 4, 8), (6, 4, 33), (3, 2, 16), (0, 4, 8)])
def test_mhc_pre_post_head(n, hc, d):
    mix = (2 + hc) * hc
    x, fn, base, scale = randn(n, hc, d), randn(mix, hc * d, scale=0.1), randn(mix), randn(3).abs()
    u, post, comb = ops.hc_pre(x, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6, iters=20)
    z = x.double().flatten(1)
    mixes = (z @ fn.double().T) / torch.sqrt(z.square().mean(-1, keepdim=True) + 1e-6)
    pre_r, post_r, comb_r = sinkhorn_ref(mixes, scale, base, hc, 20, 1e-6)
    if n:
        assert rel(u, (pre_r[..., None] * x.double()).sum(1)) <= 1e-5
        assert rel(post, post_r) <= 1e-5 and rel(comb, comb_r) <= 1e-5
        assert torch.allclose(comb.sum(1), torch.ones(n, hc), atol=1e-4)  # column-normalized
    v = randn(n, d)
    got = ops.hc_post(v, x, post, comb)
    want = post.double()[..., None] * v.double()[:, None] + torch.einsum("njk,njd->nkd", comb.double(), x.double())
    if n:
        assert rel(got, want) <= 1e-5
    fnh, baseh, scaleh = randn(hc, hc * d, scale=0.1), randn(hc), randn(1)
    h = ops.hc_head(x, fnh, scaleh, baseh, norm_eps=1e-6, hc_eps=1e-6)
    w = torch.sigmoid(scaleh.double() * (z @ fnh.double().T) / torch.sqrt(z.square().mean(-1, keepdim=True) + 1e-6)
                      + baseh.double()) + 1e-6
    if n:
        assert rel(h, (w[..., None] * x.double()).sum(1)) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 64), (5, 3, 128), (2, 448)])
def test_rms_norm_rope_hadamard(shape):
    x, w = randn(*shape), randn(shape[-1])
    got = ops.rms_norm(x, w, 1e-6, torch.float32)
    want = w.double() * x.double() / torch.sqrt(x.double().square().mean(-1, keepdim=True) + 1e-6)
    assert rel(got, want) <= 1e-6
    assert ops.rms_norm(x, w, 1e-6, torch.bfloat16).dtype == torch.bfloat16
    pos = torch.randint(0, 100_000, (shape[0],), generator=G)
    freqs = ops.rope_frequencies(64, 160000.0, (64, 4.0, 32.0, 1.0))
    y = ops.rope_tail(x, pos, freqs)
    assert torch.equal(y[..., :-64], x[..., :-64])
    ang = (pos.float()[:, None] * freqs[None, :]).double()  # spec 2.2: the angle is rounded to fp32
    ang = ang.view(ang.shape[0], *([1] * (x.dim() - 2)), -1)
    xc = torch.view_as_complex(x[..., -64:].double().reshape(*x.shape[:-1], 32, 2).contiguous())
    want = torch.view_as_real(xc * torch.exp(1j * ang)).reshape(*x.shape[:-1], 64)
    assert (y[..., -64:].double() - want).abs().max() <= 1e-5 * x.abs().max()
    assert rel(ops.rope_tail(y, pos, freqs, inverse=True), x) <= 1e-6
    if shape[-1] in (64, 128):
        h = ops.hadamard(x)
        Hm = ops.hadamard_matrix(shape[-1]).double()
        assert torch.equal(Hm @ Hm.T, shape[-1] * torch.eye(shape[-1], dtype=torch.float64))
        assert rel(h, x.double() @ Hm / math.sqrt(shape[-1])) <= 1e-6


def test_yarn_frequencies_match_spec():
    """Spec 2.2: for base 160000 (Flash) pairs 0-15 keep their frequency, pairs >= 25 are divided by 16."""
    plain = ops.rope_frequencies(64, 160000.0, None)
    yarn = ops.rope_frequencies(64, 160000.0, (65536, 16.0, 32.0, 1.0))
    assert torch.equal(yarn[:16], plain[:16])
    assert torch.allclose(yarn[25:], plain[25:] / 16, rtol=1e-6)
    assert ((yarn[16:25] < plain[16:25]) & (yarn[16:25] > plain[16:25] / 16)).all()


@pytest.mark.parametrize("block,shape", [(64, (3, 448)), (128, (1, 128)), (32, (4, 96))])
def test_quantizer_properties(block, shape):
    x = randn(*shape) * torch.logspace(-6, 3, shape[-1])
    x[0, :block] = 0  # an all-zero block
    for sim, grid_max in ((lambda t: ops.fp8_sim(t, block), 448.0), (lambda t: ops.fp4_sim(t, block), 6.0)):
        y = sim(x)
        assert torch.equal(sim(y), y)  # idempotent: already on the grid
        assert (y[0, :block] == 0).all()
        amax = x.view(shape[0], -1, block).abs().amax(-1, keepdim=True)
        err = (y - x).view(shape[0], -1, block).abs()
        assert (err <= amax * (2**-3 if grid_max == 448.0 else 2**-1) + 1e-30).all()
    ties = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4])
    assert ops.fp4_sim(ties, 32)[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_route_and_swiglu():
    logits, bias = randn(9, 16, scale=3), randn(16)
    w, e = ops.route(logits, bias, None, 4, 2.5)
    sigma = torch.sqrt(torch.nn.functional.softplus(logits.double()))
    for t in range(9):
        want = set(torch.argsort(sigma[t] + bias.double(), descending=True)[:4].tolist())
        assert set(e[t].tolist()) == want
        assert rel(w[t], sigma[t, e[t]] / sigma[t, e[t]].sum() * 2.5) <= 1e-6
    hashed = torch.randint(0, 16, (9, 4), generator=G)
    w, e = ops.route(logits, None, hashed, 4, 1.5)
    assert torch.equal(e, hashed) and torch.allclose(w.sum(-1), torch.full((9,), 1.5))
    a, c = randn(5, 7, scale=20), randn(5, 7, scale=20)
    want = torch.nn.functional.silu(a.double().clamp(max=10)) * c.double().clamp(-10, 10)
    assert rel(ops.swiglu(a, c, 10.0), want) <= 1e-6
