"""Bit-exact quantizers, quantized linears, Hadamard, mHC Sinkhorn and RoPE frequencies (primitives/)."""

from __future__ import annotations

import pytest
import torch
from model_golden import MODEL_DIR
from safetensors import safe_open

from dsv4_agent.model import ops


@pytest.fixture(scope="module")
def prim():
    with safe_open(MODEL_DIR / "primitives" / "primitives.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 1: torch.uint8, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("block", [64, 128])
def test_fp8_sim(prim, block):
    assert torch.equal(bits(ops.fp8_sim(prim["fp8_sim.in"], block)), bits(prim[f"fp8_sim.b{block}"]))


def test_act_quant(prim):
    q, s = ops.act_quant(prim["fp8_sim.in"], 128)
    assert torch.equal(bits(q), bits(prim["act_quant.q"]))
    assert torch.equal(bits(s), bits(prim["act_quant.s"]))


def test_fp4_sim(prim):
    assert torch.equal(bits(ops.fp4_sim(prim["fp4_sim.in"], 32)), bits(prim["fp4_sim.out"]))


def test_fp8_linear(prim):
    w = ops.dequant_fp8_weight(prim["fp8_linear.w"], prim["fp8_linear.w_scale"])
    y = ops.linear(prim["fp8_linear.x"], w, "fp8", ops.Numerics.from_mode("quant"))
    assert y.dtype == torch.bfloat16
    assert torch.equal(bits(y), bits(prim["fp8_linear.y"]))


def test_fp4_linear(prim):
    w = ops.dequant_fp4_weight(prim["fp4_linear.w"], prim["fp4_linear.w_scale"])
    y = ops.linear(prim["fp4_linear.x"], w, "fp4", ops.Numerics.from_mode("quant"))
    assert torch.equal(bits(y), bits(prim["fp4_linear.y"]))


def test_hadamard(prim):
    assert torch.equal(bits(ops.hadamard(prim["hadamard.in"])), bits(prim["hadamard.out"]))


def test_hc_sinkhorn(prim):
    pre, post, comb = ops.hc_split_sinkhorn(prim["hc.mixes"], prim["hc.scale"], prim["hc.base"], 4, 20, 1e-6)
    for name, got in (("pre", pre), ("post", post), ("comb", comb)):
        assert (got - prim[f"hc.{name}"]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("name,base,yarn", [("swa", 10000.0, None), ("flash", 160000.0, (65536, 16.0, 32.0, 1.0)),
                                            ("tiny", 160000.0, (64, 4.0, 32.0, 1.0))])
def test_rope_frequencies(prim, name, base, yarn):
    """The golden theta is the angle of the precomputed rotation at position 1 (angle(polar(1, theta)));
    it differs from theta itself by at most 1 ulp, and the model goldens are bit-exact with theta itself."""
    freqs = ops.rope_frequencies(64, base, yarn)
    cis = ops.rope_cis(torch.tensor([1]), freqs)[0]
    assert torch.equal(bits(torch.angle(cis)), bits(prim[f"rope.theta.{name}"]))
    assert torch.allclose(freqs, prim[f"rope.theta.{name}"], rtol=2.4e-7, atol=0)
