"""mHC pre (with Sinkhorn) and post mixing vs the fp32 reference."""

from __future__ import annotations

import pytest
import torch
from dsv4_agent.kernels import hc_post, hc_post_ref, hc_pre, hc_pre_ref, sinkhorn_ref
from kernel_helpers import poisoned_outputs, rel_err, requires_gpu


def _params(d, device):
    return dict(fn=torch.randn(24, 4 * d, device=device) * 0.05, scale=torch.rand(3, device=device) + 0.5,
                base=torch.randn(24, device=device))


@pytest.mark.parametrize("n,d", [(1, 64), (37, 256), (5, 96)])
def test_pre_and_post_match_reference(n, d, device, force_triton):
    x = torch.randn(n, 4, d, device=device).bfloat16()
    p = _params(d, device)
    ref = hc_pre_ref(x, **p)
    with poisoned_outputs():
        out = hc_pre(x, **p)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert rel_err(o, r) < 1e-4
    v = torch.randn(n, d, device=device).bfloat16()
    with poisoned_outputs():
        mixed = hc_post(v, x, ref[1], ref[2])
    assert rel_err(mixed, hc_post_ref(v, x, ref[1], ref[2])) < 1e-3


def test_sinkhorn_ends_column_normalised():
    comb = sinkhorn_ref(torch.randn(10, 4, 4) * 3, iters=20, eps=1e-6)
    torch.testing.assert_close(comb.sum(-2), torch.ones(10, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(10, 4), atol=2e-2, rtol=0)


def test_empty_batch(device, force_triton):
    x = torch.zeros(0, 4, 64, device=device, dtype=torch.bfloat16)
    u, post, comb = hc_pre(x, **_params(64, device))
    assert u.shape == (0, 64) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    assert hc_post(u, x, post, comb).shape == (0, 4, 64)


def test_bad_fn_shape_names_the_field(device):
    with pytest.raises(ValueError, match="fn"):
        hc_pre(torch.zeros(1, 4, 64, device=device), torch.zeros(24, 64, device=device),
               torch.ones(3, device=device), torch.zeros(24, device=device))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("n", [1, 64, 4099])
def test_full_shapes_gpu(n):
    d = 4096
    x = torch.randn(n, 4, d, device="cuda").bfloat16()
    p = _params(d, "cuda")
    ref = hc_pre_ref(x, **p)
    with poisoned_outputs():
        out = hc_pre(x, **p)
        mixed = hc_post(out[0], x, out[1], out[2])
    for o, r in zip(out, ref, strict=True):
        assert rel_err(o, r) < 1e-4
    assert rel_err(mixed, hc_post_ref(ref[0], x, ref[1], ref[2])) < 1e-3
