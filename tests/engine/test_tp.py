"""Tensor parallelism of the SGLang model class: 2 ranks (CPU, gloo) give the logits of 1 rank.

Each rank is a process that initialises SGLang's own parallel state (``init_distributed_environment`` +
``initialize_model_parallel`` on gloo), builds ``DSV4AgentForCausalLM`` (SGLang's Column/Row/ReplicatedLinear
with our checkpoint-precision weights) and streams SGLang's own safetensors iterator into ``load_weights``.
Both ranks run the same steps (batched prefills in chunks crossing a page, then decodes) over their own page
pools; SGLang's all-reduce sums the partial outputs. (SGLang's CPU server has no ``--tp 2`` without its AMX
shared-memory all-reduce, so the ranks are driven here directly.)
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from dsv4_agent.model import DeepSeekV4, PagePool, Step, load_model, ops, save_random_checkpoint
from dsv4_agent.model.model import SINGLE_RANK
from dsv4_agent.serve.cli import SHIM_DIR
from dsv4_agent.serve.testing import free_port

SHARDED = ("attn.wq_b.", "attn.wo_a.", "attn.wo_b.", "attn.attn_sink", "experts.", "embed.", "head.")


def _run(model, prompts: list[list[int]], chunks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Feed every prompt in the given chunk sizes (all sequences batched together), then 3 greedy decodes;
    returns per sequence the logits of every step's last token, and the MTP block's logits at every position
    (fed the main streams and next tokens in the same chunk sizes)."""
    pool = PagePool(model.config, 64)
    seqs = [model.new_sequence(pool) for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    streams: list[list[torch.Tensor]] = [[] for _ in prompts]
    fed = [list(p) for p in prompts]
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
            streams[i].append(out.streams)
    for _ in range(3):
        nxt = [int(lg[-1].argmax()) for lg in logits]
        outs = model.forward([Step(s, torch.tensor([t])) for s, t in zip(seqs, nxt, strict=True)], numerics="fp32")
        for i, (out, t) in enumerate(zip(outs, nxt, strict=True)):
            logits[i].append(out.logits[-1])
            streams[i].append(out.streams)
            fed[i].append(t)
    # MTP: position t's main stream + token t + 1 -> the prediction of token t + 2
    mtp: list[list[torch.Tensor]] = [[] for _ in prompts]
    all_streams = [torch.cat(st) for st in streams]
    pos = [0] * len(prompts)
    while any(pos[i] < len(f) - 1 for i, f in enumerate(fed)):
        spans = {i: (pos[i], min(len(f) - 1, pos[i] + chunks[0])) for i, f in enumerate(fed) if pos[i] < len(f) - 1}
        outs = model.forward_mtp([seqs[i] for i in spans], [all_streams[i][a:b] for i, (a, b) in spans.items()],
                                 [torch.tensor(fed[i][a + 1:b + 1]) for i, (a, b) in spans.items()], numerics="fp32")
        for (i, (_, b)), out in zip(spans.items(), outs, strict=True):
            mtp[i].append(out)
            pos[i] = b
    return [torch.stack(lg) for lg in logits], [torch.cat(m) for m in mtp]


def _param_bytes(model: torch.nn.Module) -> dict[str, int]:
    return {n: p.numel() * p.element_size() for n, p in model.named_parameters()}


def _worker(rank: int, size: int, port: int, ckpt: str, prompts, chunks, queue) -> None:
    # SGLang's CPU platform, and no PyNccl: initialize_model_parallel creates a PyNcclCommunicator for every
    # in-tree platform (parallel_state.py init_model_parallel_group), which then enters torch.cuda.device(cpu)
    # (pynccl.py:116) because the CUDA torch wheel's NCCL library loads; a missing library disables it cleanly.
    os.environ.update(SGLANG_USE_CPU_ENGINE="1", SGLANG_NCCL_SO_PATH="/nonexistent/libnccl.so.2")
    sys.path.insert(0, str(SHIM_DIR))
    torch.set_num_threads(1)
    from sglang.srt.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator
    from sglang.test.test_utils import publish_build_topology

    from dsv4_agent.serve.models.dsv4 import DSV4AgentForCausalLM

    init_distributed_environment(world_size=size, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    publish_build_topology(world_rank=rank, tp_size=size, ep_size=1, pp_size=1, device="cpu")
    initialize_model_parallel(backend="gloo")
    try:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # as SGLang builds models (--dtype auto)
        try:
            model = DSV4AgentForCausalLM(SimpleNamespace(_name_or_path=ckpt))
        finally:
            torch.set_default_dtype(prev)
        files = sorted(str(p) for p in Path(ckpt).glob("*.safetensors"))
        model.load_weights(safetensors_weights_iterator(files))
        m = model.model
        parts = {name: (lyr.dequantized(), lyr.block_offset) for name, lyr in (
            ("wq_b", m.layers[1].attn.wq_b), ("wo_a", m.layers[1].attn.wo_a), ("wo_b", m.layers[1].attn.wo_b),
            ("shared_w1", m.layers[1].ffn.shared_experts.w1), ("shared_w2", m.layers[1].ffn.shared_experts.w2),
            ("expert_w2", m.layers[2].ffn.experts[3].w2))}
        parts.update(embed=(m.embed.weight.float(), None), head=(m.head.weight.float(), None))
        out = _run(m, prompts, chunks)
        # plain pickle copies the tensors: a rank may exit before the test reads its result
        queue.put(pickle.dumps((rank, out, _param_bytes(m), parts, m.layers[1].attn.attn_sink.clone())))
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


def _start(size: int, ckpt, prompts, chunks) -> tuple[list, object]:
    """Start the ``size`` rank processes of one tensor-parallel group."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, size, port, str(ckpt), prompts, chunks, queue))
             for r in range(size)]
    for p in procs:
        p.start()
    return procs, queue


def _results(procs: list, queue) -> list[tuple]:
    size = len(procs)
    results = []
    while len(results) < size:  # fail fast when a rank dies instead of waiting out the timeout
        try:
            results.append(pickle.loads(queue.get(timeout=2)))
        except queue_module.Empty:
            assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
    results.sort(key=lambda r: r[0])
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


@pytest.mark.timeout(420)
def test_two_ranks_match_one_and_hold_their_shard(tmp_path, tiny_config):
    cfg = tiny_config()
    ckpt = save_random_checkpoint(cfg, tmp_path / "ckpt", seed=7, max_shard_bytes=600_000)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 131, 261)]
    chunks = [100, 100, 100]  # chunked prefill crossing a page boundary, then decode

    group_of_one, group_of_two = _start(1, ckpt, prompts, chunks), _start(2, ckpt, prompts, chunks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: a GEMM's summation order may depend on the thread count
    try:
        plain = _run(load_model(ckpt), prompts, chunks)
    finally:
        torch.set_num_threads(threads)
    one, = _results(*group_of_one)
    two = _results(*group_of_two)

    # 1 rank of SGLang layers == the plain model, bit for bit (same stored weights, same ops), MTP block too
    for e, o in zip([*plain[0], *plain[1]], [*one[1][0], *one[1][1]], strict=True):
        assert torch.equal(o, e)
    assert [m.shape[0] for m in one[1][1]] == [len(p) + 2 for p in prompts]
    # 2 ranks == 1 rank up to the all-reduce's summation order, on both ranks
    for _, (logits, mtp), *_ in two:
        for e, o in zip([*one[1][0], *one[1][1]], [*logits, *mtp], strict=True):
            assert e.shape == o.shape
            torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)
            assert torch.equal(o.argmax(-1), e.argmax(-1))

    # each rank's parameters: its contiguous block of rows (column-parallel) / columns (row-parallel), also
    # where the block starts inside an FP8 128x128 / FP4 32-wide scale block (tiny widths: 64 of 128)
    full = one[3]
    for rank, _, _, parts, sink in two:
        for name, (w, _) in parts.items():
            whole = full[name][0]
            if name in ("wq_b", "wo_a", "shared_w1", "embed", "head"):  # column- / vocab-parallel
                n = whole.shape[0] // 2
                assert torch.equal(w, whole[rank * n:(rank + 1) * n]), name
            else:
                n = whole.shape[1] // 2
                assert torch.equal(w, whole[:, rank * n:(rank + 1) * n]), name
        assert parts["wo_b"][1] == (0, rank * 64)
        assert torch.equal(sink, one[4][rank * 2:(rank + 1) * 2])

    # bytes: the sharded parts are halved (FP8 scales of a block two ranks share are held by both), the rest
    # is replicated; nothing is held in fp32 beyond the small norms / mHC / sinks / ape
    def split(b: dict[str, int]) -> tuple[int, int, int]:
        sharded = sum(v for k, v in b.items() if any(s in k for s in SHARDED))
        sharded_w = sum(v for k, v in b.items() if any(s in k for s in SHARDED) and not k.endswith(".scale"))
        return sharded, sharded_w, sum(b.values()) - sharded

    full_sharded, full_w, full_rest = split(one[2])
    for _, _, b, *_ in two:
        sharded, sharded_w, rest = split(b)
        assert sharded_w * 2 == full_w
        assert full_sharded / 2 <= sharded <= full_sharded * 0.51
        assert rest == full_rest


def test_split_sizes_must_divide(tiny_config):
    with pytest.raises(ValueError, match="num_attention_heads = 4"):
        DeepSeekV4(tiny_config(), replace(SINGLE_RANK, size=3))
    with pytest.raises(ValueError, match="o_groups = 1"):
        DeepSeekV4(tiny_config(o_groups=1), replace(SINGLE_RANK, size=2))


def test_dequantize_a_shard_starting_inside_a_block():
    """ops.dequant_weight with an offset == the full dequantization's slice (FP8 rows / columns, FP4 columns)."""
    from dsv4_agent.model.checkpoint import quantize_fp4_weight, quantize_fp8_weight

    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 260, generator=g)
    q, s = quantize_fp8_weight(w)
    whole = ops.dequant_weight(q, s, "fp8")
    for r0, r1, c0, c1 in [(100, 300, 0, 260), (0, 1, 130, 131), (128, 256, 64, 200), (37, 38, 255, 260)]:
        b0, k0 = r0 // 128, c0 // 128
        part = ops.dequant_weight(q[r0:r1, c0:c1], s[b0:-(-r1 // 128), k0:-(-c1 // 128)], "fp8",
                                  (r0 % 128, c0 % 128))
        assert torch.equal(part, whole[r0:r1, c0:c1])
    q4, s4 = quantize_fp4_weight(w[:, :256])
    whole4 = ops.dequant_weight(q4, s4, "fp4")
    for c0, c1 in [(16, 48), (0, 2), (96, 256), (34, 36)]:
        part = ops.dequant_weight(q4[:, c0 // 2:c1 // 2], s4[:, c0 // 32:-(-c1 // 32)], "fp4", (0, c0 % 32))
        assert torch.equal(part, whole4[:, c0:c1])
