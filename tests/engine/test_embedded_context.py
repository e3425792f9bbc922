"""The embedded tiny V4 with a longer context (benchmarks): same weights and tokenizer, own cache folder."""

from __future__ import annotations

import json

import pytest

from dsv4_agent.serve import embedded


def test_max_positions_builds_same_model_with_longer_context(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_AGENT_CACHE", str(tmp_path))
    monkeypatch.delenv(embedded.MAX_POSITIONS_ENV, raising=False)
    default = embedded.ensure_tiny_model(progress=lambda _: None)
    long = embedded.ensure_tiny_model(progress=lambda _: None, max_positions=65536)
    assert long != default and default.name == f"tiny-v4-{embedded.recipe_key()}"
    cfg, cfg_long = (json.loads((d / "config.json").read_text()) for d in (default, long))
    assert cfg["max_position_embeddings"] == 8192 and cfg_long["max_position_embeddings"] == 65536
    assert {k: v for k, v in cfg_long.items() if k != "max_position_embeddings"} == \
        {k: v for k, v in cfg.items() if k != "max_position_embeddings"}
    assert json.loads((long / "tokenizer_config.json").read_text())["model_max_length"] == 65536
    for name in ("model.safetensors", "tokenizer.json"):
        assert (long / name).read_bytes() == (default / name).read_bytes()

    monkeypatch.setenv(embedded.MAX_POSITIONS_ENV, "65536")  # `dsv4-agent serve` without --model-path
    assert embedded.ensure_tiny_model(progress=lambda _: None) == long


@pytest.mark.parametrize("value", ["64k", "16"])
def test_bad_max_positions_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(embedded.MAX_POSITIONS_ENV, value)
    with pytest.raises(ValueError, match=embedded.MAX_POSITIONS_ENV):
        embedded.tiny_config()
