"""Shared pieces of the engine tests (our model inside SGLang)."""

from __future__ import annotations

import copy

from dsv4_agent.model import DeepSeekV4Config
from dsv4_agent.serve.embedded import TINY_CONFIG


def tiny_config(**overrides) -> DeepSeekV4Config:
    """The embedded tiny V4 (every mechanism: SWA, CSA, HCA, hash routing, MTP) with optional changes."""
    hf = copy.deepcopy(TINY_CONFIG)
    hf.update(overrides)
    return DeepSeekV4Config.from_hf(hf)
