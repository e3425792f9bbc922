"""Official checkpoint format: expected keys, loading with validation and progress, seeded random writer."""

from __future__ import annotations

import json

import pytest
import torch
from model_golden import CASES, MODEL_DIR, rewrite_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from dsv4_agent.model import (
    CheckpointError,
    DeepSeekV4Config,
    expected_tensors,
    load_config,
    load_model,
    ops,
    save_random_checkpoint,
)
from dsv4_agent.model.checkpoint import quantize_fp4_weight, quantize_fp8_weight


def tiny_config(**change) -> DeepSeekV4Config:
    hf = load_config(MODEL_DIR / "t1-mixed").to_hf()
    hf.update(change)
    return DeepSeekV4Config.from_hf(hf)


@pytest.mark.parametrize("case", CASES)
def test_expected_tensors_match_the_released_layout(case):
    spec = expected_tensors(load_config(MODEL_DIR / case))
    with safe_open(MODEL_DIR / case / "model.safetensors", "pt") as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert found == {k: (s.shape, s.dtype) for k, s in spec.items()}


def logical_params(cfg: DeepSeekV4Config) -> tuple[float, float]:
    main = mtp = 0
    for key, s in expected_tensors(cfg).items():
        if s.kind == "scale":
            continue
        n = s.shape[0] * (s.shape[1] * 2 if s.kind == "fp4" else (s.shape[1] if len(s.shape) > 1 else 1))
        if key.startswith("mtp."):
            mtp += n
        else:
            main += n
    return main / 1e9, mtp / 1e9


def test_parameter_counts_of_the_releases(shared_dir):
    """Spec 1.3: Flash 284.3 B (+6.6 B MTP), Pro 1573 B (+25.8 B MTP)."""
    flash = logical_params(load_config(shared_dir / "configs" / "deepseek-v4-flash"))
    pro = logical_params(load_config(shared_dir / "configs" / "deepseek-v4-pro"))
    assert round(flash[0], 1) == 284.3 and round(flash[1], 1) == 6.6
    assert round(pro[0]) == 1573 and round(pro[1], 1) == 25.8


def test_random_checkpoint_round_trip(tmp_path):
    cfg = tiny_config()
    one = save_random_checkpoint(cfg, tmp_path / "one", seed=5)
    again = save_random_checkpoint(cfg, tmp_path / "again", seed=5)
    assert (one / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    events = []
    sharded = save_random_checkpoint(cfg, tmp_path / "sharded", seed=5, max_shard_bytes=400_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    n_shards = len(set(index["weight_map"].values()))
    assert n_shards > 2
    m1 = load_model(one)
    m2 = load_model(sharded, progress=events.append)
    assert [e.shard_index for e in events] == list(range(1, n_shards + 1))
    assert events[-1].tensors_done == events[-1].tensors_total == len(expected_tensors(cfg))
    assert m1.config == cfg
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    # the stored tensors are the release's dtypes; the model keeps them as stored and dequantizes them exactly
    raw = load_file(one / "model.safetensors")
    w, s = raw["layers.1.attn.wq_b.weight"], raw["layers.1.attn.wq_b.scale"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s1["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(m1.layers[1].attn.wq_b.dequantized(), ops.dequant_fp8_weight(w, s))
    e, es = raw["layers.2.ffn.experts.3.w2.weight"], raw["layers.2.ffn.experts.3.w2.scale"]
    assert e.dtype == torch.int8 and e.shape == (cfg.hidden_size, cfg.moe_intermediate_size // 2)
    assert s1["layers.2.ffn.experts.3.w2.weight"].dtype == torch.int8
    assert torch.equal(m1.layers[2].ffn.experts[3].w2.dequantized(), ops.dequant_fp4_weight(e, es))
    assert raw["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    # a random model runs and is finite
    from dsv4_agent.model import reference_logits
    ids = torch.randint(0, cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(reference_logits(one, ids)).all()


def test_quantizers_round_trip():
    g = torch.Generator().manual_seed(1)
    for shape in [(128, 128), (200, 136), (7, 300)]:
        w = torch.randn(*shape, generator=g) * 0.05
        q, s = quantize_fp8_weight(w)
        assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
        deq = ops.dequant_fp8_weight(q, s)
        assert torch.equal(ops.dequant_fp8_weight(*quantize_fp8_weight(deq)), deq)  # idempotent
        assert ((deq - w).abs() <= w.abs().amax() * 2.0**-3).all()
    w = torch.randn(64, 96, generator=g)
    q, s = quantize_fp4_weight(w)
    deq = ops.dequant_fp4_weight(q, s)
    assert torch.equal(deq, ops.fp4_sim(w, 32))
    assert torch.equal(ops.unpack_fp4(ops.pack_fp4(ops.unpack_fp4(q))), ops.unpack_fp4(q))


@pytest.fixture()
def written(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=0, compress_ratios=[0, 4, 128])
    return save_random_checkpoint(cfg, tmp_path / "ckpt", seed=3)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("layers.1.attn.indexer.wq_b.scale"), "missing tensor 'layers.1.attn.indexer.wq_b.scale'"),
    (lambda t: t.update({"layers.9.attn.wkv.weight": torch.zeros(1)}), "unexpected tensor 'layers.9.attn.wkv.weight'"),
    (lambda t: t.update({"norm.weight": torch.zeros(3, dtype=torch.bfloat16)}), "'norm.weight': expected shape"),
    (lambda t: t.update({"hc_head_base": torch.zeros(4, dtype=torch.bfloat16)}), "'hc_head_base'.*dtype F32"),
])
def test_bad_checkpoints_name_the_key(written, edit, message):
    rewrite_checkpoint(written, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(written)


def test_missing_files(written):
    index = json.loads((written / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed.weight"] = "model-00002-of-00002.safetensors"
    (written / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(written)
    (written / "model.safetensors.index.json").unlink()
    (written / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        load_model(written)
