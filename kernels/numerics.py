"""Plain PyTorch versions of the V4 numeric primitives (spec §2): the one implementation the model's
PyTorch path (`dsv4_agent.model.ops` imports them) and the kernels' references share.

They favour clarity over speed and are the references the Triton kernels are checked against. They also
define the packed FP8 KV layout (`pack_kv_fp8` / `unpack_kv_fp8`) the kernels read.
"""

from __future__ import annotations

import torch

HEAD_DIM = 512  # D: width of one attention KV vector
ROPE_DIM = 64  # r: the last 64 dims carry RoPE
NOPE_DIM = HEAD_DIM - ROPE_DIM  # 448 dims stored as e4m3 in the FP8 layout
FP8_BLOCK = 64  # one ue8m0 scale per 64 no-rope dims (7 blocks)
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
# FP8 KV row: [0, 448) e4m3 codes | [448, 576) bf16 rope dims (64 x 2 bytes) | [576, 583) ue8m0 | pad.
KV_FP8_BYTES = 584
KV_FP8_ROPE_OFFSET = NOPE_DIM
KV_FP8_SCALE_OFFSET = NOPE_DIM + 2 * ROPE_DIM


# ---------------------------------------------------------------------------------------------------------
# Power-of-two block scales and the FP8 / FP4 simulations (§2.3, §2.4)
# ---------------------------------------------------------------------------------------------------------
def pow2_ceil_exponent(x: torch.Tensor) -> torch.Tensor:
    """`ceil(log2(x))` for positive fp32 `x`, exact (x = mantissa * 2**e with mantissa in [0.5, 1))."""
    mantissa, exponent = torch.frexp(x.float())
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def exp2i(exponent: torch.Tensor) -> torch.Tensor:
    """Exact fp32 `2**exponent` for integer exponents."""
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """`2**ceil(log2(x))` for positive fp32 `x`: the power-of-two (ue8m0) scale at least `x`."""
    return exp2i(pow2_ceil_exponent(x))


def blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] -> fp32 [..., n / block, block] (the quantization blocks along the last dim)."""
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the quantization block {block}")
    return x.float().unflatten(-1, (-1, block))


def fp8_block_scale_exponent(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Exponent `e` of each block's ue8m0 e4m3 scale `2**e` (§2.3 steps 1-2): x [..., n] -> int [..., n/block]."""
    amax = blocks(x, block).abs().amax(-1).clamp_min(1e-4)
    return pow2_ceil_exponent(amax * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))


