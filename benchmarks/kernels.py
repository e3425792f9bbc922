"""Benchmark of the V4 Triton kernels against their PyTorch paths at V4-Flash shapes (needs CUDA).

    python benchmarks/kernels.py [--quick] [--sweep] [--json PATH]

Timing: each Triton op is captured R times on R different input sets in one CUDA graph and the
graph replayed; time per call = median replay time / R (no launch gaps, and successive calls do not
reuse each other's inputs from L2). The PyTorch paths (the fp32 references in `dsv4_agent.kernels`,
and `torch.topk`) are not graph-capturable (host syncs), so they are timed with
`triton.testing.do_bench` (median, L2 flushed before each call). Bytes are the fewest the op must move
(each input read once, each output written once); GB/s is bytes / time, and "%copy" its ratio to
the device-to-device copy bandwidth measured in the same run (bytes read + written).
"""

# The timing closures below capture loop variables on purpose: each is called (or graph-captured)
# within its own iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import triton
from dsv4_agent.kernels import (
    compress_tokens_ref,
    fp4_fake_quant,
    hc_post_ref,
    hc_pre_ref,
    indexer_scores_ref,
    kv_fp8_sim,
    pack_index_keys_fp8,
    pack_kv_fp8,
    sparse_attn_ref,
)
from dsv4_agent.kernels.sparse_attention import decode_window_ranges
from dsv4_agent.kernels.triton_attention import sparse_attn_triton
from dsv4_agent.kernels.triton_compressor import compress_tokens_triton
from dsv4_agent.kernels.triton_indexer import indexer_scores_triton, topk_indices_triton
from dsv4_agent.kernels.triton_mhc import hc_post_triton, hc_pre_triton

H, D, WINDOW, TOPK, HI, DI, PAGE = 64, 512, 128, 512, 64, 128, 64
ROWS: list[dict] = []


def graph_time_us(calls, reps: int = 20) -> float:
    """Median per-call GPU time of `calls` (closures over distinct inputs) replayed as one CUDA graph."""
    for c in calls:  # compile + warm up outside the graph
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def bench_us(fn, rep_ms: int = 200) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e3


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_us(lambda: dst.copy_(src), rep_ms=500) / 1e3


