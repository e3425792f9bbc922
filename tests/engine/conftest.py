"""Shared pieces of the engine tests (our model inside SGLang)."""

from __future__ import annotations

import copy

import pytest

from dsv4_agent.model import DeepSeekV4Config
from dsv4_agent.serve.embedded import TINY_CONFIG


@pytest.fixture
def tiny_config():
    """Factory: the embedded tiny V4 (SWA, CSA, HCA, hash routing, MTP) with optional changes."""

    def make(**overrides) -> DeepSeekV4Config:
        hf = copy.deepcopy(TINY_CONFIG)
        hf.update(overrides)
        return DeepSeekV4Config.from_hf(hf)

    return make
