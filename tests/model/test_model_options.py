"""Architectural options the public golden cases do not exercise (spec sections 1, 6, 9, 11), on seeded random
checkpoints in the released format: every option loads and runs, chunked prefill / decode equals one prefill in
fp32 (spec 9.4), each numeric config field is read (changing it changes the logits), the official configs build
with the released shapes, and bad inputs fail naming the key or field."""

from __future__ import annotations

import json

import pytest
import torch
from model_golden import max_rel, rewrite_checkpoint, run_chunks

from dsv4_agent.model import (
    CheckpointError,
    ConfigError,
    DeepSeekV4,
    DeepSeekV4Config,
    expected_tensors,
    load_config,
    load_model,
    reference_logits,
    save_random_checkpoint,
    tiny_config,
)
from dsv4_agent.model.checkpoint import SAFETENSORS_DTYPES

L = 150

# spec 11 test configurations (T1 = tiny_config()) and options no public case has; HF keys
OPTIONS = {
    "t1-index-dim-64": {},  # index_head_dim 64 = the rope width: RoPE over the whole indexer vector
    "t2-fast-hca": {"compress_ratios": [0, 4, 16, 4, 0]},
    "t3-pro-like": {"compress_ratios": [16, 16, 4, 16, 0], "num_hash_layers": 3},
    "t4-dense-index": {"num_hash_layers": 4, "index_topk": 512},
    "fp8-experts": {"expert_dtype": "fp8"},
    "score-routing-only": {"num_hash_layers": 0},
    "hash-routed-mtp": {"num_hash_layers": 5},  # layer id < num_hash_layers: the MTP block (id 4) as well
    "hc-mult-2": {"hc_mult": 2},
    "window-128-hca-first": {"sliding_window": 128, "compress_ratios": [128, 4, 128, 4, 0]},
    "ratios-8-32-64-window-5": {"compress_ratios": [8, 4, 32, 64, 0], "sliding_window": 5},
    "window-1-top-1": {"sliding_window": 1, "index_topk": 1},
    "window-200-hc-1": {"sliding_window": 200, "hc_mult": 1},  # ring longer than a page; a single stream
    "rope-32-eight-heads": {"qk_rope_head_dim": 32, "head_dim": 96, "index_head_dim": 32, "num_attention_heads": 8,
                            "o_groups": 4, "index_n_heads": 8},
    "no-yarn-no-clamp": {"rope_scaling": None, "swiglu_limit": 0},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_option_chunking_and_decode_equal_prefill(tmp_path, option):
    cfg = tiny_config(**OPTIONS[option])
    model_dir = save_random_checkpoint(cfg, tmp_path / option, seed=3)
    model = load_model(model_dir)
    assert model.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (L,), generator=torch.Generator().manual_seed(1))
    full = run_chunks(model, ids, [L])
    assert torch.isfinite(full).all()
    for chunks in ([1, 1, 1, L - 3], [5, 123, 1, 1, 7, L - 137], [131, *[1] * (L - 131)]):
        assert max_rel(run_chunks(model, ids, chunks), full) <= 1e-5, chunks
    # the MTP block through its own window: prefill + decode equals one pass
    mtp = reference_logits(model_dir, ids[:40], mode="mtp")
    assert mtp.shape == (39, cfg.vocab_size) and torch.isfinite(mtp).all()
    assert max_rel(reference_logits(model_dir, ids[:40], mode="mtp", prefill_len=17), mtp) <= 1e-5


# config fields that change the computation without changing any tensor shape, with another valid value
FIELDS = {
    "rope_theta": 5000.0, "compress_rope_theta": 20000.0, "rope_scaling.factor": 2.0,
    "rope_scaling.original_max_position_embeddings": 16, "rope_scaling.beta_slow": 0.01, "hc_sinkhorn_iters": 3,
    "hc_eps": 1e-2, "rms_norm_eps": 1e-1, "routed_scaling_factor": 2.5, "sliding_window": 7, "index_topk": 3,
    "swiglu_limit": 0.05,
}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    cfg = tiny_config(compress_ratios=[0, 4, 16, 4, 0])
    model_dir = save_random_checkpoint(cfg, tmp_path_factory.mktemp("base"), seed=5)
    ids = torch.randint(0, cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(2))
    return model_dir, ids, reference_logits(model_dir, ids)


