"""Plain PyTorch (fp32) versions of the V4 numeric primitives the kernels fuse (spec §2).

These are the references the Triton kernels are checked against; they favour clarity over speed.
They also define the packed FP8 KV layout (`pack_kv_fp8` / `unpack_kv_fp8`) the kernels read.
"""

from __future__ import annotations

import torch

HEAD_DIM = 512  # D: width of one attention KV vector
ROPE_DIM = 64  # r: the last 64 dims carry RoPE
NOPE_DIM = HEAD_DIM - ROPE_DIM  # 448 dims stored as e4m3 in the FP8 layout
FP8_BLOCK = 64  # one ue8m0 scale per 64 no-rope dims (7 blocks)
FP4_BLOCK = 32
FP8_MAX = 448.0
# FP8 KV row: [0, 448) e4m3 codes | [448, 576) bf16 rope dims (64 x 2 bytes) | [576, 583) ue8m0 | pad.
KV_FP8_BYTES = 584
KV_FP8_ROPE_OFFSET = NOPE_DIM
KV_FP8_SCALE_OFFSET = NOPE_DIM + 2 * ROPE_DIM


def pow2_ceil_exponent(x: torch.Tensor) -> torch.Tensor:
    """`ceil(log2(x))` for positive fp32 `x`, exact (from the bit pattern: exponent, +1 if mantissa != 0)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def exp2i(exponent: torch.Tensor) -> torch.Tensor:
    """Exact fp32 `2**exponent` for integer exponents."""
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


def fp8_block_scale_exponent(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Power-of-two exponent `e` of each block's ue8m0 scale `2**e` (§2.3 steps 1-2); x: [..., n*block]."""
    blocks = x.float().unflatten(-1, (-1, block))
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    return pow2_ceil_exponent(amax * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))


def fp8_fake_quant(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """§2.3: e4m3 round trip with power-of-two block scales; returns bf16 (exactly representable)."""
    scale = exp2i(fp8_block_scale_exponent(x, block))[..., None]
    blocks = x.float().unflatten(-1, (-1, block))
    codes = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (codes * scale).flatten(-2).to(torch.bfloat16)


def _round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round |y| <= 6 to the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code."""
    a = y.abs()
    # torch.round is round-half-to-even; on each segment of constant spacing the even code is
    # the even multiple of the spacing, so halving/doubling around it picks the right tie.
    r = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.copysign(r, y)


def fp4_fake_quant(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """§2.4: e2m1 round trip with power-of-two block scales; returns bf16."""
    blocks = x.float().unflatten(-1, (-1, block))
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(6.0 * 2.0**-126)
    scale = exp2i(pow2_ceil_exponent(amax / 6.0))
    return (_round_e2m1((blocks / scale).clamp(-6.0, 6.0)) * scale).flatten(-2).to(torch.bfloat16)


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix H_n (natural order), fp32, entries +-1."""
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """§2.5: `(x @ H_n) * n**-0.5` along the last dim in fp32; returns bf16."""
    n = x.shape[-1]
    return (x.float() @ hadamard_matrix(n, x.device) * n**-0.5).to(torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """§2.1 weighted RMSNorm in fp32, bf16 out."""
    xf = x.float()
    return (weight.float() * xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(torch.bfloat16)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """§2.2: rotate interleaved pairs of the last 64 dims of `x` [..., n] by angle pos * inv_freq[i].

    positions: broadcastable to x.shape[:-1]; inv_freq: [32] fp32 (YaRN already folded in). bf16 out.
    """
    angle = positions.float()[..., None] * inv_freq.float()  # [..., 32]
    rot = torch.polar(torch.ones_like(angle), angle)
    tail = torch.view_as_complex(x[..., -ROPE_DIM:].float().unflatten(-1, (-1, 2)).contiguous())
    tail = torch.view_as_real(tail * rot).flatten(-2)
    return torch.cat([x[..., :-ROPE_DIM].float(), tail], -1).to(torch.bfloat16)


def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """Pack bf16 KV vectors [..., 512] into the 584-byte FP8 layout (uint8 [..., 584]).

    The no-rope dims are FP8-fake-quantized first (a no-op on vectors the model already quantized,
    §4.2 step 3), so packing is lossless for model KV.
    """
    if kv.shape[-1] != HEAD_DIM:
        raise ValueError(f"kv: last dim must be {HEAD_DIM}, got {kv.shape[-1]}")
    exponent = fp8_block_scale_exponent(kv[..., :NOPE_DIM])  # [..., 7]
    scale = exp2i(exponent)
    nope = kv[..., :NOPE_DIM].float().unflatten(-1, (-1, FP8_BLOCK)) / scale[..., None]
    codes = nope.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2).view(torch.uint8)
    rope = kv[..., NOPE_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    scales = (exponent + 127).to(torch.uint8)
    pad = torch.zeros_like(scales[..., :1])
    return torch.cat([codes, rope, scales, pad], -1)


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
