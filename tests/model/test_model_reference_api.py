"""``reference_logits`` as an API: shapes for every mode, one-token inputs, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_golden import MODEL_DIR

from dsv4_agent.model import reference_logits


@pytest.mark.parametrize("mode", ["fp32", "fp32_sim", "quant", "mtp"])
def test_shapes_and_short_inputs(mode):
    d = MODEL_DIR / "t1-mixed"
    one = reference_logits(d, [0], mode=mode)
    assert one.shape == ((0 if mode == "mtp" else 1), 160) and one.dtype == torch.float32
    three = reference_logits(str(d), np.array([0, 5, 7]), mode=mode, prefill_len=1)
    assert three.shape == ((2 if mode == "mtp" else 3), 160) and torch.isfinite(three).all()
    out = reference_logits(d, torch.tensor([0, 5, 7]), mode=mode, return_hidden=True)
    assert set(out["hidden"]) == {0, 1, 2} and out["hidden"][2].shape == (3, 4, 128)


@pytest.mark.parametrize("kwargs,message", [
    ({"input_ids": [0, 999]}, "token id out of range"),
    ({"input_ids": [0, 1], "prefill_len": 3}, "prefill_len"),
    ({"input_ids": [0, 1], "prefill_len": 0}, "prefill_len"),
    ({"input_ids": [], "mode": "fp32"}, "non-empty"),
    ({"input_ids": [[0, 1]]}, "1-D"),
    ({"input_ids": [0, 1], "mode": "bf16"}, "mode must be one of"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reference_logits(MODEL_DIR / "t1-mixed", **kwargs)
