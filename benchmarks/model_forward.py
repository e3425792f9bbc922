"""Throughput of the plain-PyTorch DeepSeek-V4 path (prefill, decode, batched decode) on a seeded random
model in the released format; on a non-CPU device also its agreement with the CPU result.

    python benchmarks/model_forward.py [--device cuda] [--tokens 1024] [--decode 32] [--batch 8] [--hidden 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dsv4_agent.model import PAGE_SIZE, PagePool, Step, load_model, save_random_checkpoint, tiny_config


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=1024, help="prefill length")
    ap.add_argument("--decode", type=int, default=32, help="decode steps after the prefill")
    ap.add_argument("--batch", type=int, default=8, help="sequences in the batched-decode measurement")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="fp32", choices=["fp32", "fp32_sim", "quant"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = tiny_config(hidden_size=args.hidden, index_topk=64, sliding_window=128, max_position_embeddings=1 << 16)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(save_random_checkpoint(cfg, tmp, seed=0))
    cpu_model = model
    model = model.to(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.tokens + args.decode,), generator=g)
    pool = PagePool(cfg, (args.tokens + args.decode) // PAGE_SIZE * (args.batch + 2) + args.batch + 2,
                    device=args.device)
    dev_ids = ids.to(args.device)

    seq = model.new_sequence(pool)
    model.forward([Step(seq, dev_ids[:8])], numerics=args.mode)  # warm-up
    seq.release()
    seq = model.new_sequence(pool)
    sync(args.device)
    t0 = time.perf_counter()
    out = model.forward([Step(seq, dev_ids[: args.tokens])], numerics=args.mode)[0]
    sync(args.device)
    t_prefill = time.perf_counter() - t0
    logits = [out.logits]
    t0 = time.perf_counter()
    for t in range(args.tokens, args.tokens + args.decode):
        logits.append(model.forward([Step(seq, dev_ids[t:t + 1])], numerics=args.mode)[0].logits)
    sync(args.device)
    t_decode = time.perf_counter() - t0
    state = seq.snapshot()
    seqs = [type(seq).restore(pool, state) for _ in range(args.batch)]
    t0 = time.perf_counter()
    for k in range(4):
        model.forward([Step(s, dev_ids[k:k + 1]) for s in seqs], numerics=args.mode)
    sync(args.device)
    t_batch = (time.perf_counter() - t0) / 4

    print(f"device={args.device} mode={args.mode} hidden={args.hidden} layers={cfg.n_layers} "
          f"ratios={list(cfg.compress_ratios)}")
    print(f"prefill {args.tokens} tokens: {t_prefill * 1e3:.1f} ms ({args.tokens / t_prefill:.0f} tok/s)")
    print(f"decode: {t_decode / args.decode * 1e3:.2f} ms/token")
    print(f"batched decode x{args.batch}: {t_batch * 1e3:.2f} ms/step ({args.batch / t_batch:.0f} tok/s)")
    if args.device != "cpu":
        ref_pool = PagePool(cfg, pool.num_pages)
        ref_seq = cpu_model.to("cpu").new_sequence(ref_pool)
        ref = cpu_model.forward([Step(ref_seq, ids[: args.tokens])], numerics=args.mode)[0].logits
        got = logits[0].cpu()
        err = ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
        print(f"prefill logits vs CPU: max_rel {err:.2e}")


if __name__ == "__main__":
    main()
