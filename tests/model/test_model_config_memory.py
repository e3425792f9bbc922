"""Typed config (Flash, Pro, tiny cases; inconsistent configs rejected) and KV memory accounting (spec 10)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_golden import MODEL_DIR

from dsv4_agent.model import (
    ConfigError,
    DeepSeekV4Config,
    kv_bytes_per_token,
    kv_cache_bytes,
    load_config,
    tiny_config,
)
from dsv4_agent.model.memory import marginal_kv_bytes_per_token


@pytest.fixture(scope="module")
def flash_hf(shared_dir):
    return json.loads((shared_dir / "configs" / "deepseek-v4-flash" / "config.json").read_text())


def test_official_configs(shared_dir):
    flash = load_config(shared_dir / "configs" / "deepseek-v4-flash")
    pro = load_config(shared_dir / "configs" / "deepseek-v4-pro")
    assert (flash.hidden_size, flash.n_layers, flash.num_attention_heads, flash.index_topk) == (4096, 43, 64, 512)
    assert (pro.hidden_size, pro.n_layers, pro.num_attention_heads, pro.index_topk) == (7168, 61, 128, 1024)
    assert len(flash.csa_layers) == 21 and len(flash.hca_layers) == 20
    assert len(pro.csa_layers) == 30 and len(pro.hca_layers) == 31
    assert flash.ratio(43) == 0 and flash.expert_dtype == "fp4"
    assert DeepSeekV4Config.from_hf(flash.to_hf()) == flash


def test_tiny_configs():
    t1 = load_config(MODEL_DIR / "t1-mixed")
    assert t1.compress_ratios == (0, 4, 128, 0) and t1.nope_head_dim == 64
    t3 = load_config(MODEL_DIR / "t3-smooth")
    assert t3.num_nextn_predict_layers == 0 and t3.num_hash_layers == 2


@pytest.mark.parametrize("change,field", [
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"compress_ratios": [0] * 43 + [4]}, "compress_ratios[43]"),
    ({"compress_ratios": [3] * 44}, "compress_ratios[0]"),
    ({"num_attention_heads": 60}, "o_groups"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"head_dim": 500}, "head_dim"),
    ({"index_head_dim": 96}, "index_head_dim"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"num_hash_layers": 50}, "num_hash_layers"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"hidden_size": "4096"}, "hidden_size"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"rope_theta": -1}, "rope_theta"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"expert_dtype": "int4"}, "expert_dtype"),
    ({"quantization_config": {"weight_block_size": [64, 64]}}, "weight_block_size"),
])
def test_inconsistent_configs_are_rejected(flash_hf, change, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DeepSeekV4Config.from_hf({**flash_hf, **change})


def test_missing_field_is_named(flash_hf):
    hf = dict(flash_hf)
    del hf["sliding_window"]
    with pytest.raises(ConfigError, match="sliding_window"):
        DeepSeekV4Config.from_hf(hf)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["hidden_size", "num_hidden_layers", "head_dim", "o_groups", "index_topk", "hc_mult",
                            "sliding_window", "compress_ratios", "rope_scaling", "num_hash_layers", "vocab_size"]),
       value=st.one_of(st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
                       st.lists(st.integers(-1, 200), max_size=50), st.dictionaries(st.text(max_size=3), st.integers())))
def test_config_parser_only_raises_config_error(flash_hf, key, value):
    try:
        cfg = DeepSeekV4Config.from_hf({**flash_hf, key: value})
    except ConfigError as e:
        assert key.split(".")[0] in str(e) or "config.json" in str(e)
    else:
        cfg.validate()


def test_kv_bytes_flash_and_pro(shared_dir):
    flash = load_config(shared_dir / "configs" / "deepseek-v4-flash")
    pro = load_config(shared_dir / "configs" / "deepseek-v4-pro")
    T = 1_048_576
    b = kv_cache_bytes(flash, T)
    assert b.csa_main == 3_214_934_016 and b.csa_indexer == 374_341_632
    assert b.hca == 95_682_560 and b.window == 3_214_336
    assert b.total == 3_688_172_544
    assert round(kv_bytes_per_token(flash, T), 1) == 3517.3
    assert marginal_kv_bytes_per_token(flash) == 3514.25
    assert round(b.compressor_state_fp32 / 1e6, 1) == 12.2
    assert marginal_kv_bytes_per_token(pro) == 30 * 163 + 31 * 4.5625
    assert round(kv_cache_bytes(pro, T).total / 2**30, 2) == 4.92
    assert round(kv_cache_bytes(pro, T).compressor_state_fp32 / 1e6, 1) == 18.7
    with pytest.raises(ValueError, match="context_len"):
        kv_bytes_per_token(flash, 0)


def test_tiny_config_is_the_spec_t1():
    cfg = tiny_config()
    assert cfg.compress_ratios == (0, 4, 128, 4, 0) and cfg.csa_layers == [1, 3] and cfg.hca_layers == [2]
    assert tiny_config(sliding_window=8).sliding_window == 8
    with pytest.raises(ConfigError, match="compress_ratios"):
        tiny_config(num_hidden_layers=3)
