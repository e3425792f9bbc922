"""The model's functional ops (`dsv4_agent.model.ops`) give the same results through the Triton kernels
(DSV4_KERNELS=triton; interpreted on CPU) as through their own PyTorch bodies (DSV4_KERNELS=torch)."""

from __future__ import annotations

import os

import pytest
import torch
from ground_truth import SHARED
from kernel_helpers import DEVICE, rel_err

from dsv4_agent.model import (
    DeepSeekV4Config,
    PagePool,
    Step,
    load_config,
    load_model,
    ops,
    save_random_checkpoint,
)


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


# ---------------------------------------------------------------------------------------------------------
# The whole model with the kernels forced on, against its PyTorch path (released numerics)
# ---------------------------------------------------------------------------------------------------------
def _same_selection(out, ref, args):
    scores = args[0]
    assert out.shape == ref.shape
    for o, r, s in zip(out, ref, scores, strict=True):  # equal up to exact ties: the same selected scores
        assert torch.equal(s[o[o >= 0]].sort().values, s[r[r >= 0]].sort().values)


def _close(tol):
    def check(out, ref, args):
        for o, r in zip(*((out, ref) if isinstance(out, tuple) else ((out,), (ref,))), strict=True):
            assert o.dtype == r.dtype and o.shape == r.shape and rel_err(o, r) < tol
    return check


# every op the model dispatches, with how close its Triton result must be to its PyTorch body on the same
# inputs: bf16 outputs one ulp apart now and then (different fp32 summation orders), entries also one FP8 / FP4
# code apart where such an ulp moved a value across a rounding boundary
DISPATCHED = {"hc_pre": _close(5e-3), "hc_post": _close(5e-3), "sparse_attention": _close(5e-3),
              "indexer_scores": _close(5e-3), "indexer_topk": _same_selection, "compress_blocks": _close(2e-2)}


@pytest.fixture
def checked_ops(monkeypatch):
    """Under DSV4_KERNELS=triton every dispatched op runs its Triton kernel and, on the same inputs, its PyTorch
    body; each call is checked (so a whole forward checks the kernels at the model's real layouts, rings and positions)
    and counted."""
    calls = dict.fromkeys(DISPATCHED, 0)
    for name, check in DISPATCHED.items():
        op = getattr(ops, name)

        def shadowed(*args, _op=op, _name=name, _check=check, **kw):
            if os.environ["DSV4_KERNELS"] != "triton":  # the PyTorch-path runs stay as they are
                return _op(*args, **kw)
            monkeypatch.setenv("DSV4_KERNELS", "torch")
            ref = _op(*args, **kw)
            monkeypatch.setenv("DSV4_KERNELS", "triton")
            out = _op(*args, **kw)
            _check(out, ref, args)
            calls[_name] += 1
            return out

        monkeypatch.setattr(ops, name, shadowed)
    return calls


def _logits(model, ids, prefix, chunks, kernels, monkeypatch, numerics="quant"):
    """Logits of the tokens after ``prefix`` (prefilled on the PyTorch path), run in ``chunks``."""
    monkeypatch.setenv("DSV4_KERNELS", "torch")
    seq = model.new_sequence(PagePool(model.config, 4, device=DEVICE))
    if prefix:
        model.forward([Step(seq, ids[:prefix])], numerics=numerics, compute_logits=False)
    monkeypatch.setenv("DSV4_KERNELS", kernels)
    out, pos = [], prefix
    for n in chunks:
        out.append(model.forward([Step(seq, ids[pos:pos + n])], numerics=numerics)[0].logits)
        pos += n
    return torch.cat(out)


@pytest.fixture(scope="module")
def golden_model():
    return load_model(SHARED / "conformance" / "model" / "t1-mixed").to(DEVICE)


@pytest.fixture(scope="module")
def smooth_model(tmp_path_factory):
    """A random tiny model with an HCA (m=128) and a CSA (m=4) layer, hash-routed and top-k >= entries: no
    discrete decision that an ulp could flip, so differences stay at rounding level end to end."""
    hf = load_config(SHARED / "conformance" / "model" / "t1-mixed").to_hf()
    hf.update(compress_ratios=[128, 4, 0], num_hidden_layers=2, num_hash_layers=2, index_topk=512, sliding_window=8,
              vocab_size=64)
    cfg = DeepSeekV4Config.from_hf(hf)
    return load_model(save_random_checkpoint(cfg, tmp_path_factory.mktemp("smooth"), seed=5)).to(DEVICE)


def _ids(model, n):
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(7)).to(DEVICE)


@pytest.mark.parametrize("prefix,chunks", [
    (0, [6, 1, 1]),  # prefill from position 0 (CSA block 0 without predecessor), decodes completing blocks
    (125, [4, 1]),  # crossing 128: the HCA entry from the ring + new tokens; top-16 of 32 CSA entries
])
def test_golden_model_quant_forward(prefix, chunks, golden_model, monkeypatch, checked_ops):
    ids = _ids(golden_model, prefix + sum(chunks))
    ref = _logits(golden_model, ids, prefix, chunks, "torch", monkeypatch)
    out = _logits(golden_model, ids, prefix, chunks, "triton", monkeypatch)
    assert all(checked_ops.values()), checked_ops  # every kernel ran inside the forward, each call agreeing
    # End to end the released numerics of this case are chaotic: an op's one-ulp bf16 difference moves an FP8
    # activation code or flips a routing / top-k decision, and the logits then differ by up to ~15% (measured:
    # fro 0.16 and 0.06 here), as the PyTorch path's own prefill-vs-decode spread does, for which the golden
    # case allows fro_rel 0.5 / argmax_agree 0.5 ("smoke test only").
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.5 and (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


BF16_KV_SIM = ops.Numerics(torch.bfloat16, kv_sim=True, act_quant=False, bf16_probs=True)


@pytest.mark.parametrize("numerics", [BF16_KV_SIM, "quant"], ids=["bf16_kv_sim", "quant"])
def test_smooth_model_forward(numerics, smooth_model, monkeypatch, checked_ops):
    """Prefill of 120 tokens on the PyTorch path, then a chunk crossing 128 and two decodes with the kernels."""
    ids = _ids(smooth_model, 131)
    ref = _logits(smooth_model, ids, 120, [9, 1, 1], "torch", monkeypatch, numerics)
    out = _logits(smooth_model, ids, 120, [9, 1, 1], "triton", monkeypatch, numerics)
    assert all(checked_ops.values()), checked_ops
    # the PyTorch path's own spread: the same tokens chunked differently
    spread = rel_err(_logits(smooth_model, ids, 120, [5, 4, 1, 1], "torch", monkeypatch, numerics), ref)
    err = rel_err(out, ref)
    # measured: bf16 + KV simulation 0.009 (own spread 0.006); quant 0.043 (own spread 0.029): FP8 activation
    # quantization turns one-ulp differences into whole FP8 steps, in either path. On CUDA the PyTorch path can be
    # chunking-invariant (spread 0; measured on an H100: bf16 + KV simulation 0.004, quant 0.018), so the bound has
    # a floor: bf16 tolerance, or a few FP8 steps' worth with FP8 activations
    assert err < max(3 * spread, 2e-2 if numerics is BF16_KV_SIM else 5e-2)
    if numerics is BF16_KV_SIM:  # without FP8 activations: within bf16 tolerance end to end
        assert err < 2e-2