@pytest.mark.parametrize("field", FIELDS)
def test_config_field_is_read(base_checkpoint, tmp_path, field):
    """The same weights under a config with one field changed give other logits: nothing is hard-coded."""
    model_dir, ids, base = base_checkpoint
    hf = json.loads((model_dir / "config.json").read_text())
    key, _, sub = field.partition(".")
    if sub:
        hf[key][sub] = FIELDS[field]
    else:
        hf[key] = FIELDS[field]
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in model_dir.iterdir():
        (changed / f.name).symlink_to(f)
    (changed / "config.json").unlink()
    (changed / "config.json").write_text(json.dumps(hf))
    got = reference_logits(changed, ids)
    assert torch.isfinite(got).all()
    assert max_rel(got, base) > 1e-4, f"changing {field} did not change the logits"


def test_optional_keys():
    """num_nextn_predict_layers absent: the compress_ratios entries past the main layers; expert_dtype absent or
    null: FP8 like the other linears; rope_scaling null: no YaRN (and it round-trips as null)."""
    hf = tiny_config().to_hf()
    del hf["num_nextn_predict_layers"]
    assert DeepSeekV4Config.from_hf(hf).num_nextn_predict_layers == 1
    hf["compress_ratios"] = hf["compress_ratios"][:-1]
    assert DeepSeekV4Config.from_hf(hf).num_nextn_predict_layers == 0
    assert tiny_config(expert_dtype=None).expert_dtype == "fp8"
    hf = tiny_config().to_hf()
    del hf["expert_dtype"]
    assert DeepSeekV4Config.from_hf(hf).expert_dtype == "fp8"
    plain = tiny_config(rope_scaling=None)
    assert plain.yarn is None and plain.to_hf()["rope_scaling"] is None
    assert DeepSeekV4Config.from_hf(plain.to_hf()) == plain and tiny_config().yarn == (64, 4.0, 32.0, 1.0)


def test_trailing_compress_ratios_are_unused():
    """As in the reference, entries past the main layers and MTP blocks are ignored (a re-release's extra zeros)."""
    cfg = tiny_config(compress_ratios=[0, 4, 128, 4, 0, 0, 0])
    assert cfg.compress_ratios == (0, 4, 128, 4, 0) and cfg == tiny_config()


@pytest.mark.parametrize("release,billions", [("deepseek-v4-flash", (284.3, 6.6)), ("deepseek-v4-pro", (1573.0, 25.8))])
def test_releases_build_on_meta_with_the_released_shapes(shared_dir, release, billions):
    """The official configs on the meta device: exactly the keys / shapes / dtypes of expected_tensors (norms held
    in fp32) and spec 1.3's parameter counts (Flash 284.3 B + 6.6 B MTP, Pro 1573 B + 25.8 B MTP)."""
    cfg = load_config(shared_dir / "configs" / release)
    with torch.device("meta"):
        state = DeepSeekV4(cfg).state_dict()
    spec = expected_tensors(cfg)
    assert state.keys() == spec.keys()
    for key, s in spec.items():
        want = torch.float32 if key.endswith("norm.weight") else SAFETENSORS_DTYPES[s.dtype]
        assert (tuple(state[key].shape), state[key].dtype) == (s.shape, want), key
    logical = {"main": 0, "mtp": 0}
    for key, t in state.items():
        if not key.endswith(".scale"):
            logical["mtp" if key.startswith("mtp.") else "main"] += t.numel() * (2 if t.dtype == torch.int8 else 1)
    main = logical["main"] / 1e9
    assert (round(main, 1) if main < 1000 else round(main), round(logical["mtp"] / 1e9, 1)) == billions


# ---- bad inputs name the key / field ------------------------------------------------------------------------
@pytest.fixture()
def written(tmp_path):
    return save_random_checkpoint(tiny_config(compress_ratios=[0, 4, 128, 4, 0]), tmp_path / "ckpt", seed=3)


def _bf16(key):
    return lambda t: t.update({key: t[key].float().to(torch.bfloat16)})


