"""Tensor parallelism of our model: the model sharded over 2 ranks (CPU, gloo) gives the logits of 1 rank.

SGLang's CPU engine has no `--tp 2` without its AMX shared-memory all-reduce, so the sharded modules of
``dsv4_agent.serve.tp`` are tested directly: both ranks run the same steps (prefill, chunk, decode) over
their own page pools, with ``torch.distributed.all_reduce`` on gloo as the all-reduce.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4_agent.model import DeepSeekV4Config, PagePool, Step, load_model, save_random_checkpoint
from dsv4_agent.serve.tp import shard_model


def _run(model, prompts: list[list[int]], chunks: list[int]) -> list[torch.Tensor]:
    """Feed every prompt in the given chunk sizes (all sequences batched together), then 3 greedy decodes;
    returns per sequence the logits of every step's last token."""
    pool = PagePool(model.config, 64)
    seqs = [model.new_sequence(pool) for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    pos = [0] * len(prompts)
    for size in chunks:
        steps, owners = [], []
        for i, p in enumerate(prompts):
            if pos[i] < len(p):
                steps.append(Step(seqs[i], torch.tensor(p[pos[i]:pos[i] + size])))
                owners.append(i)
                pos[i] = min(len(p), pos[i] + size)
        for i, out in zip(owners, model.forward(steps, numerics="fp32"), strict=True):
            logits[i].append(out.logits[-1])
    for _ in range(3):
        nxt = [int(lg[-1].argmax()) for lg in logits]
        outs = model.forward([Step(s, torch.tensor([t])) for s, t in zip(seqs, nxt, strict=True)], numerics="fp32")
        for i, out in enumerate(outs):
            logits[i].append(out.logits[-1])
    return [torch.stack(lg) for lg in logits]


def _worker(rank: int, size: int, port: int, ckpt: str, prompts, chunks, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        model = load_model(ckpt)

        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(x)
            return x

        shard_model(model, rank, size, all_reduce)
        out = _run(model, prompts, chunks)
        if rank == 0:
            queue.put([t.clone() for t in out])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_ranks_match_one(tmp_path, tiny_config):
    cfg: DeepSeekV4Config = tiny_config()
    ckpt = save_random_checkpoint(cfg, tmp_path / "ckpt", seed=7)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 131, 261)]
    chunks = [100, 100, 100]  # chunked prefill crossing a page boundary, then decode
    expected = _run(load_model(ckpt), prompts, chunks)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(ckpt), prompts, chunks, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = queue.get(timeout=280)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for e, o in zip(expected, got, strict=True):
        assert e.shape == o.shape
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)
        assert torch.equal(o.argmax(-1), e.argmax(-1))


def test_shard_shapes_and_errors(tmp_path, tiny_config):
    cfg = tiny_config()
    model = load_model(save_random_checkpoint(cfg, tmp_path / "ckpt", seed=3))
    full_wq_b = model.layers[1].attn.wq_b.weight.clone()
    shard_model(model, 1, 2, lambda x: x)
    attn = model.layers[1].attn
    assert attn.n_heads == cfg.num_attention_heads // 2 and attn.n_groups == cfg.o_groups // 2
    half = full_wq_b.shape[0] // 2
    assert torch.equal(attn.wq_b.weight, full_wq_b[half:])  # rank 1 holds the second block of heads
    assert attn.wo_b.inner.weight.shape[1] == cfg.o_groups * cfg.o_lora_rank // 2
    expert = model.layers[1].ffn.inner.experts[0]
    assert expert.w1.weight.shape[0] == cfg.moe_intermediate_size // 2
    with pytest.raises(ValueError, match="num_attention_heads"):
        shard_model(load_model(tmp_path / "ckpt"), 0, 3, lambda x: x)
