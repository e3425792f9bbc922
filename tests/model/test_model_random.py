"""Seeded random models in the released format: chunk / decode boundaries of every kind are exact in fp32."""

from __future__ import annotations

import pytest
import torch
from model_golden import MODEL_DIR, max_rel, run_chunks

from dsv4_agent.model import DeepSeekV4Config, load_config, load_model, save_random_checkpoint

L = 140


@pytest.fixture(scope="module")
def smooth_model(tmp_path_factory):
    """CSA (m=4), m=16 and HCA (m=128) layers, window 8, all hash-routed and top-k >= entries: a continuous
    function of the inputs, so chunking may only change rounding."""
    hf = load_config(MODEL_DIR / "t1-mixed").to_hf()
    hf.update(compress_ratios=[4, 16, 128, 0], num_hidden_layers=3, num_hash_layers=3, index_topk=512,
              sliding_window=8, vocab_size=64)
    cfg = DeepSeekV4Config.from_hf(hf)
    return load_model(save_random_checkpoint(cfg, tmp_path_factory.mktemp("smooth"), seed=11))


@pytest.mark.parametrize("prompt", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 127, 128, 129])
def test_prefill_decode_boundaries(smooth_model, prompt):
    ids = torch.randint(0, 64, (L,), generator=torch.Generator().manual_seed(prompt))
    full = run_chunks(smooth_model, ids, [L])
    assert torch.isfinite(full).all()
    steps = min(5, L - prompt)
    mixed = run_chunks(smooth_model, ids, [prompt] + [1] * steps + ([L - prompt - steps] if L - prompt - steps else []))
    assert max_rel(mixed, full) <= 1e-5