@pytest.mark.parametrize("edit,message", [
    (_bf16("layers.1.attn.wq_a.weight"), r"'layers.1.attn.wq_a.weight'.*dtype F8_E4M3.*dtype BF16"),
    (lambda t: t.update({"layers.3.attn.wkv.scale": t["layers.3.attn.wkv.scale"][:, :1].contiguous()}),
     r"'layers.3.attn.wkv.scale': expected shape \[1, 2\]"),
    (lambda t: t.update({"layers.2.ffn.experts.1.w1.weight": torch.zeros(128, 256, dtype=torch.int8)}),
     r"'layers.2.ffn.experts.1.w1.weight': expected shape \[128, 128\]"),
    (lambda t: t.update({"layers.0.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].int()}),
     r"'layers.0.ffn.gate.tid2eid'.*dtype I64.*dtype I32"),
    (lambda t: t.update({"layers.1.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].clone()}),
     "unexpected tensor 'layers.1.ffn.gate.tid2eid'"),
    (lambda t: t["layers.0.ffn.gate.tid2eid"].__setitem__((5, 1), 8),
     r"'layers.0.ffn.gate.tid2eid': expert id 8 outside \[0, 8\)"),
    (lambda t: t.pop("mtp.0.hc_head_scale"), "missing tensor 'mtp.0.hc_head_scale'"),
    (lambda t: t.update({"mtp.0.embed.weight": t["embed.weight"].clone()}), "unexpected tensor 'mtp.0.embed.weight'"),
    (lambda t: t.update({"mtp.0.attn.compressor.ape": torch.zeros(4, 256)}),
     "unexpected tensor 'mtp.0.attn.compressor.ape'"),
])
def test_bad_checkpoint_names_the_key(written, edit, message):
    rewrite_checkpoint(written, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(written)


def test_unquantized_checkpoint_is_named(written):
    """A BF16 checkpoint of the same model (linears dequantized, no scales) fails naming a scale key."""
    def dequantize(t):
        for key in [k for k in t if k.endswith(".scale")]:
            del t[key]
        for key in list(t):
            if t[key].dtype in (torch.float8_e4m3fn, torch.int8) and not key.endswith("tid2eid"):
                t[key] = torch.zeros(t[key].shape, dtype=torch.bfloat16)
    rewrite_checkpoint(written, dequantize)
    with pytest.raises(CheckpointError, match=r"missing tensor '.*\.scale' \(and \d+ more\); .*unquantized"):
        load_model(written)


def test_index_and_shards_must_agree(written):
    rewrite_checkpoint(written, lambda t: None, lambda m: m.pop("norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'norm.weight'"):
        load_model(written)
    rewrite_checkpoint(written, lambda t: t.update({"extra.weight": torch.zeros(2)}), lambda m: m.pop("extra.weight"))
    with pytest.raises(CheckpointError, match="stores tensor 'extra.weight' that .* does not list"):
        load_model(written)
    rewrite_checkpoint(written, lambda t: [t.pop("head.weight"), t.pop("extra.weight")],
            lambda m: m.update({"head.weight": "model.safetensors"}))
    with pytest.raises(CheckpointError, match="'head.weight' is listed in .* but not stored there"):
        load_model(written)
    (written / "model.safetensors").write_bytes(b"not a safetensors file")
    for bad in ({"weight_map": ["model.safetensors"]}, [1], {"weight_map": {"embed.weight": 3}}):
        (written / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="weight_map"):
            load_model(written)
    (written / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(written)


@pytest.mark.parametrize("change,field", [
    ({"swiglu_limit": -1}, "swiglu_limit"),
    ({"rope_scaling": 4}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": "4", "original_max_position_embeddings": 64, "beta_fast": 32,
                       "beta_slow": 1}}, r"rope_scaling\.factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": -1, "beta_fast": 32,
                       "beta_slow": 1}}, r"rope_scaling\.original_max_position_embeddings"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"topk_method": "group_limited_greedy"}, "topk_method"),
    ({"quantization_config": {"fmt": "e5m2"}}, r"quantization_config\.fmt"),
    ({"quantization_config": "fp8"}, "quantization_config"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, r"quantization_config\.quant_method"),
    ({"quantization_config": {"activation_scheme": "static"}}, r"quantization_config\.activation_scheme"),
    ({"quantization_config": {"weight_block_size": 128}}, r"quantization_config\.weight_block_size"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 0,
                       "beta_slow": 1}}, r"rope_scaling\.beta_fast"),
    ({"compress_rope_theta": 1}, "compress_rope_theta"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"bos_token_id": "<s>"}, "bos_token_id"),
    ({"compress_ratios": [0, 4, 128, 4, 4]}, r"compress_ratios\[4\]"),
    ({"compress_ratios": [0, 4, 96, 4, 0]}, r"compress_ratios\[2\]"),
])
def test_unsupported_config_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**change)


def test_quantized_numerics_need_128_blocks(tmp_path):
    """Released precision quantizes GEMM inputs in blocks of 128: other widths run in fp32 only."""
    cfg = tiny_config(q_lora_rank=64, hidden_size=192, moe_intermediate_size=96, vocab_size=100)
    model = load_model(save_random_checkpoint(cfg, tmp_path / "odd", seed=3))
    ids = torch.arange(20)
    assert torch.isfinite(run_chunks(model, ids, [20])).all()
    with pytest.raises(ValueError, match="hidden_size = 192"):
        run_chunks(model, ids, [20], mode="quant")
