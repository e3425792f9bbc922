"""The serving-oriented attention state of DeepSeek-V4: shared pages + a per-sequence tail.

Layout (spec 9, notes/sglang_kv.md section 7)
---------------------------------------------
A sequence of length ``L`` is described by

* **pages**: complete compressed entries live in immutable pages of ``PAGE_SIZE = 128`` tokens aligned to
  absolute positions. Page ``k`` covers tokens ``[128k, 128k + 128)`` and holds, for every compressed layer of
  ratio ``m``, the ``128 / m`` main entries ``(128/m)k .. (128/m)(k+1) - 1`` (CSA: 32 entries, HCA: 1 entry)
  and, for CSA layers, the 32 indexer keys. A page is written exactly once, when its last token has been
  processed; after that it is a pure function of the tokens ``[0, 128k + 128)`` and can be shared by every
  sequence with that prefix. Pages are addressed by integer page ids into the pool tensors of a
  :class:`PagePool` (``pool.entries[layer][page_id]`` is ``[128 / m, head_dim]``,
  ``pool.index_keys[layer][page_id]`` is ``[32, index_head_dim]``); a sequence's page table is the list
  ``pages[k] = page id of page k`` for its ``L // 128`` complete pages. An SGLang pool can hold the same
  tensors (slot = page id) and use ``req_to_token[row, 128k] // 128`` as the page id.
* **tail** (:class:`TailState`, the resume state): everything else needed to continue at position ``L``,
  per layer (:class:`LayerTail`):
  - ``window`` ``[W, head_dim]``: the sliding-window KV vectors, position ``t`` in slot ``t % W``;
  - ``comp_kv`` / ``comp_score`` ``[k*m, k*c]``: raw compressor rows (content and gate logits incl. ``ape``),
    position ``t`` in slot ``t % (k*m)`` (``k = 2`` for the overlapping CSA compressor, so the previous
    block's rows stay available; ``k = 1`` for HCA);
  - ``idx_kv`` / ``idx_score`` ``[8, 2 * index_head_dim]``: the same for the CSA indexer compressor;
  - ``entries`` ``[128 / m, head_dim]`` and ``index_keys`` ``[32, index_head_dim]``: the complete entries of
    the incomplete last page (entry ``i`` in slot ``i % (128 / m)``), private to the sequence.
  All tail tensors are fp32 (the values are those the chosen numerics produced, stored losslessly).

Operations
----------
* ``seq = SequenceCache.new(model_config, pool)`` - empty sequence.
* ``model.forward([Step(seq, ids, snapshot_at=(...))], numerics=...)`` - extends any number of sequences
  at once (each by any number of tokens, from its own length: prefills, chunks and decodes mixed);
  complete pages are allocated from the pool and written during the call; ``snapshot_at`` positions
  ``b`` with ``L < b <= L + n`` return a :class:`ResumeState` of the sequence as it was at length ``b``.
* ``state = seq.snapshot()`` - resume state at the current length (retains its pages).
* ``seq2 = SequenceCache.restore(pool, state)`` - a new sequence continuing from ``state`` (retains the
  pages, deep-copies the tail), e.g. a second request that shares the first one's prefix pages.
* ``seq.release()`` / ``state.release()`` - drop the page references.

Pool protocol: :meth:`DeepSeekV4.forward` needs of ``seq.pool`` only ``entries`` / ``index_keys`` (per-layer
objects indexable by a page-id tensor for reading and by a page id for writing), ``num_free``, ``alloc()``
(called once per page a step completes, in step order, ascending), ``retain(pages)`` (for snapshots) and
``release(pages)``. A serving engine can pass a view over its own pool (e.g. pages SGLang already assigned,
packed storage) instead of a :class:`PagePool`.

Exactness: a restored sequence computes exactly what the original would have (same code path as an
uninterrupted prefill: chunked prefill, decode and restore all go through the same per-token rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import PAGE_SIZE, DeepSeekV4Config


class PagePool:
    """Reference-counted pool of immutable compressed-entry pages shared between sequences.

    ``entries[layer]``: fp32 [num_pages, PAGE_SIZE // m, head_dim] for every main layer with m > 0;
    ``index_keys[layer]``: fp32 [num_pages, PAGE_SIZE // 4, index_head_dim] for every CSA layer.
    """

    def __init__(self, config: DeepSeekV4Config, num_pages: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self.config = config
        self.num_pages = num_pages
        self.entries: dict[int, torch.Tensor] = {}
        self.index_keys: dict[int, torch.Tensor] = {}
        for layer in range(config.n_layers):
            m = config.ratio(layer)
            if m:
                self.entries[layer] = torch.zeros(num_pages, PAGE_SIZE // m, config.head_dim, dtype=dtype,
                                                  device=device)
            if m == 4:
                self.index_keys[layer] = torch.zeros(num_pages, PAGE_SIZE // 4, config.index_head_dim,
                                                     dtype=dtype, device=device)
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise RuntimeError(f"page pool exhausted ({self.num_pages} pages of {PAGE_SIZE} tokens)")
        page = self._free.pop()
        self.refcount[page] = 1
        return page

    def retain(self, pages: list[int] | tuple[int, ...]) -> None:
        for p in pages:
            if self.refcount[p] <= 0:
                raise RuntimeError(f"page {p} is not allocated")
            self.refcount[p] += 1

    def release(self, pages: list[int] | tuple[int, ...]) -> None:
        for p in pages:
            if self.refcount[p] <= 0:
                raise RuntimeError(f"page {p} released more often than retained")
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                self._free.append(p)


@dataclass
class LayerTail:
    """Per-layer private state of one sequence (shapes in the module docstring); None where the layer has none."""

    window: torch.Tensor
    comp_kv: torch.Tensor | None = None
    comp_score: torch.Tensor | None = None
    idx_kv: torch.Tensor | None = None
    idx_score: torch.Tensor | None = None
    entries: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None

    def clone(self) -> LayerTail:
        return LayerTail(**{k: (None if v is None else v.clone()) for k, v in self.__dict__.items()})

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.__dict__.values() if v is not None)


@dataclass
class TailState:
    """Everything but the shared pages needed to continue a sequence at ``length`` (its resume state)."""

    length: int
    layers: list[LayerTail]

    def clone(self) -> TailState:
        return TailState(self.length, [lt.clone() for lt in self.layers])

    @property
    def nbytes(self) -> int:
        return sum(lt.nbytes for lt in self.layers)

    @staticmethod
    def empty(config: DeepSeekV4Config, layer_ids: list[int], device: torch.device | str = "cpu") -> TailState:
        """Fresh state at length 0 for the given layer ids (main layers, or MTP ids >= n_layers)."""
        W, D, DI = config.sliding_window, config.head_dim, config.index_head_dim
        layers = []
        for layer in layer_ids:
            m = config.ratio(layer)
            z = dict(dtype=torch.float32, device=device)
            lt = LayerTail(window=torch.zeros(W, D, **z))
            if m:
                k = 2 if m == 4 else 1
                lt.comp_kv = torch.zeros(k * m, k * D, **z)
                lt.comp_score = torch.zeros(k * m, k * D, **z)
                lt.entries = torch.zeros(PAGE_SIZE // m, D, **z)
            if m == 4:
                lt.idx_kv = torch.zeros(8, 2 * DI, **z)
                lt.idx_score = torch.zeros(8, 2 * DI, **z)
                lt.index_keys = torch.zeros(PAGE_SIZE // 4, DI, **z)
            layers.append(lt)
        return TailState(0, layers)


@dataclass
class ResumeState:
    """A snapshot of a sequence at ``tail.length``: its page table (retained) plus a private tail copy."""

    pool: PagePool
    pages: tuple[int, ...]
    tail: TailState
    mtp_tail: TailState | None = None
    released: bool = field(default=False, repr=False)

    @property
    def length(self) -> int:
        return self.tail.length

    def release(self) -> None:
        if not self.released:
            self.pool.release(self.pages)
            self.released = True


class SequenceCache:
    """One sequence's attention state: page table into a shared :class:`PagePool` + private tail."""

    def __init__(self, pool: PagePool, pages: list[int], tail: TailState, mtp_tail: TailState | None):
        self.pool = pool
        self.pages = pages
        self.tail = tail
        self.mtp_tail = mtp_tail

    @classmethod
    def new(cls, config: DeepSeekV4Config, pool: PagePool, device: torch.device | str = "cpu") -> SequenceCache:
        n = config.n_layers
        mtp_ids = list(range(n, n + config.num_nextn_predict_layers))
        mtp_tail = TailState.empty(config, mtp_ids, device) if mtp_ids else None
        return cls(pool, [], TailState.empty(config, list(range(n)), device), mtp_tail)

    @property
    def length(self) -> int:
        return self.tail.length

    def snapshot(self) -> ResumeState:
        self.pool.retain(self.pages)
        mtp = self.mtp_tail.clone() if self.mtp_tail is not None else None
        return ResumeState(self.pool, tuple(self.pages), self.tail.clone(), mtp)

    @classmethod
    def restore(cls, pool: PagePool, state: ResumeState) -> SequenceCache:
        if state.released:
            raise RuntimeError("cannot restore from a released ResumeState")
        if state.pool is not pool:
            raise ValueError("ResumeState belongs to a different PagePool")
        if len(state.pages) != state.length // PAGE_SIZE:
            raise ValueError(f"ResumeState at length {state.length} must carry {state.length // PAGE_SIZE} pages, "
                             f"has {len(state.pages)}")
        pool.retain(state.pages)
        mtp = state.mtp_tail.clone() if state.mtp_tail is not None else None
        return cls(pool, list(state.pages), state.tail.clone(), mtp)

    def release(self) -> None:
        self.pool.release(self.pages)
        self.pages = []