def fp8_quant(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """§2.3 / §2.6: x [..., n] -> (e4m3 codes float8_e4m3fn [..., n], scale exponents int [..., n/block])."""
    exponent = fp8_block_scale_exponent(x, block)
    codes = (blocks(x, block) / exp2i(exponent)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.flatten(-2), exponent


def fp8_fake_quant(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """§2.3: e4m3 round trip with power-of-two block scales; returns bf16 (exactly representable)."""
    codes, exponent = fp8_quant(x, block)
    return (blocks(codes, block) * exp2i(exponent)[..., None]).flatten(-2).to(torch.bfloat16)


def kv_fp8_sim(kv: torch.Tensor, rope_dim: int = ROPE_DIM) -> torch.Tensor:
    """FP8 simulation of a KV vector / main entry: dims [0, D - r) in blocks of 64, the rope dims untouched;
    same dtype as `kv`."""
    return torch.cat([fp8_fake_quant(kv[..., :-rope_dim], FP8_BLOCK).to(kv.dtype), kv[..., -rope_dim:]], dim=-1)


def fp4_block_scale_exponent(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Exponent of each block's power-of-two e2m1 scale (§2.4): x [..., n] -> int [..., n/block]."""
    return pow2_ceil_exponent(blocks(x, block).abs().amax(-1).clamp_min(FP4_MAX * 2.0**-126) / FP4_MAX)


def _round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round |y| <= 6 to the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code."""
    a = y.abs()
    # torch.round is round-half-to-even; on each segment of constant spacing the even code is
    # the even multiple of the spacing, so halving/doubling around it picks the right tie.
    r = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.copysign(r, y)


def fp4_fake_quant(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """§2.4: e2m1 round trip with power-of-two block scales; returns bf16."""
    scale = exp2i(fp4_block_scale_exponent(x, block))[..., None]
    return (_round_e2m1((blocks(x, block) / scale).clamp(-FP4_MAX, FP4_MAX)) * scale).flatten(-2).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm, RoPE, Hadamard (§2.1, §2.2, §2.5)
# ---------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """§2.1: x [..., n] -> w * (x / sqrt(mean(x^2) + eps)) in fp32, rounded to `out_dtype`."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(out_dtype)


def rope_cis(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """exp(j * phi) with phi = fp32(pos) * theta_i rounded to fp32: positions [...] -> complex64 [..., r/2]."""
    angle = positions.float()[..., None] * inv_freq.float()
    return torch.polar(torch.ones_like(angle), angle)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """§2.2: rotate interleaved pairs of the last `r = 2 * len(inv_freq)` dims of `x` [..., n] by the angle
    pos * inv_freq[i] (conjugate rotation with `inverse`); the leading dims pass through, same dtype as `x`.

    positions: broadcastable to x.shape[:-1]; inv_freq: [r/2] fp32 (YaRN already folded in).
    """
    r = 2 * inv_freq.numel()
    rot = rope_cis(positions, inv_freq)
    if inverse:
        rot = rot.conj()
    tail = torch.view_as_complex(x[..., -r:].float().unflatten(-1, (-1, 2)).contiguous())
    tail = torch.view_as_real(tail * rot).flatten(-2)
    return torch.cat([x[..., :-r], tail.to(x.dtype)], -1)


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix H_n (natural order), fp32, entries +-1; n a power of two."""
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """§2.5: `(x @ H_n) * n**-0.5` along the last dim in fp32, rounded back to x.dtype."""
    n = x.shape[-1]
    return (x.float() @ hadamard_matrix(n, x.device) * n**-0.5).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# The packed FP8 KV layout
# ---------------------------------------------------------------------------------------------------------
def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """Pack bf16 KV vectors [..., 512] into the 584-byte FP8 layout (uint8 [..., 584]).

    The no-rope dims are FP8-fake-quantized first (a no-op on vectors the model already quantized,
    §4.2 step 3), so packing is lossless for model KV.
    """
    if kv.shape[-1] != HEAD_DIM:
        raise ValueError(f"kv: last dim must be {HEAD_DIM}, got {kv.shape[-1]}")
    codes, exponent = fp8_quant(kv[..., :NOPE_DIM])  # [..., 448], [..., 7]
    rope = kv[..., NOPE_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    scales = (exponent + 127).to(torch.uint8)
    pad = torch.zeros_like(scales[..., :1])
    return torch.cat([codes.view(torch.uint8), rope, scales, pad], -1)


def unpack_kv_fp8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_kv_fp8`: uint8 [..., 584] -> bf16 [..., 512]."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != KV_FP8_BYTES:
        raise ValueError(f"packed: expected uint8 [..., {KV_FP8_BYTES}], got {packed.dtype} {tuple(packed.shape)}")
    codes = packed[..., :NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float()
    exponent = packed[..., KV_FP8_SCALE_OFFSET : KV_FP8_SCALE_OFFSET + NOPE_DIM // FP8_BLOCK].int() - 127
    scale = exp2i(exponent)
    nope = (codes.unflatten(-1, (-1, FP8_BLOCK)) * scale[..., None]).flatten(-2)
    rope = packed[..., KV_FP8_ROPE_OFFSET:KV_FP8_SCALE_OFFSET].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope, rope], -1).to(torch.bfloat16)
