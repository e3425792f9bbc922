"""DeepSeek-V4 forward pass in plain PyTorch (spec sections 3-6), over the paged cache of ``cache.py``.

Module and parameter names equal the released checkpoint keys (``layers.L.attn.wq_a.weight`` / ``.scale``,
...), so a state dict loads by name. Linear weights stay in checkpoint precision (FP8 e4m3 + ue8m0 block scales,
packed FP4 + per-32 scales, BF16: ~1 / 0.5 / 2 bytes a parameter) and are dequantized exactly to fp32 when used.

Tensor parallelism is injected (:class:`TensorParallel`): a factory for the split linears and an all-reduce.
The plain model (``tp=None``) holds everything with its own :class:`Linear`; a serving engine passes its
parallel layers, and each rank then holds its query heads / output groups / expert widths / vocabulary block.

One forward call extends a batch of sequences (:class:`Step`), each from its own cached length by any
number of tokens; dense work (projections, MoE) runs over all tokens of the batch together, attention per
sequence. Prefill, chunked prefill and decode are the same code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from . import ops
from .cache import PAGE_SIZE, LayerTail, PagePool, ResumeState, SequenceCache, TailState
from .config import DeepSeekV4Config
from .ops import Numerics

# ---------------------------------------------------------------------------------------------------------
# Leaf modules
# ---------------------------------------------------------------------------------------------------------
Split = Literal["replicated", "column", "row", "vocab"]


class Linear(nn.Module):
    """y = x W^T, W [out, in] kept as the checkpoint stores it and dequantized exactly to fp32 when used.

    ``stored`` = checkpoint format: "fp8" (``weight`` float8_e4m3fn [out, in] + ``scale`` float8_e8m0fnu
    [ceil(out/128), ceil(in/128)]), "fp4" (``weight`` int8 [out, in/2] packed e2m1 + ``scale`` [out, in/32]) or
    "bf16" (``weight`` only). ``gemm`` = how the reference multiplies (spec 2.6; :func:`ops.linear`): "fp8" /
    "fp4" (FP8-quantized activations), "bf16" or "fp32"; by default the stored format.
    """

    def __init__(self, in_features: int, out_features: int, stored: str, gemm: str | None = None):
        super().__init__()
        weight, scale = ops.stored_weight_shapes(out_features, in_features, stored)
        self.weight = nn.Parameter(torch.zeros(weight[0], dtype=weight[1]), requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(torch.zeros(scale[0], dtype=scale[1]),
                                                             requires_grad=False)
        self.stored, self.gemm = stored, gemm or stored

    def dequantized(self) -> torch.Tensor:
        """fp32 [out, in]."""
        return ops.dequant_weight(self.weight, self.scale, self.stored)

    def forward(self, x: torch.Tensor, num: Numerics) -> torch.Tensor:
        return ops.linear(x, self.dequantized(), self.gemm, num)


class LinearLike(Protocol):
    """What the model needs of a linear layer (a :class:`Linear` or an engine's parallel layer)."""

    def __call__(self, x: torch.Tensor, num: Numerics) -> torch.Tensor: ...

    def dequantized(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class TensorParallel:
    """How a model is split over ``size`` tensor-parallel ranks (the Megatron pattern SGLang shards DeepSeek by).

    ``linear(in_features, out_features, stored, gemm, split, prefix)`` builds this rank's part of a linear
    (``split`` "column": output rows split; "row": input columns split, partial outputs; "vocab": output rows
    split, outputs gathered, for the head; "replicated"), named ``prefix`` in the checkpoint.
    ``embedding(vocab_size, dim)`` builds the token embedding (``module(ids)`` -> bf16 rows [n, dim], complete
    on every rank). ``all_reduce`` sums partial outputs over the ranks (may work in place).

    * attention: query heads split in contiguous blocks (``wq_b`` rows, ``attn_sink``); the output groups follow
      their heads (``wo_a`` rows); ``wo_b`` is row-parallel and all-reduced. The single shared KV vector, the
      compressors and the indexer are computed redundantly on every rank (MQA: one KV head);
    * MoE: every expert's (and the shared expert's) intermediate dim is split (``w1`` / ``w3`` rows, ``w2``
      columns); the routed + shared sum is all-reduced once per layer;
    * embedding and head: the vocabulary split in contiguous blocks (embedding rows summed, logits gathered);
    * norms, mHC, the gate and the MTP projections are replicated.
    """

    size: int
    linear: Callable[[int, int, str, str, Split, str], LinearLike]
    embedding: Callable[[int, int], nn.Module]
    all_reduce: Callable[[torch.Tensor], torch.Tensor]

    def check(self, cfg: DeepSeekV4Config) -> None:
        for name in ("num_attention_heads", "o_groups", "moe_intermediate_size"):
            if getattr(cfg, name) % self.size:
                raise ValueError(f"tensor parallel size {self.size} does not divide {name} = {getattr(cfg, name)}")


def _plain_linear(in_features: int, out_features: int, stored: str, gemm: str, split: Split,
                  prefix: str) -> Linear:
    return Linear(in_features, out_features, stored, gemm)


def _plain_embedding(vocab_size: int, dim: int) -> nn.Embedding:
    embed = nn.Embedding(vocab_size, dim, dtype=torch.bfloat16)  # as stored; exact in any act dtype
    embed.weight.requires_grad_(False)
    return embed


SINGLE_RANK = TensorParallel(1, _plain_linear, _plain_embedding, lambda x: x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, num: Numerics) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, num.act_dtype)


def _param(*shape: int, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


# ---------------------------------------------------------------------------------------------------------
# Per-call bookkeeping
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One sequence's share of a batch: append ``token_ids`` [n] at positions ``seq.length ..``."""

    seq: SequenceCache
    token_ids: torch.Tensor
    snapshot_at: tuple[int, ...] = ()


@dataclass
class StepOutput:
    logits: torch.Tensor | None  # fp32 [n, vocab] (None with compute_logits=False)
    streams: torch.Tensor  # [n, hc, d] output of the last main block (input of hc_head and of MTP)
    hidden: list[torch.Tensor] | None  # per main layer [n, hc, d] when requested
    snapshots: dict[int, ResumeState] = field(default_factory=dict)


@dataclass
class _Segment:
    """Rows ``rows`` of the batch belong to one sequence and extend ``tail`` from ``start`` by ``n``."""

    rows: slice
    start: int
    n: int
    tail: TailState
    pages: list[int]  # page table, already including the pages this call completes
    ends: tuple[int, ...]  # lengths at which to emit a per-layer tail (snapshots, then the final length)
    new_tails: dict[int, list[LayerTail]] = field(default_factory=dict)


@dataclass
class _Ctx:
    num: Numerics
    segs: list[_Segment]
    positions: torch.Tensor  # [N] absolute positions of the batch rows
    pool: PagePool | None  # None for the MTP block, which has no compressed layers


@dataclass
class _CompressorRun:
    """A compressor's view of one sequence during a call that extends it to length ``e``."""

    entries: torch.Tensor  # every complete entry [e // m, c]: earlier ones (pages + partial page) and new ones
    raw_kv: torch.Tensor  # raw rows (content, gate logits incl. ape) of positions [raw_lo, e)
    raw_score: torch.Tensor
    raw_lo: int


def _emit_window(old: torch.Tensor, buf: torch.Tensor, lo: int, end: int) -> torch.Tensor:
    """Ring [W, c] at length ``end``: ``old`` updated with rows of ``buf`` (positions ``lo ..``) in slot t % W."""
    ring = old.clone()
    size = ring.shape[0]
    first = max(lo, end - size)
    if end > first:
        pos = torch.arange(first, end, device=ring.device)
        ring[pos % size] = buf[first - lo:end - lo].float()
    return ring


def _gather_entries(pool_t: torch.Tensor, pages: list[int], partial: torch.Tensor, start: int,
                    m: int) -> torch.Tensor:
    """Complete entries [start // m, c] at length ``start``: full pages from the pool + the private partial page."""
    per_page = PAGE_SIZE // m
    n_full = start // PAGE_SIZE
    parts = []
    if n_full:
        parts.append(pool_t[torch.tensor(pages[:n_full], device=pool_t.device)].reshape(n_full * per_page, -1))
    parts.append(partial[:start // m - n_full * per_page])
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------
class Compressor(nn.Module):
    """KV compressor of a layer with ratio m (spec 4.4): overlap (CSA, m = 4) or plain (HCA)."""

    def __init__(self, cfg: DeepSeekV4Config, ratio: int, width: int, rotate: bool, tp: TensorParallel, prefix: str):
        super().__init__()
        self.ratio, self.width = ratio, width
        self.overlap = ratio == 4
        k = 2 if self.overlap else 1
        self.ape = _param(ratio, k * width)
        self.wkv = tp.linear(cfg.hidden_size, k * width, "bf16", "fp32", "replicated", prefix + "wkv")
        self.wgate = tp.linear(cfg.hidden_size, k * width, "bf16", "fp32", "replicated", prefix + "wgate")
        self.norm = RMSNorm(width, cfg.rms_norm_eps)
        self.rotate = rotate  # indexer keys: Hadamard + FP4; main entries: FP8 on the non-rope dims

    def raw(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token candidates: x [N, d] -> (K [N, k*c], S [N, k*c]) fp32, S including ape[t mod m]."""
        xf = x.float()
        kv = torch.nn.functional.linear(xf, self.wkv.dequantized())
        score = torch.nn.functional.linear(xf, self.wgate.dequantized()) + self.ape[positions % self.ratio]
        return kv, score

    def extend(self, kv: torch.Tensor, score: torch.Tensor, ring_kv: torch.Tensor, ring_score: torch.Tensor,
               old_entries: torch.Tensor, start: int, freqs: torch.Tensor, num: Numerics) -> _CompressorRun:
        """Append n tokens' raw rows kv / score [n, k*c] at position ``start`` to a sequence whose raw-row ring
        is ``ring_kv`` / ``ring_score`` and whose complete entries are ``old_entries`` [start // m, c]."""
        m = self.ratio
        n = kv.shape[0]
        first_block, end_block = start // m, (start + n) // m
        lo = max(0, m * first_block - m) if self.overlap else m * first_block  # oldest row still needed
        old = torch.arange(lo, start, device=kv.device) % ring_kv.shape[0]
        all_kv = torch.cat([ring_kv[old], kv])
        all_score = torch.cat([ring_score[old], score])
        run = _CompressorRun(old_entries.to(num.act_dtype), all_kv, all_score, lo)
        if end_block > first_block:
            new = ops.compress_blocks(all_kv, all_score, lo, start, m, self.norm.weight, self.norm.eps, freqs,
                                      self.rotate, num)
            run.entries = torch.cat([run.entries, new])
        return run

    def write_pages(self, run: _CompressorRun, pool_t: torch.Tensor, pages: list[int], start: int, end: int) -> None:
        """Store the pages completed between lengths ``start`` and ``end`` (written once, then immutable)."""
        per_page = PAGE_SIZE // self.ratio
        for k in range(start // PAGE_SIZE, end // PAGE_SIZE):
            pool_t[pages[k]] = run.entries[k * per_page:(k + 1) * per_page].float()

    def tail_at(self, run: _CompressorRun, ring_kv: torch.Tensor, ring_score: torch.Tensor, partial: torch.Tensor,
                end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw-row ring kv, ring score, private entries of the incomplete page) at length ``end``."""
        per_page = PAGE_SIZE // self.ratio
        first = (end // PAGE_SIZE) * per_page
        page = torch.zeros_like(partial)
        page[:end // self.ratio - first] = run.entries[first:end // self.ratio].float()
        return (_emit_window(ring_kv, run.raw_kv, run.raw_lo, end),
                _emit_window(ring_score, run.raw_score, run.raw_lo, end), page)


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer (spec 4.5)."""

    def __init__(self, cfg: DeepSeekV4Config, tp: TensorParallel, prefix: str):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.topk = cfg.index_topk
        self.wq_b = tp.linear(cfg.q_lora_rank, self.n_heads * self.head_dim, "fp8", "fp8", "replicated", prefix + "wq_b")
        self.weights_proj = tp.linear(cfg.hidden_size, self.n_heads, "bf16", "bf16", "replicated",
                                      prefix + "weights_proj")
        self.compressor = Compressor(cfg, 4, self.head_dim, True, tp, prefix + "compressor.")
        self.scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def queries(self, x: torch.Tensor, q_r: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                num: Numerics) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (q [N, H_I, D_I], head weights [N, H_I])."""
        q = self.wq_b(q_r, num).view(-1, self.n_heads, self.head_dim).to(num.act_dtype)
        q = ops.hadamard(ops.rope_tail(q, positions, freqs))
        if num.kv_sim:
            q = ops.fp4_sim(q, 32)
        w = (self.weights_proj(x, num) * self.scale).to(num.act_dtype)
        return q, w


class Attention(nn.Module):
    def __init__(self, cfg: DeepSeekV4Config, layer_id: int, tp: TensorParallel, prefix: str):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.ratio = cfg.ratio(layer_id)
        H, D, G = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        self.n_heads, self.head_dim, self.rope_dim = H // tp.size, D, cfg.qk_rope_head_dim  # this rank's heads
        self.window = cfg.sliding_window
        self.attn_sink = _param(H // tp.size)
        self.wq_a = tp.linear(cfg.hidden_size, cfg.q_lora_rank, "fp8", "fp8", "replicated", prefix + "wq_a")
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = tp.linear(cfg.q_lora_rank, H * D, "fp8", "fp8", "column", prefix + "wq_b")
        self.wkv = tp.linear(cfg.hidden_size, D, "fp8", "fp8", "replicated", prefix + "wkv")
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.n_groups, self.o_rank = G // tp.size, cfg.o_lora_rank  # the rank's groups follow its heads
        # wo_a: stored FP8, multiplied in bf16 by the reference (dequantized at conversion, spec 7)
        self.wo_a = tp.linear(H * D // G, G * cfg.o_lora_rank, "fp8", "bf16", "column", prefix + "wo_a")
        self.wo_b = tp.linear(G * cfg.o_lora_rank, cfg.hidden_size, "fp8", "fp8", "row", prefix + "wo_b")
        self.all_reduce = tp.all_reduce
        self.compressor = Compressor(cfg, self.ratio, D, False, tp, prefix + "compressor.") if self.ratio else None
        self.indexer = Indexer(cfg, tp, prefix + "indexer.") if self.ratio == 4 else None
        if self.ratio:
            freqs = ops.rope_frequencies(self.rope_dim, cfg.compress_rope_theta, cfg.yarn)
        else:
            freqs = ops.rope_frequencies(self.rope_dim, cfg.rope_theta, None)
        self.register_buffer("freqs", freqs, persistent=False)
        self.eps = cfg.rms_norm_eps

    def forward(self, x: torch.Tensor, ctx: _Ctx, slot: int) -> torch.Tensor:
        """x [N, d] (after attn_norm) -> [N, d]; reads and advances layer ``slot`` of every segment's tail."""
        num, pos, N, dev = ctx.num, ctx.positions, x.shape[0], x.device
        H, D = self.n_heads, self.head_dim
        q_r = self.q_norm(self.wq_a(x, num), num)
        q = self.wq_b(q_r, num).view(N, H, D).to(num.act_dtype)
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + self.eps)  # unweighted per-head RMS, act dtype
        q = ops.rope_tail(q, pos, self.freqs)
        kv = self.kv_norm(self.wkv(x, num), num)
        kv = ops.rope_tail(kv, pos, self.freqs)
        if num.kv_sim:
            kv = ops.kv_fp8_sim(kv, self.rope_dim)
        comp = self.compressor.raw(x, pos) if self.compressor is not None else None
        if self.indexer is not None:
            iq, iw = self.indexer.queries(x, q_r, pos, self.freqs, num)
            icomp = self.indexer.compressor.raw(x, pos)

        out = q.new_zeros(N, H, D)
        for seg in ctx.segs:
            r = seg.rows
            old = seg.tail.layers[slot]
            s, e = seg.start, seg.start + seg.n
            # --- window keys: ring positions [w_lo, s) + the new tokens
            w_lo = max(0, s - self.window + 1)
            ring_pos = torch.arange(w_lo, s, device=dev) % self.window
            win = torch.cat([old.window[ring_pos].to(num.act_dtype), kv[r]])  # [s - w_lo + n, D]
            qpos = torch.arange(s, e, device=dev)
            kpos = qpos[:, None] - self.window + 1 + torch.arange(self.window, device=dev)[None, :]  # [n, W]
            idx = torch.where(kpos >= 0, kpos - w_lo, -1)
            keys = win
            main = index = None
            if self.compressor is not None:
                m = self.ratio
                main = self.compressor.extend(
                    comp[0][r], comp[1][r], old.comp_kv, old.comp_score,
                    _gather_entries(ctx.pool.entries[self.layer_id], seg.pages, old.entries, s, m), s, self.freqs, num)
                n_avail = (qpos + 1) // m  # entries a query at p may use
                if self.indexer is not None:
                    index = self.indexer.compressor.extend(
                        icomp[0][r], icomp[1][r], old.idx_kv, old.idx_score,
                        _gather_entries(ctx.pool.index_keys[self.layer_id], seg.pages, old.index_keys, s, 4),
                        s, self.freqs, num)
                    scores = ops.indexer_scores(iq[r], iw[r], index.entries, num.act_dtype)
                    sel = ops.indexer_topk(scores, n_avail, self.indexer.topk)
                else:  # HCA: every available entry
                    ent = torch.arange(main.entries.shape[0], device=dev)[None, :]
                    sel = torch.where(ent < n_avail[:, None], ent, -1)
                idx = torch.cat([idx, torch.where(sel >= 0, sel + win.shape[0], -1)], dim=1)
                keys = torch.cat([win, main.entries])
            out[r] = ops.sparse_attention(q[r], keys, idx, self.attn_sink, self.head_dim**-0.5, num.bf16_probs)
            self._commit(seg, slot, old, win, w_lo, main, index, ctx)

        o = ops.rope_tail(out, pos, self.freqs, inverse=True)
        o = o.reshape(N, self.n_groups, -1)
        wo_a = self.wo_a.dequantized().view(self.n_groups, self.o_rank, -1)
        if num.act_dtype == torch.bfloat16:
            z = torch.einsum("ngi,gri->ngr", o.to(torch.bfloat16), wo_a.to(torch.bfloat16))
        else:
            z = torch.einsum("ngi,gri->ngr", o.float(), wo_a)
        # partial outputs summed in act_dtype (as SGLang reduces a row-parallel output); the MoE sums in fp32
        return self.all_reduce(self.wo_b(z.flatten(1), num))

    def _commit(self, seg: _Segment, slot: int, old: LayerTail, win: torch.Tensor, w_lo: int,
                main: _CompressorRun | None, index: _CompressorRun | None, ctx: _Ctx) -> None:
        """Write the pages this call completed and emit the layer's tail at every requested length."""
        end_of_call = seg.start + seg.n
        if main is not None:
            self.compressor.write_pages(main, ctx.pool.entries[self.layer_id], seg.pages, seg.start, end_of_call)
        if index is not None:
            self.indexer.compressor.write_pages(index, ctx.pool.index_keys[self.layer_id], seg.pages, seg.start,
                                                end_of_call)
        for end in seg.ends:
            lt = LayerTail(window=_emit_window(old.window, win, w_lo, end))
            if main is not None:
                lt.comp_kv, lt.comp_score, lt.entries = self.compressor.tail_at(
                    main, old.comp_kv, old.comp_score, old.entries, end)
            if index is not None:
                lt.idx_kv, lt.idx_score, lt.index_keys = self.indexer.compressor.tail_at(
                    index, old.idx_kv, old.idx_score, old.index_keys, end)
            seg.new_tails.setdefault(end, []).append(lt)


# ---------------------------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------------------------
class Expert(nn.Module):
    """SwiGLU MLP with the clamp of spec 5.2; ``stored`` = "fp8" (shared) or the routed expert dtype."""

    def __init__(self, dim: int, inter: int, stored: str, limit: float, tp: TensorParallel, prefix: str):
        super().__init__()
        self.w1 = tp.linear(dim, inter, stored, stored, "column", prefix + "w1")
        self.w2 = tp.linear(inter, dim, stored, stored, "row", prefix + "w2")  # partial sums: reduced by the MoE
        self.w3 = tp.linear(dim, inter, stored, stored, "column", prefix + "w3")
        self.limit = limit

    def forward(self, x: torch.Tensor, num: Numerics, weight: torch.Tensor | None = None) -> torch.Tensor:
        h = ops.swiglu(self.w1(x, num), self.w3(x, num), self.limit)
        if weight is not None:
            h = weight[:, None] * h  # routing weight before w2, in fp32
        return self.w2(h.to(num.act_dtype), num)


class Gate(nn.Module):
    def __init__(self, cfg: DeepSeekV4Config, layer_id: int):
        super().__init__()
        self.topk, self.route_scale = cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.weight = _param(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.bfloat16)  # as stored, used in fp32
        self.hash = cfg.is_hash_layer(layer_id)
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
            self.bias = None
        else:
            self.bias = _param(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight.float())
        hashed = self.tid2eid[token_ids] if self.hash else None
        return ops.route(logits, self.bias, hashed, self.topk, self.route_scale)


class MoE(nn.Module):
    def __init__(self, cfg: DeepSeekV4Config, layer_id: int, tp: TensorParallel, prefix: str):
        super().__init__()
        self.gate = Gate(cfg, layer_id)
        F_, d = cfg.moe_intermediate_size, cfg.hidden_size
        self.experts = nn.ModuleList(Expert(d, F_, cfg.expert_dtype, cfg.swiglu_limit, tp, f"{prefix}experts.{e}.")
                                     for e in range(cfg.n_routed_experts))
        self.shared_experts = Expert(d, F_, "fp8", cfg.swiglu_limit, tp, prefix + "shared_experts.")
        self.all_reduce = tp.all_reduce

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, num: Numerics) -> torch.Tensor:
        weights, experts = self.gate(x, token_ids)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        # routed experts in increasing index, then the shared expert: the reference's accumulation order
        for e in torch.unique(experts).tolist():
            rows, k = torch.nonzero(experts == e, as_tuple=True)
            y.index_add_(0, rows, self.experts[e](x[rows], num, weights[rows, k]).float())
        y += self.shared_experts(x, num).float()
        return self.all_reduce(y).to(num.act_dtype)  # one all-reduce per layer, in fp32


# ---------------------------------------------------------------------------------------------------------
# Blocks and the model
# ---------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: DeepSeekV4Config, layer_id: int, tp: TensorParallel, prefix: str):
        super().__init__()
        hc, d = cfg.hc_mult, cfg.hidden_size
        mix = (2 + hc) * hc
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _param(mix, hc * d), _param(mix), _param(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _param(mix, hc * d), _param(mix), _param(3)
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id, tp, prefix + "attn.")
        self.ffn = MoE(cfg, layer_id, tp, prefix + "ffn.")
        self.hc_kw = dict(norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, iters=cfg.hc_sinkhorn_iters)

    def forward(self, X: torch.Tensor, token_ids: torch.Tensor, ctx: _Ctx, slot: int) -> torch.Tensor:
        """Streams X [N, hc, d] -> [N, hc, d]."""
        u, post, comb = ops.hc_pre(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, **self.hc_kw)
        X = ops.hc_post(self.attn(self.attn_norm(u, ctx.num), ctx, slot), X, post, comb)
        u, post, comb = ops.hc_pre(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, **self.hc_kw)
        return ops.hc_post(self.ffn(self.ffn_norm(u, ctx.num), token_ids, ctx.num), X, post, comb)


class MTPBlock(Block):
    """Multi-token prediction block (spec 6): a sliding-window block fed by (main streams, next token)."""

    def __init__(self, cfg: DeepSeekV4Config, layer_id: int, tp: TensorParallel, prefix: str):
        super().__init__(cfg, layer_id, tp, prefix)
        d, hc = cfg.hidden_size, cfg.hc_mult
        self.e_proj = tp.linear(d, d, "fp8", "fp8", "replicated", prefix + "e_proj")
        self.h_proj = tp.linear(d, d, "fp8", "fp8", "replicated", prefix + "h_proj")
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _param(hc, hc * d), _param(hc), _param(1)


class DeepSeekV4(nn.Module):
    """The full model. Use :meth:`forward` with :class:`Step` s over :class:`SequenceCache` s.

    ``tp`` = this rank's tensor-parallel split (:class:`TensorParallel`); None = the whole model on one rank.
    """

    def __init__(self, cfg: DeepSeekV4Config, tp: TensorParallel | None = None):
        super().__init__()
        tp = tp or SINGLE_RANK
        tp.check(cfg)
        self.config = cfg
        d, hc = cfg.hidden_size, cfg.hc_mult
        self.embed = tp.embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg, i, tp, f"layers.{i}.") for i in range(cfg.n_layers))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + k, tp, f"mtp.{k}.")
                                 for k in range(cfg.num_nextn_predict_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = tp.linear(d, cfg.vocab_size, "bf16", "fp32", "vocab", "head")
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _param(hc, hc * d), _param(hc), _param(1)

    def new_sequence(self, pool: PagePool) -> SequenceCache:
        return SequenceCache.new(self.config, pool, self.embed.weight.device)

    def _head(self, X: torch.Tensor, fn, scale, base, norm: RMSNorm, num: Numerics) -> torch.Tensor:
        cfg = self.config
        h = ops.hc_head(X, fn, scale, base, norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps)
        return self.head(norm(h, num).float(), num)

    def head_logits(self, streams: torch.Tensor, numerics: Numerics | str = "fp32") -> torch.Tensor:
        """Final hc_head + norm + head of main-model streams [n, hc, d] -> fp32 logits [n, vocab]."""
        num = numerics if isinstance(numerics, Numerics) else Numerics.from_mode(numerics)
        return self._head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm, num)

    def _numerics(self, numerics: Numerics | str) -> Numerics:
        num = numerics if isinstance(numerics, Numerics) else Numerics.from_mode(numerics)
        if num.act_quant:  # the reference quantizes GEMM inputs in whole blocks of 128 (spec 2.6)
            cfg = self.config
            for name, width in (("hidden_size", cfg.hidden_size), ("q_lora_rank", cfg.q_lora_rank),
                                ("o_groups * o_lora_rank", cfg.o_groups * cfg.o_lora_rank),
                                ("moe_intermediate_size", cfg.moe_intermediate_size)):
                if width % 128:
                    raise ValueError(f"numerics with FP8 activation quantization need the inputs of the FP8 / FP4 "
                                     f"linears in blocks of 128: config {name} = {width}")
        return num

    def _segments(self, steps: list[tuple[TailState, list[int], int, tuple[int, ...]]]) -> tuple[list[_Segment], torch.Tensor]:
        segs, positions, row = [], [], 0
        for tail, pages, n, snaps in steps:
            s = tail.length
            for b in snaps:
                if not s < b <= s + n:
                    raise ValueError(f"snapshot position {b} outside ({s}, {s + n}] of this step")
            ends = tuple(sorted(set(snaps) | {s + n}))
            segs.append(_Segment(slice(row, row + n), s, n, tail, pages, ends))
            positions.append(torch.arange(s, s + n))
            row += n
        return segs, (torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long))

    @torch.no_grad()
    def forward(self, steps: list[Step], *, numerics: Numerics | str = "fp32", return_hidden: bool = False,
                compute_logits: bool = True) -> list[StepOutput]:
        """Extend every step's sequence by its tokens; returns per-step logits / streams / snapshots.

        ``Step.snapshot_at`` lengths b with ``seq.length < b <= seq.length + n`` return a retained
        :class:`ResumeState` at b (e.g. page-aligned points of a long prefill). ``compute_logits=False``
        skips the head (intermediate prefill chunks). On an exception the sequences are left inconsistent.
        """
        num = self._numerics(numerics)
        cfg = self.config
        if not steps:
            return []
        pool = steps[0].seq.pool
        for st in steps:
            if st.token_ids.dim() != 1 or st.token_ids.numel() == 0:
                raise ValueError(f"Step.token_ids must be a non-empty 1-D tensor, got shape {tuple(st.token_ids.shape)}")
            if int(st.token_ids.min()) < 0 or int(st.token_ids.max()) >= cfg.vocab_size:
                raise ValueError(f"token id out of range [0, {cfg.vocab_size})")
            if st.seq.pool is not pool:
                raise ValueError("all sequences of a batch must share one PagePool")
        if len({id(st.seq) for st in steps}) != len(steps):
            raise ValueError("a sequence may appear only once per batch")
        new_pages = sum((st.seq.length + st.token_ids.numel()) // PAGE_SIZE - st.seq.length // PAGE_SIZE for st in steps)
        if new_pages > pool.num_free:
            raise RuntimeError(f"page pool exhausted: this batch completes {new_pages} pages, {pool.num_free} free")
        for st in steps:
            # pages completed by this step are allocated up front and written layer by layer
            s, n = st.seq.length, st.token_ids.numel()
            st.seq.pages.extend(pool.alloc() for _ in range(s // PAGE_SIZE, (s + n) // PAGE_SIZE))
        segs, positions = self._segments([(st.seq.tail, st.seq.pages, st.token_ids.numel(), st.snapshot_at)
                                          for st in steps])
        ctx = _Ctx(num, segs, positions.to(self.embed.weight.device), pool)
        ids = torch.cat([st.token_ids for st in steps]).long()
        x = self.embed(ids).to(num.act_dtype)
        X = x[:, None, :].expand(-1, cfg.hc_mult, -1).contiguous()
        hidden = []
        for i, layer in enumerate(self.layers):
            X = layer(X, ids, ctx, i)
            if return_hidden:
                hidden.append(X)
        logits = self.head_logits(X, num) if compute_logits else None

        outs = []
        for st, seg in zip(steps, segs, strict=True):
            r = seg.rows
            end = seg.start + seg.n
            snaps = {}
            for b in seg.ends:
                tail = TailState(b, seg.new_tails[b])
                if b == end:
                    st.seq.tail = tail
                    if b in st.snapshot_at:
                        snaps[b] = st.seq.snapshot()
                else:  # inside the call: no MTP state (the MTP block runs after the main model)
                    pages = tuple(st.seq.pages[:b // PAGE_SIZE])
                    st.seq.pool.retain(pages)
                    snaps[b] = ResumeState(st.seq.pool, pages, tail)
            outs.append(StepOutput(logits[r] if logits is not None else None, X[r],
                                   [h[r] for h in hidden] if return_hidden else None, snaps))
        return outs

    @torch.no_grad()
    def forward_mtp(self, seqs: list[SequenceCache], streams: list[torch.Tensor], next_ids: list[torch.Tensor], *,
                    numerics: Numerics | str = "fp32") -> list[torch.Tensor]:
        """The (first) MTP block on (main streams of positions t, token t + 1) for each sequence, continuing
        its MTP window from ``seq.mtp_tail.length``; streams [n, hc, d], next_ids [n] -> logits fp32
        [n, vocab] (the prediction of token t + 2)."""
        num = self._numerics(numerics)
        if not self.mtp:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        if any(sq.mtp_tail is None for sq in seqs):
            raise ValueError("sequence has no MTP state (restored from a snapshot taken inside a forward call)")
        mtp = self.mtp[0]
        segs, positions = self._segments([(sq.mtp_tail, [], ids.numel(), ())
                                          for sq, ids in zip(seqs, next_ids, strict=True)])
        if not segs:
            return []
        ctx = _Ctx(num, segs, positions.to(self.embed.weight.device), None)
        ids = torch.cat(next_ids).long()
        X = torch.cat(streams).to(num.act_dtype)
        e = mtp.e_proj(mtp.enorm(self.embed(ids).to(num.act_dtype), num), num)
        h = mtp.h_proj(mtp.hnorm(X, num), num)
        X = mtp((e[:, None, :] + h).to(num.act_dtype), ids, ctx, 0)
        logits = self._head(X, mtp.hc_head_fn, mtp.hc_head_scale, mtp.hc_head_base, mtp.norm, num)
        for sq, seg in zip(seqs, segs, strict=True):
            sq.mtp_tail = TailState(seg.start + seg.n, seg.new_tails[seg.start + seg.n])
        return [logits[seg.rows] for seg in segs]
