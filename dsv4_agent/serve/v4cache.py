"""SGLang registrations of our compressed KV cache; :func:`register` is called by the dsv4_agent plugin.

Hooks used (SGLang 0.5.23, pinned), all gated on our architecture name and falling through otherwise:

* ``register_model_override("DSV4AgentForCausalLM")``: per-arch server defaults (page size 128 = our page,
  no overlap scheduling so that a request's tail is never read while the next batch
  is prepared, no CUDA graphs).
* AROUND ``pool_configurator.create_memory_pool_configurator``: size the pool by the real per-token cost
  of our compressed pages (``v4pool.page_bytes_per_token``) plus the fixed cost of request tails and
  resume states, instead of SGLang's uncompressed per-token MHA cell.
* AROUND ``KVCacheConfigurator._build_token_to_kv_pool``: build :class:`V4KVPool` (pages addressed by
  ``loc // 128``) and hook row allocation (``register_on_alloc_rows``) so that no request reads a state
  left in its row by a previous request. SGLang's stock paged allocator is built around it.
* AROUND ``ModelConfig._parse_quant_hf_config``: no SGLang quantization method for our checkpoints (our
  linears bring their own ``StoredWeightMethod`` for the FP8/FP4 tensors; SGLang's fp8 method is CUDA-only
  and would replace it).
* ``register_radix_cache_backend("v4tail", ...)``: :class:`dsv4_agent.serve.v4radix.V4TailRadixCache`,
  SGLang's RadixCache plus resume states on nodes (exact resume at any position). ``radix_cache_backend``
  is not model-overridable, so an AROUND hook on ``registry.default_radix_cache_factory`` picks the same
  cache whenever our pool is in use and no backend was named (any other tree would share our pages
  without the resume states).

No SGLang file is patched. The two AROUND hooks target private names; the version pin protects them and
:func:`register` fails loudly if they moved.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

RADIX_BACKEND = "v4tail"
_registered = False


def _overrides(server_args, hf_config) -> dict:
    """Server-arg defaults for our architecture (explicit user flags win where SGLang lets them)."""
    out: dict = {"disable_overlap_schedule": True}
    page = getattr(server_args, "page_size", None)
    if not page or page % 128:
        out["page_size"] = 128
    return out


def _no_sglang_quantization(original, model_config, *args, **kwargs):
    """AROUND hook on ``ModelConfig._parse_quant_hf_config``: our linears keep and dequantize the released
    FP8/FP4 weights themselves, so SGLang's quantization methods must not see the checkpoint's
    quantization_config."""
    from dsv4_agent.serve.v4pool import is_ours

    if is_ours(model_config.hf_config):
        return None
    return original(model_config, *args, **kwargs)


def register() -> None:
    """Register the model override, the pool hooks and the radix backend (idempotent, every process)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.model_override_base import register_model_override
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.registry import register_radix_cache_backend
    from sglang.srt.model_executor import pool_configurator
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from dsv4_agent.serve import v4pool, v4radix

    for owner, name in ((pool_configurator, "create_memory_pool_configurator"),
                        (KVCacheConfigurator, "_build_token_to_kv_pool")):
        if not hasattr(owner, name):
            raise RuntimeError(f"sglang changed: {owner.__name__}.{name} is gone (dsv4-agent needs sglang==0.5.23)")
    register_model_override(v4pool.ARCH)(_overrides)
    HookRegistry.register("sglang.srt.model_executor.pool_configurator.create_memory_pool_configurator",
                          v4pool.hook_pool_configurator, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool",
                          v4pool.hook_build_pool, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.registry.default_radix_cache_factory",
                          v4radix.hook_default_factory, HookType.AROUND)
    register_radix_cache_backend(RADIX_BACKEND, v4radix.create)
    HookRegistry.register("sglang.srt.configs.model_config.ModelConfig._parse_quant_hf_config",
                          _no_sglang_quantization, HookType.AROUND)
    _registered = True
