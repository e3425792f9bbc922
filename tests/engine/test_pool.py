"""Our KV pool inside SGLang: per-token cost (issue 6 memory acceptance) and lossless packed pages."""

from __future__ import annotations

import json

import pytest
import torch
from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

from dsv4_agent.model import DeepSeekV4Config, kv_bytes_per_token, marginal_kv_bytes_per_token, ops
from dsv4_agent.serve.v4pool import (
    PackedEntries,
    PackedIndexKeys,
    V4KVPool,
    V4PoolConfigurator,
    page_bytes_per_token,
    resume_state_cap,
    tail_bytes,
)


def _official(shared_dir, name: str) -> DeepSeekV4Config:
    return DeepSeekV4Config.from_hf(json.loads((shared_dir / "configs" / name / "config.json").read_text()))


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_pool_bytes_per_token_match_kv_bytes_per_token(shared_dir, name, monkeypatch):
    monkeypatch.delenv("DSV4_AGENT_MAX_RESUME_STATES", raising=False)
    cfg = _official(shared_dir, name)
    pool = V4KVPool(cfg, 8 * 128 - 128, 128, packed=True)  # 8 pages incl. SGLang's reserved page 0
    measured = pool.page_bytes / (pool.num_pages * 128)  # bytes the pool's tensors hold per token slot
    assert measured == pytest.approx(marginal_kv_bytes_per_token(cfg), rel=1e-9)
    per_token = kv_bytes_per_token(cfg, cfg.max_position_embeddings)  # incl. the per-sequence windows
    assert abs(measured - per_token) / per_token < 0.10
    if name == "deepseek-v4-flash":
        assert measured == 3514.25  # spec section 10
    # the configurator sizes SGLang's token budget with exactly this cost, after the requested tails
    conf = V4PoolConfigurator(cfg, packed=True, tail=1000, requested=4)  # 4 running + 16 resume states
    sizes = conf.calculate_pool_sizes(20 * 1000 + 1000 * 3514.25 * 128, 128)
    if name == "deepseek-v4-flash":
        assert sizes.max_total_num_tokens == 128_000


@pytest.mark.parametrize("requested", [None, 8, 4096])
@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_tails_fit_beside_the_pages(shared_dir, name, requested, monkeypatch):
    """Running requests and resume states hold a tail each (24-36 MiB here): the pages leave room for them,
    and the running limit SGLang resolves afterwards (>= 2048 by default) is lowered to what fits."""
    monkeypatch.delenv("DSV4_AGENT_MAX_RESUME_STATES", raising=False)
    cfg = _official(shared_dir, name)
    conf = V4PoolConfigurator(cfg, packed=True, tail=tail_bytes(cfg), requested=requested)
    budget = 60 * 2**30  # KV budget of one rank
    config = conf.calculate_pool_sizes(budget, 128)
    config.max_running_requests = requested or 2048  # what SGLang resolves
    config = conf.finalize_with_max_running_requests(config)
    running = config.max_running_requests
    pages = config.max_total_num_tokens * page_bytes_per_token(cfg, packed=True)
    tails = (running + resume_state_cap(running)) * tail_bytes(cfg)
    assert pages + tails <= budget
    assert budget - pages - tails < 3 * tail_bytes(cfg) + 128 * page_bytes_per_token(cfg, packed=True)
    if requested == 8:
        assert running == 8 and tails == (8 + 16) * tail_bytes(cfg)  # as asked: the pages make room
    else:
        assert tails <= budget * V4PoolConfigurator.TAIL_SHARE + 3 * tail_bytes(cfg)
        assert 100 < running < 2048
    # a token cap (--max-total-tokens) leaves more room: the running limit is kept when it fits
    conf.calculate_pool_sizes(budget, 128)
    capped = MemoryPoolConfig(max_total_num_tokens=1_000_064, max_running_requests=64)
    assert conf.finalize_with_max_running_requests(capped).max_running_requests == 64