def profile_kernels() -> None:
    """Per-kernel CUDA times of a few ops (torch.profiler), to see where multi-launch ops spend."""
    from torch.profiler import ProfilerActivity, profile

    n = 1 << 18
    scores = torch.randn(1, n, device="cuda")
    n_avail = torch.full((1,), n, device="cuda", dtype=torch.int32)
    d = 4096
    x = torch.randn(64, 4, d, device="cuda").bfloat16()
    fn, scale, base = torch.randn(24, 4 * d, device="cuda") * 0.05, torch.rand(3, device="cuda") + 0.5, \
        torch.randn(24, device="cuda")
    s = compressor_case(4, 128, 8192, 1, 0)
    ops = {"topk512_b1_256K": lambda: topk_indices_triton(scores, n_avail, TOPK),
           "hc_pre_n64": lambda: hc_pre_triton(x, fn, scale, base),
           "compress_csa_indexer_8K": lambda: compress_tokens_triton(*compressor_args(s), 4, True, max_seqlen=8192)}
    for name, op in ops.items():
        op()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                op()
            torch.cuda.synchronize()
        print(f"# profile {name} (10 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def record(op, shape, us, nbytes, copy_gbs, torch_us=None, note=""):
    gbs = nbytes / us / 1e3 if nbytes else None
    row = dict(op=op, shape=shape, us=round(us, 2), MB=round(nbytes / 1e6, 2), GBs=round(gbs, 1) if gbs else None,
               pct_copy=round(100 * gbs / copy_gbs, 1) if gbs else None,
               torch_us=round(torch_us, 1) if torch_us else None,
               speedup=round(torch_us / us, 1) if torch_us else None, note=note)
    ROWS.append(row)
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- sparse attention (decode)


def model_kv(*shape):
    return kv_fp8_sim(torch.randn(*shape, D, device="cuda").bfloat16())


ATTN_CONFIGS = {  # overrides of the dispatch default (`triton_attention.attn_config`)
    "default": {},
    "no_resolve": dict(resolve=False),
    "n32s3v1": dict(block_n=32, num_stages=3, v_splits=1),
    "n64s2v1": dict(block_n=64, num_stages=2, v_splits=1),
    "h16w4": dict(block_h=16, num_warps=4, block_n=32, num_stages=3, v_splits=1),  # mma.sync tiles, 4x the programs
}


def bench_decode_attention(copy_gbs, batches, contexts, sweep):
    pool_entries = 1 << 20  # 1 GiB bf16 pool shared by all sequences (random pages)
    pool = model_kv(pool_entries // PAGE, PAGE)
    pools = {"bf16": pool, "fp8": pack_kv_fp8(pool)}
    for ctx in contexts:
        n_entries = ctx // 4
        for batch in batches:
            n_sets = max(2, min(16, 256 // batch))
            sets = []
            for _ in range(n_sets):
                pages = -(-n_entries // PAGE)
                table = torch.randint(0, pool_entries // PAGE, (batch, pages), device="cuda", dtype=torch.int32)
                idx = torch.stack([torch.randperm(n_entries, device="cuda")[:TOPK] for _ in range(batch)]).int()
                ring = model_kv(batch, WINDOW)
                start, end = decode_window_ranges(torch.arange(batch, device="cuda", dtype=torch.int32),
                                                  torch.full((batch,), ctx - 1, device="cuda", dtype=torch.int32))
                sets.append(dict(q=torch.randn(batch, H, D, device="cuda").bfloat16(),
                                 sink=torch.randn(H, device="cuda"), ring={"bf16": ring.flatten(0, 1),
                                                                           "fp8": pack_kv_fp8(ring).flatten(0, 1)},
                                 start=start, end=end, table=table, idx=idx,
                                 q_seq=torch.arange(batch, device="cuda", dtype=torch.int32)))
            for kind in ("bf16", "fp8"):
                row_bytes = D * 2 if kind == "bf16" else 584
                nbytes = batch * ((WINDOW + TOPK) * row_bytes + 2 * H * D * 2 + TOPK * 4)
                cmp = pools[kind]

                def call(s, cfg):
                    return lambda: sparse_attn_triton(s["q"], s["sink"], s["ring"][kind], s["start"], s["end"], cmp,
                                                      s["table"], s["idx"], s["q_seq"], **cfg)

                configs = ATTN_CONFIGS if sweep else {"default": ATTN_CONFIGS["default"]}
                best, default_us = None, None
                for name, cfg in configs.items():
                    try:
                        us = graph_time_us([call(s, cfg) for s in sets])
                    except Exception as exc:  # a config that does not compile (shared memory) is skipped
                        print(f"# attention config {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    if sweep:
                        print(f"# decode attn {kind} b={batch} ctx={ctx} {name}: {us:.2f} us")
                    if best is None or us < best[1]:
                        best = (name, us)
                    if name == "default":
                        default_us = us
                s0 = sets[0]
                torch_us = None
                if ctx == contexts[0]:
                    torch_us = bench_us(lambda: sparse_attn_ref(s0["q"], s0["sink"], s0["ring"][kind], s0["start"],
                                                                s0["end"], cmp, s0["table"], s0["idx"], s0["q_seq"]))
                record(f"decode_attn_{kind}", f"b={batch} ctx={ctx}", best[1], nbytes, copy_gbs, torch_us,
                       note=f"best of sweep: {best[0]}; dispatch default {default_us:.1f} us" if sweep else "")


# ---------------------------------------------------------------- indexer scoring + top-k


def bench_indexer(copy_gbs, batches, contexts):
    for ctx in contexts:
        n = ctx // 4
        for batch in batches:
            pages = -(-n // PAGE)
            # key values do not change the cost; one sequence's worth of FP8 pages is packed and tiled
            keys = torch.randn(batch * pages, PAGE, DI, device="cuda", dtype=torch.bfloat16)
            packed = pack_index_keys_fp8(keys[:pages]).repeat(batch, 1)
            n_sets = 2
            sets = []
            for _ in range(n_sets):
                sets.append(dict(q=fp4_fake_quant(torch.randn(batch, HI, DI, device="cuda")),
                                 w=torch.randn(batch, HI, device="cuda").bfloat16(),
                                 table=torch.randperm(batch * pages, device="cuda").view(batch, pages).int(),
                                 q_seq=torch.arange(batch, device="cuda", dtype=torch.int32),
                                 n_avail=torch.full((batch,), n, device="cuda", dtype=torch.int32)))
            for kind, kv in (("bf16", keys), ("fp8", packed)):
                ps = PAGE if kind == "fp8" else None
                entry_bytes = DI * 2 if kind == "bf16" else DI + DI // 32
                nbytes = batch * (n * (entry_bytes + 4) + HI * DI * 2)
                us = graph_time_us([lambda s=s: indexer_scores_triton(s["q"], s["w"], kv, s["table"], s["q_seq"],
                                                                      s["n_avail"], n, ps) for s in sets])
                s0 = sets[0]
                torch_us = None
                if batch == 1:
                    torch_us = bench_us(lambda: indexer_scores_ref(s0["q"], s0["w"], kv, s0["table"], s0["q_seq"],
                                                                   s0["n_avail"], n, ps))
                record(f"indexer_scores_{kind}", f"b={batch} ctx={ctx} n={n}", us, nbytes, copy_gbs, torch_us)
            # top-k of the scores, and the whole selection (scores + top-k) against PyTorch
            scores = [indexer_scores_triton(s["q"], s["w"], keys, s["table"], s["q_seq"], s["n_avail"], n)
                      for s in sets]
            torch_us = bench_us(lambda: torch.topk(scores[0], TOPK, dim=-1))
            us = graph_time_us([lambda sc=sc, s=s: topk_indices_triton(sc, s["n_avail"], TOPK)
                                for sc, s in zip(scores, sets, strict=True)])
            record("topk512", f"b={batch} n={n}", us, batch * n * 4, copy_gbs, torch_us, note="vs torch.topk")
            if batch == 1:
                s0 = sets[0]
                us = graph_time_us([lambda s=s: topk_indices_triton(
                    indexer_scores_triton(s["q"], s["w"], keys, s["table"], s["q_seq"], s["n_avail"], n),
                    s["n_avail"], TOPK) for s in sets])
                torch_us = bench_us(lambda: torch.topk(indexer_scores_ref(s0["q"], s0["w"], keys, s0["table"],
                                                                          s0["q_seq"], s0["n_avail"], n), TOPK))
                record("indexer+topk_bf16", f"b=1 ctx={ctx}", us, n * (DI * 2 + 8), copy_gbs, torch_us)


# ---------------------------------------------------------------- compressor


def inv_freq_table():
    return 1.0 / 160000 ** (torch.arange(0, 64, 2, device="cuda", dtype=torch.float32) / 64)


def compressor_case(ratio, c, tokens, batch, start, dtype=torch.float32):
    kappa = 2 if ratio == 4 else 1
    kc = kappa * c
    n_entries = (start + tokens) // ratio + 1
    pages = -(-n_entries // PAGE)
    return dict(
        kv=torch.randn(batch * tokens, kc, device="cuda").to(dtype),
        score=torch.randn(batch * tokens, kc, device="cuda").to(dtype),
        ape=torch.randn(ratio, kc, device="cuda"), w=torch.rand(c, device="cuda") + 0.5, inv=inv_freq_table(),
        cu=torch.arange(batch + 1, device="cuda", dtype=torch.int32) * tokens,
        start=torch.full((batch,), start, device="cuda", dtype=torch.int32),
        st_kv=torch.randn(batch, kappa * ratio, kc, device="cuda"),
        st_score=torch.randn(batch, kappa * ratio, kc, device="cuda"),
        slot=torch.arange(batch, device="cuda", dtype=torch.int32),
        out=torch.empty(batch * pages, PAGE, c, device="cuda", dtype=torch.bfloat16),
        table=torch.arange(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages),
    )


def compressor_args(s):
    return (s["kv"], s["score"], s["ape"], s["w"], s["inv"], s["cu"], s["start"], s["st_kv"], s["st_score"],
            s["slot"], s["out"], s["table"])


def bench_compressor(copy_gbs, quick):
    layers = {"csa_main": (4, 512, False), "csa_indexer": (4, 128, True), "hca": (128, 512, False)}
    for name, (ratio, c, indexer) in layers.items():
        kappa = 2 if ratio == 4 else 1
        for tokens in ([8192] if quick else [8192, 65536]):
            for dtype in (torch.float32, torch.bfloat16):
                s = compressor_case(ratio, c, tokens, 1, 0, dtype)
                nbytes = 2 * tokens * kappa * c * s["kv"].element_size() + tokens // ratio * c * 2
                us = graph_time_us([lambda: compress_tokens_triton(*compressor_args(s), ratio, indexer,
                                                                   max_seqlen=tokens)] * 2)
                if indexer:
                    alt = graph_time_us([lambda: compress_tokens_triton(*compressor_args(s), ratio, indexer,
                                                                        max_seqlen=tokens, hadamard="dot")] * 2)
                    record(f"compress_bulk_{name}_hadamard_dot", f"tokens={tokens} in={str(dtype)[6:]}", alt,
                           nbytes, copy_gbs)
                torch_us = None
                if tokens == 8192 and dtype == torch.float32:
                    torch_us = bench_us(lambda: compress_tokens_ref(*compressor_args(s), ratio, indexer), rep_ms=50)
                record(f"compress_bulk_{name}", f"tokens={tokens} in={str(dtype)[6:]}", us, nbytes, copy_gbs,
                       torch_us)
        for batch in (1, 64):  # decode: one token per sequence, the last of its block (entry formed)
            s = compressor_case(ratio, c, 1, batch, ratio * 1000 - 1)
            nbytes = batch * (kappa * ratio * c * 4 * 2 + c * 2 + kappa * c * 4 * 2)  # candidates, entry, state row
            us = graph_time_us([lambda: compress_tokens_triton(*compressor_args(s), ratio, indexer, max_seqlen=1)] * 2)
            record(f"compress_decode_{name}", f"b={batch}", us, nbytes, copy_gbs)


# ---------------------------------------------------------------- mHC


def bench_mhc(copy_gbs):
    d = 4096
    fn = torch.randn(24, 4 * d, device="cuda") * 0.05
    scale, base = torch.rand(3, device="cuda") + 0.5, torch.randn(24, device="cuda")
    for n in (1, 64, 8192):
        x = torch.randn(n, 4, d, device="cuda").bfloat16()
        v = torch.randn(n, d, device="cuda").bfloat16()
        us = graph_time_us([lambda: hc_pre_triton(x, fn, scale, base)] * 4)
        torch_us = bench_us(lambda: hc_pre_ref(x, fn, scale, base))
        record("hc_pre", f"n={n} d={d}", us, n * (4 * d * 2 + d * 2 + 80) + fn.numel() * 4, copy_gbs, torch_us)
        _, post, comb = hc_pre_triton(x, fn, scale, base)
        us = graph_time_us([lambda: hc_post_triton(v, x, post, comb)] * 4)
        torch_us = bench_us(lambda: hc_post_ref(v, x, post, comb))
        record("hc_post", f"n={n} d={d}", us, n * (4 * d * 2 * 2 + d * 2 + 80), copy_gbs, torch_us)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--sweep", action="store_true", help="try several attention tile configs, keep the best")
    parser.add_argument("--only", default="attn,indexer,compressor,mhc")
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"# device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    t0 = time.time()
    sections = {
        "attn": lambda: bench_decode_attention(copy_gbs, [1, 8, 64] if args.quick else [1, 2, 8, 32, 64],
                                               [131072] if args.quick else [8192, 1 << 20], args.sweep),
        "indexer": lambda: bench_indexer(copy_gbs, [1, 64] if args.quick else [1, 8, 64],
                                         [131072, 1 << 20] if args.quick else [8192, 131072, 1 << 20]),
        "compressor": lambda: bench_compressor(copy_gbs, args.quick),
        "mhc": lambda: bench_mhc(copy_gbs),
        "profile": profile_kernels,
    }
    for name in args.only.split(","):
        try:
            sections[name]()
        except Exception:  # keep the other sections' numbers
            traceback.print_exc()
        torch.cuda.empty_cache()
    print(f"# total {time.time() - t0:.0f} s")
    print("\n| op | shape | Triton us | MB | GB/s | % copy BW | PyTorch us | speed-up | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['op']} | {r['shape']} | {r['us']} | {r['MB']} | {r['GBs']} | {r['pct_copy']} | "
              f"{r['torch_us'] or '-'} | {r['speedup'] or '-'} | {r['note']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, copy_gbs=copy_gbs, rows=ROWS), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
