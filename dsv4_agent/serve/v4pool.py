"""Our compressed KV cache as SGLang's KV pool (issue 6, notes/sglang_kv.md sections 4 and 7).

SGLang hands out token slots ("locs") in pages of ``P`` tokens with ``loc % P == position % P``; with ``P`` a
multiple of our 128-token page, the 128 locs of an absolute page ``[128k, 128k + 128)`` of a request are
contiguous, so ``page id = req_to_token[row, 128k] // 128`` names a page of :class:`V4KVPool`. A page holds
the complete compressed entries of those 128 tokens (every compressed layer; CSA indexer keys too) and is a
pure function of the prefix, so the radix tree shares it exactly like SGLang shares ordinary KV pages.

Everything else a request needs to continue (window rings, raw compressor rows, the entries of its
incomplete page) is its *tail* (:class:`dsv4_agent.model.TailState`), kept per request row here and, when a
request ends, donated to the radix tree as a resume state (``v4radix.py``).

Storage formats of a page (chosen by the served numerics):

* ``fp32``: entries as computed (exact for the fp32 numerics used by the exactness tests);
* ``packed``: the lossless layout of spec 7 / 10 for the released numerics (FP8-simulated entries): an
  attention entry is ``D - r`` e4m3 bytes + ``r`` bf16 rope dims + one e8m0 scale per 64 non-rope dims,
  padded to 8 bytes (V4: 584 B); an indexer key is ``D_I / 2`` bytes of e2m1 + one e8m0 scale per 32 dims
  (V4: 68 B). The pool's bytes per token then equal ``marginal_kv_bytes_per_token``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from sglang.srt.mem_cache.memory_pool import KVCache
from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig, MemoryPoolConfigurator

from dsv4_agent.model import PAGE_SIZE, DeepSeekV4Config, TailState, ops
from dsv4_agent.model.memory import attention_entry_bytes, indexer_key_bytes

log = logging.getLogger(__name__)

ARCH = "DSV4AgentForCausalLM"


# ---------------------------------------------------------------------------------------------------------
# Page storage
# ---------------------------------------------------------------------------------------------------------
class PackedEntries:
    """Pages of attention entries [num_pages, per_page, D] stored as 584-byte records (spec 7).

    Indexing mirrors a tensor: ``store[page_ids]`` -> fp32 [len, per_page, D]; ``store[page] = entries``.
    Lossless for FP8-simulated entries (the non-rope dims are s * e4m3 with a power-of-two s per 64 dims,
    the rope dims bf16): re-deriving the scale from the values gives codes that represent them exactly.
    """

    def __init__(self, num_pages: int, per_page: int, dim: int, rope_dim: int, device):
        self.nope, self.rope = dim - rope_dim, rope_dim
        self.n_scales = self.nope // 64
        raw = self.nope + 2 * self.rope + self.n_scales
        self.record = -(-raw // 8) * 8
        self.data = torch.zeros(num_pages, per_page, self.record, dtype=torch.uint8, device=device)
        self.device = self.data.device

    def __getitem__(self, pages) -> torch.Tensor:
        rec = self.data[pages]
        nope = rec[..., :self.nope].view(torch.float8_e4m3fn).float()
        rope = rec[..., self.nope:self.nope + 2 * self.rope].contiguous().view(torch.bfloat16).float()
        s0 = self.nope + 2 * self.rope
        scales = rec[..., s0:s0 + self.n_scales].contiguous().view(torch.float8_e8m0fnu).float()
        nope = (nope.unflatten(-1, (self.n_scales, 64)) * scales[..., None]).flatten(-2)
        return torch.cat([nope, rope], dim=-1)

    def __setitem__(self, page: int, entries: torch.Tensor) -> None:
        nope, rope = entries[..., :self.nope].float(), entries[..., self.nope:]
        s = ops.fp8_scales(nope, 64)  # [per_page, n_scales] powers of two
        q = (nope.unflatten(-1, (self.n_scales, 64)) / s[..., None]).flatten(-2).to(torch.float8_e4m3fn)
        rec = torch.zeros(entries.shape[0], self.record, dtype=torch.uint8, device=self.data.device)
        rec[:, :self.nope] = q.view(torch.uint8)
        rec[:, self.nope:self.nope + 2 * self.rope] = rope.to(torch.bfloat16).contiguous().view(torch.uint8)
        s0 = self.nope + 2 * self.rope
        rec[:, s0:s0 + self.n_scales] = s.to(torch.float8_e8m0fnu).view(torch.uint8)
        self.data[page] = rec

    @property
    def nbytes(self) -> int:
        return self.data.numel()


class PackedIndexKeys:
    """Pages of indexer keys [num_pages, 32, D_I] as D_I/2 bytes of e2m1 + D_I/32 e8m0 scales (68 B for V4).

    Lossless for FP4-simulated keys (s * e2m1 with a power-of-two s per 32 dims): a smaller re-derived
    scale only doubles codes that stay on the e2m1 grid.
    """

    def __init__(self, num_pages: int, per_page: int, dim: int, device):
        self.dim, self.n_scales = dim, dim // 32
        self.record = dim // 2 + self.n_scales
        self.data = torch.zeros(num_pages, per_page, self.record, dtype=torch.uint8, device=device)
        self.device = self.data.device

    def __getitem__(self, pages) -> torch.Tensor:
        rec = self.data[pages]
        packed = rec[..., :self.dim // 2].reshape(-1, self.dim // 2).view(torch.int8)
        codes = ops.unpack_fp4(packed).reshape(*rec.shape[:-1], self.dim)
        scales = rec[..., self.dim // 2:].contiguous().view(torch.float8_e8m0fnu).float()
        return (codes.unflatten(-1, (self.n_scales, 32)) * scales[..., None]).flatten(-2)

    def __setitem__(self, page: int, keys: torch.Tensor) -> None:
        s = ops.fp4_scales(keys, 32)
        codes = (keys.float().unflatten(-1, (self.n_scales, 32)) / s[..., None]).flatten(-2)
        rec = torch.empty(keys.shape[0], self.record, dtype=torch.uint8, device=self.data.device)
        rec[:, :self.dim // 2] = ops.pack_fp4(codes).view(torch.uint8)
        rec[:, self.dim // 2:] = s.to(torch.float8_e8m0fnu).view(torch.uint8)
        self.data[page] = rec

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def _nbytes(store) -> int:
    return store.numel() * store.element_size() if isinstance(store, torch.Tensor) else store.nbytes


def page_bytes_per_token(cfg: DeepSeekV4Config, packed: bool) -> float:
    """Bytes of pool storage per token (compressed entries of every layer, indexer keys of CSA layers)."""
    entry = attention_entry_bytes(cfg) if packed else 4 * cfg.head_dim
    key = indexer_key_bytes(cfg) if packed else 4 * cfg.index_head_dim
    total = 0.0
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        if m:
            total += entry / m
        if m == 4:
            total += key / 4
    return total


def tail_bytes(cfg: DeepSeekV4Config) -> int:
    """Bytes of one resume state / request tail (fp32, all main layers)."""
    return TailState.empty(cfg, list(range(cfg.n_layers)), "meta").nbytes


# ---------------------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------------------
class PageView:
    """What :meth:`DeepSeekV4.forward` expects of a page pool, over SGLang-assigned pages.

    The model allocates the pages a step completes (in step order, ascending) by calling :meth:`alloc`;
    SGLang has already assigned them, so ``alloc`` hands out the queued page ids. Reference counting is
    SGLang's (allocator + radix tree), so ``retain`` / ``release`` do nothing here.
    """

    def __init__(self, pool: V4KVPool, new_pages: list[int]):
        self.entries, self.index_keys = pool.entries, pool.index_keys
        self._queue = list(reversed(new_pages))

    @property
    def num_free(self) -> int:
        return len(self._queue)

    def alloc(self) -> int:
        return self._queue.pop()

    def retain(self, pages) -> None:
        pass

    def release(self, pages) -> None:
        pass

    def check_consumed(self) -> None:
        if self._queue:
            raise RuntimeError(f"{len(self._queue)} SGLang pages were not written by the forward")


class V4KVPool(KVCache):
    """Compressed-entry pages addressed by ``loc // 128`` plus per-row tails (see the module docstring)."""

    def __init__(self, cfg: DeepSeekV4Config, size: int, page_size: int, *, packed: bool, device="cpu",
                 max_resume_states: int = 64):
        if page_size % PAGE_SIZE:
            raise ValueError(f"--page-size must be a multiple of {PAGE_SIZE} for {ARCH}, got {page_size}")
        super().__init__(size=size, page_size=page_size, dtype=torch.float32, layer_num=cfg.n_layers,
                         device=str(device), enable_memory_saver=False)
        self.cfg, self.packed = cfg, packed
        # the paged allocator reserves page 0 and hands out locs < size + page_size
        self.num_pages = (size + page_size) // PAGE_SIZE
        self.entries: dict[int, object] = {}
        self.index_keys: dict[int, object] = {}
        for layer in range(cfg.n_layers):
            m = cfg.ratio(layer)
            if m and packed:
                self.entries[layer] = PackedEntries(self.num_pages, PAGE_SIZE // m, cfg.head_dim,
                                                    cfg.qk_rope_head_dim, device)
            elif m:
                self.entries[layer] = torch.zeros(self.num_pages, PAGE_SIZE // m, cfg.head_dim, device=device)
            if m == 4 and packed:
                self.index_keys[layer] = PackedIndexKeys(self.num_pages, PAGE_SIZE // 4, cfg.index_head_dim, device)
            elif m == 4:
                self.index_keys[layer] = torch.zeros(self.num_pages, PAGE_SIZE // 4, cfg.index_head_dim,
                                                     device=device)
        self.page_bytes = sum(_nbytes(s) for s in self.entries.values()) + sum(
            _nbytes(s) for s in self.index_keys.values())
        self.mem_usage = self.page_bytes / 2**30
        # per request row: the tail at the row's current length
        self.tails: dict[int, TailState] = {}
        # rows that resume from a radix resume state: row -> tail to start from (installed at next forward)
        self.pending: dict[int, TailState] = {}
        # rows whose forward should emit resume states at these lengths (radix branch points / knob)
        self.snapshot_requests: dict[int, set[int]] = {}
        self.snapshots: dict[int, dict[int, TailState]] = {}
        self.max_resume_states = max_resume_states
        self.tail_bytes = tail_bytes(cfg)
        log.info("%s pool: %d pages of %d tokens, %.1f B/token (%s), %.2f MiB; tail %.2f MiB",
                 ARCH, self.num_pages, PAGE_SIZE, self.bytes_per_token, "packed" if packed else "fp32",
                 self.page_bytes / 2**20, self.tail_bytes / 2**20)

    @property
    def bytes_per_token(self) -> float:
        """Measured pool bytes per cached token."""
        return self.page_bytes / (self.num_pages * PAGE_SIZE)

    # ---- rows -------------------------------------------------------------------------------------
    def on_alloc_rows(self, rows: list[int]) -> None:
        """A fresh request took these rows: nothing of the rows' previous owners may be read."""
        for row in rows:
            self.tails.pop(row, None)
            self.pending.pop(row, None)
            self.snapshot_requests.pop(row, None)
            self.snapshots.pop(row, None)

    def tail_for(self, row: int, start: int) -> TailState:
        """The state a step of ``row`` starting at position ``start`` continues from."""
        if row in self.pending:
            tail = self.pending.pop(row)
        elif start == 0:
            tail = TailState.empty(self.cfg, list(range(self.cfg.n_layers)), self.device)
        else:
            tail = self.tails.get(row)
        if tail is None or tail.length != start:
            have = None if tail is None else tail.length
            raise RuntimeError(f"{ARCH}: request row {row} resumes at {start} but its state is at {have}")
        return tail

    def take_tail(self, row: int, length: int) -> TailState | None:
        """Remove and return the row's tail if it is exactly at ``length`` (donation to the radix tree)."""
        tail = self.tails.get(row)
        if tail is None or tail.length != length:
            return None
        return self.tails.pop(row)

    # ---- KVCache interface (attention backends are not used by our model) ------------------------
    def _unsupported(self, *a, **k):
        raise NotImplementedError(f"{ARCH} keeps compressed pages; per-token K/V buffers do not exist")

    get_key_buffer = get_value_buffer = get_kv_buffer = set_kv_buffer = _unsupported

    def get_kv_size_bytes(self):
        return self.page_bytes, 0

    def get_contiguous_buf_infos(self):
        return [], [], []


# ---------------------------------------------------------------------------------------------------------
# Pool sizing: per-token cost = page bytes per token; bias = request tails + resume states
# ---------------------------------------------------------------------------------------------------------
class V4PoolConfigurator(MemoryPoolConfigurator):
    """Sizes the pool by our real per-token cost instead of an uncompressed per-token KV.

    The tails of running requests and of resume states (``tail_bytes`` each: V4-Flash 24 MiB, about 7k
    tokens of pages) come out of the same budget. SGLang resolves ``max_running_requests`` only after the
    pages are sized (unless the user gave it: its default is >= 2048), so the pages leave room for
    ``requested`` running requests, within ``TAIL_SHARE`` of the budget, and
    :meth:`finalize_with_max_running_requests` lowers the running limit to what that room holds.
    """

    TAIL_SHARE = 0.25

    def __init__(self, cfg: DeepSeekV4Config, packed: bool, tail: int, requested: int | None = None):
        self.cell = page_bytes_per_token(cfg, packed)
        self.tail = tail
        self.requested = requested
        self.budget: int | None = None

    def reserved_bytes(self, running: int) -> int:
        """Bytes of the tails of `running` requests and of their resume-state cap."""
        return (running + resume_state_cap(running)) * self.tail

    def running_within(self, room: float) -> int:
        """The most running requests whose tails and resume states fit in ``room`` bytes (at least 1)."""
        lo, hi = 1, 1 << 20
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.reserved_bytes(mid) <= room else (lo, mid - 1)
        return lo

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        self.budget = available_bytes
        running = min(self.requested or 1 << 20, self.running_within(available_bytes * self.TAIL_SHARE))
        tokens = int(max(available_bytes - self.reserved_bytes(running), 0) // self.cell)
        return MemoryPoolConfig(max_total_num_tokens=tokens // page_size * page_size)

    def calculate_pool_sizes_from_max_tokens(self, max_total_num_tokens: int, page_size: int) -> MemoryPoolConfig:
        return MemoryPoolConfig(max_total_num_tokens=max_total_num_tokens // page_size * page_size)

    def finalize_with_max_running_requests(self, config: MemoryPoolConfig) -> MemoryPoolConfig:
        if self.budget is None or config.max_running_requests is None:
            return config
        fit = self.running_within(self.budget - config.max_total_num_tokens * self.cell)
        if config.max_running_requests > fit:
            (log.warning if self.requested else log.info)(
                "max_running_requests %d -> %d: the tails of running requests and resume states "
                "(%.2f MiB each) must fit beside %d tokens of pages", config.max_running_requests, fit,
                self.tail / 2**20, config.max_total_num_tokens)
            config.max_running_requests = fit
        return config


def is_ours(hf_config) -> bool:
    archs = getattr(hf_config, "architectures", None) or []
    return bool(archs) and archs[0] == ARCH


def uses_packed_pages(dtype: torch.dtype) -> bool:
    """The released numerics (bf16) store packed pages; fp32 numerics store entries as computed."""
    return dtype != torch.float32


def hook_pool_configurator(original: Callable, kvc, *args, **kwargs):
    """AROUND hook on ``pool_configurator.create_memory_pool_configurator``."""
    if not is_ours(kvc.model_config.hf_config):
        return original(kvc, *args, **kwargs)
    from dsv4_agent.serve.models.dsv4 import config_of

    cfg = config_of(kvc.model_config.hf_config)
    from sglang.srt.runtime_context import get_schedule

    return V4PoolConfigurator(cfg, uses_packed_pages(kvc.model_config.dtype), tail_bytes(cfg),
                              get_schedule().max_running_requests)


def resume_state_cap(max_running_requests: int) -> int:
    """How many resume states the radix tree may keep (each costs ``tail_bytes``)."""
    import os

    env = os.environ.get("DSV4_AGENT_MAX_RESUME_STATES")
    return int(env) if env else max(16, 2 * max_running_requests)


def hook_build_pool(original: Callable, kvc, *args, sizes, req_to_token_pool, **kwargs):
    """AROUND hook on ``KVCacheConfigurator._build_token_to_kv_pool``: our pool for our architecture."""
    if not is_ours(kvc.model_config.hf_config):
        return original(kvc, *args, sizes=sizes, req_to_token_pool=req_to_token_pool, **kwargs)
    from sglang.srt.runtime_context import get_schedule

    from dsv4_agent.serve.models.dsv4 import config_of

    cfg = config_of(kvc.model_config.hf_config)
    pool = V4KVPool(cfg, sizes.max_total_num_tokens, get_schedule().page_size,
                    packed=uses_packed_pages(kvc.model_config.dtype), device=kvc.device,
                    max_resume_states=resume_state_cap(sizes.max_running_requests or 16))
    req_to_token_pool.register_on_alloc_rows(pool.on_alloc_rows)
    return pool
