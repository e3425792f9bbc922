"""The fp32 numeric references the kernels are built on (spec §2) and the dispatch switch."""

from __future__ import annotations

import pytest
import torch
from dsv4_agent.kernels import (
    fp4_fake_quant,
    fp8_fake_quant,
    hadamard_rotate,
    kv_fp8_sim,
    pack_kv_fp8,
    unpack_kv_fp8,
    use_triton,
)


def test_fp4_ties_follow_the_spec():
    # block max 6 -> scale 1; spec §2.4 tie examples
    x = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 24)
    got = fp4_fake_quant(x).float()[:8]
    assert got.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_fp8_fake_quant_is_idempotent_and_power_of_two_scaled():
    x = torch.randn(5, 448) * torch.logspace(-3, 3, 5)[:, None]
    q = fp8_fake_quant(x)
    torch.testing.assert_close(fp8_fake_quant(q), q, rtol=0, atol=0)
    assert ((q.float() - x).abs() <= x.abs().unflatten(-1, (7, 64)).amax(-1).repeat_interleave(64, -1) / 8).all()


def test_kv_fp8_pack_roundtrip_is_lossless_for_model_kv():
    kv = kv_fp8_sim(torch.randn(3, 7, 512).bfloat16())
    packed = pack_kv_fp8(kv)
    assert packed.shape == (3, 7, 584) and packed.dtype == torch.uint8
    torch.testing.assert_close(unpack_kv_fp8(packed), kv, rtol=0, atol=0)


def test_hadamard_is_orthonormal():
    x = torch.randn(4, 128)
    y = hadamard_rotate(x).float()
    torch.testing.assert_close(y.norm(dim=-1), x.bfloat16().float().norm(dim=-1), rtol=1e-2, atol=0)


def test_dispatch_switch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("DSV4_KERNELS", "torch")
    assert not use_triton(cpu)
    monkeypatch.setenv("DSV4_KERNELS", "triton")
    assert use_triton(cpu)
    monkeypatch.setenv("DSV4_KERNELS", "auto")
    assert use_triton(cpu) is False
    monkeypatch.setenv("DSV4_KERNELS", "fast")
    with pytest.raises(ValueError, match="DSV4_KERNELS"):
        use_triton(cpu)