def test_fp32_pool_cost(tiny_config):
    cfg = tiny_config()
    pool = V4KVPool(cfg, 1024, 128, packed=False)
    assert pool.bytes_per_token == page_bytes_per_token(cfg, packed=False)
    # tiny: CSA layers 1 and 3 (entry/4 + key/4), HCA layer 2 (entry/128), fp32
    D, DI = cfg.head_dim, cfg.index_head_dim
    assert pool.bytes_per_token == 2 * (4 * D / 4 + 4 * DI / 4) + 4 * D / 128


@pytest.mark.parametrize("rows", [1, 3, 32])
def test_packed_entries_are_lossless(rows):
    g = torch.Generator().manual_seed(rows)
    D, rope = 512, 64
    x = torch.randn(rows, D, generator=g) * torch.logspace(-6, 3, rows)[:, None]
    x[0, :64] = 0  # an all-zero scale block
    entries = ops.kv_fp8_sim(x.to(torch.bfloat16), rope).float()  # what quant numerics produce
    store = PackedEntries(num_pages=4, per_page=rows, dim=D, rope_dim=rope, device="cpu")
    assert store.record == 584
    store[2] = entries
    assert torch.equal(store[torch.tensor([2])][0], entries)
    assert torch.equal(store[torch.tensor([1])][0], torch.zeros_like(entries))


@pytest.mark.parametrize("rows", [1, 5, 32])
def test_packed_index_keys_are_lossless(rows):
    g = torch.Generator().manual_seed(10 + rows)
    x = torch.randn(rows, 128, generator=g) * torch.logspace(-4, 2, rows)[:, None]
    x[-1, 32:64] = 0
    keys = ops.fp4_sim(ops.hadamard(x.to(torch.bfloat16)), 32).float()
    store = PackedIndexKeys(num_pages=3, per_page=rows, dim=128, device="cpu")
    assert store.record == 68
    store[0] = keys
    assert torch.equal(store[torch.tensor([0, 1])][0], keys)


def test_page_size_must_hold_whole_pages(tiny_config):
    with pytest.raises(ValueError, match="page-size"):
        V4KVPool(tiny_config(), 1024, 64, packed=False)



def test_packed_pool_forward_equals_plain_pool(tmp_path, tiny_config):
    """Released numerics over SGLang-assigned packed pages == over the model's own fp32 page pool."""
    from dsv4_agent.model import PAGE_SIZE, PagePool, SequenceCache, Step, TailState, load_model
    from dsv4_agent.model import save_random_checkpoint as save
    from dsv4_agent.serve.v4pool import PageView

    cfg = tiny_config()
    model = load_model(save(cfg, tmp_path / "ckpt", seed=11))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, cfg.vocab_size, (301,), generator=g).tolist()
    feeds = [prompt[:130], prompt[130:256], prompt[256:]]  # chunks crossing page boundaries, then decodes

    plain = model.new_sequence(PagePool(cfg, 8))
    pool = V4KVPool(cfg, 8 * 128, 128, packed=True)
    free_pages = [6, 2, 5]  # SGLang's allocator hands out arbitrary pages
    pages, tail = [], TailState.empty(cfg, list(range(cfg.n_layers)))
    ref = None
    for k in range(len(feeds) + 3):
        ids = feeds[k] if k < len(feeds) else [int(ref.argmax())]
        ref = model.forward([Step(plain, torch.tensor(ids))], numerics="quant")[0].logits[-1]
        # what DSV4AgentForCausalLM.forward does per request: pages from SGLang, tail from the pool
        new = [free_pages.pop(0) for _ in range(tail.length // PAGE_SIZE, (tail.length + len(ids)) // PAGE_SIZE)]
        seq = SequenceCache(PageView(pool, new), pages, tail, None)
        got = model.forward([Step(seq, torch.tensor(ids))], numerics="quant")[0].logits[-1]
        pages, tail = seq.pages, seq.tail
        assert torch.equal(got, ref)
