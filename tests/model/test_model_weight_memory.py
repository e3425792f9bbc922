"""Resident weight memory: linears hold the checkpoint's own precision (FP8 ~1 byte, FP4 ~0.5, BF16 2 a parameter),
so the model's bytes equal the checkpoint payload (norms upcast to fp32 aside), on one rank and per TP rank."""

from __future__ import annotations

import torch

from dsv4_agent.model import (
    DeepSeekV4,
    expected_tensors,
    load_config,
    load_model,
    save_random_checkpoint,
    tiny_config,
)
from dsv4_agent.model.checkpoint import SAFETENSORS_DTYPES
from dsv4_agent.model.model import SINGLE_RANK, Linear, Split, TensorParallel

SHARDED = ("attn.wq_b.", "attn.wo_a.", "attn.wo_b.", "attn.attn_sink", "experts.", "embed.", "head.")  # TP-split


def resident_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def expected_resident(cfg, size: int = 1) -> int:
    """Checkpoint payload per rank: the split tensors / ``size``, BF16 norms held in fp32, plus RoPE tables."""
    total = 0
    for key, spec in expected_tensors(cfg).items():
        n = torch.Size(spec.shape).numel() * SAFETENSORS_DTYPES[spec.dtype].itemsize
        if key.endswith("norm.weight"):
            n *= 2  # bf16 -> fp32
        total += n // size if any(s in key for s in SHARDED) else n
    freqs = cfg.qk_rope_head_dim // 2 * 4 * (cfg.n_layers + cfg.num_nextn_predict_layers)
    return total + freqs


def dequantized_bytes(model: torch.nn.Module) -> int:
    """What the same model held with every parameter in fp32 and no scales (the previous layout)."""
    params = sum(4 * p.numel() * (2 if p.dtype == torch.int8 else 1)  # int8 = packed FP4: 2 values a byte
                 for n, p in model.named_parameters() if not n.endswith(".scale"))
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def test_tiny_model_holds_the_checkpoint_precision(tmp_path):
    cfg = tiny_config()
    model = load_model(save_random_checkpoint(cfg, tmp_path / "ckpt", seed=1))
    state = model.state_dict()
    for key, spec in expected_tensors(cfg).items():
        want = torch.float32 if key.endswith("norm.weight") else SAFETENSORS_DTYPES[spec.dtype]
        assert state[key].dtype == want and tuple(state[key].shape) == spec.shape, key
    got = resident_bytes(model)
    assert got == expected_resident(cfg)
    # measured: 6,560,802 bytes (this layout) vs 27,282,352 with every weight dequantized to fp32 (before)
    assert got < 0.3 * dequantized_bytes(model)


def _rank_shapes(size: int) -> TensorParallel:
    """Plain layers of one rank's split shapes (those SGLang's parallel layers give a rank)."""

    def linear(in_features: int, out_features: int, stored: str, gemm: str, split: Split, prefix: str) -> Linear:
        return Linear(in_features // size if split == "row" else in_features,
                      out_features // size if split in ("column", "vocab") else out_features, stored, gemm)

    def embedding(vocab_size: int, dim: int) -> torch.nn.Module:
        return torch.nn.Embedding(vocab_size // size, dim, dtype=torch.bfloat16)

    return TensorParallel(size, linear, embedding, SINGLE_RANK.all_reduce)


def test_v4_flash_bytes_per_rank_at_tp8(shared_dir):
    """V4-Flash built on the meta device with TP 8 shapes: ~21.1 GB a rank (checkpoint payload 159.6 GB)."""
    cfg = load_config(shared_dir / "configs" / "deepseek-v4-flash")
    with torch.device("meta"):
        rank = DeepSeekV4(cfg, _rank_shapes(8))
    per_rank = resident_bytes(rank)
    assert per_rank == expected_resident(cfg, 8)
    payload = sum(torch.Size(s.shape).numel() * SAFETENSORS_DTYPES[s.dtype].itemsize
                  for s in expected_tensors(cfg).values())
    assert round(payload / 1e9, 1) == 159.6  # spec 8.1: 159,609,485,896 bytes
    assert 21e9 < per_rank < 21.5e9  # measured 21.144 GB (embedding + head replicated: 22.997 GB)
