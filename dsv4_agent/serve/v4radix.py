"""SGLang's radix cache plus resume states on its nodes: exact prefix reuse for our compressed KV.

The tree shares complete 128-token pages of compressed entries (``v4pool.V4KVPool``) exactly as SGLang's
RadixCache shares KV pages. Resuming a sequence additionally needs its *tail* at the resume point (window
rings of every layer, raw compressor rows, entries of the incomplete page): a layer's window depends on the
previous layer's window, so recomputing "the last page" from a page boundary is not exact. The tree
therefore only resumes where it holds a :class:`ResumeState`:

* **finish states**: when a request ends at length ``L``, its tail is donated to the node ending at
  ``P = floor(L / 128) * 128`` together with the incomplete page ``[P, L)`` (its SGLang locs; the tail
  holds the entries). The next agent turn, whose prompt starts with this turn's prompt + completion,
  resumes at exactly ``L`` and recomputes nothing of it. The incomplete page is private, so the first
  request that matches such a state claims it (the page moves into its row, as in notes section 7's
  experiment); later ones fall back to shallower states;
* **page-aligned states** (``L = P``), shareable by any number of requests (the tail is copied): at the
  last page boundary of every prompt (a client that re-sends an altered completion resumes there; for a
  prompt of whole pages also one page below, where the same prompt sent again resumes), at
  branch points (a match found pages beyond its deepest state, so the request snapshots where the pages
  end) and every ``DSV4_AGENT_RESUME_EVERY_PAGES`` pages of a prefill (default 16 = 2048 tokens; 0 = off;
  the knob trades ``tail_bytes`` per state for recompute).

A match reports the deepest state at or below the tree match whose tokens agree with the prompt; the rest is
recomputed. Resume states are bounded (``DSV4_AGENT_MAX_RESUME_STATES``) and evicted LRU, page-aligned
snapshots before finish states (the states the sessions' next turns resume from); their
incomplete pages count as evictable tokens, so SGLang's accounting and leak check stay exact. A state is
dropped with its node, so a stale state is never read; a claimed page belongs to its request only.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from dsv4_agent.model import TailState
from dsv4_agent.serve.v4pool import V4KVPool

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ResumeRecord:
    """A resume state at ``length`` hanging on ``node`` (which ends at ``length`` rounded down to a page)."""

    length: int
    tail: TailState
    node: TreeNode
    tokens: tuple[int, ...] = ()  # tokens of the incomplete page [P, length) (partial records only)
    namespace: tuple = (None, None)  # (extra_key, cache_salt): the root node is shared by all namespaces
    locs: torch.Tensor | None = None  # their SGLang locs (the page the record owns)
    reserved_by: str | None = None
    finish: bool = False  # left by a finished request: where its session's next turn resumes
    dropped: bool = field(default=False, repr=False)

    @property
    def partial(self) -> bool:
        return self.locs is not None


def _records(node: TreeNode) -> list[ResumeRecord]:
    return node.__dict__.setdefault("v4_records", [])


class V4TailRadixCache(RadixCache):
    def __init__(self, params, pool: V4KVPool, every_pages: int):
        self.pool = pool
        self.every = every_pages * pool.page_size if every_pages > 0 else 0
        self.lru: OrderedDict[int, ResumeRecord] = OrderedDict()  # id(record) -> record, oldest first
        self.chosen: dict[str, ResumeRecord] = {}  # rid -> record its last match resumes from
        self.branch: dict[str, int] = {}  # rid -> page-aligned point where a new state would pay off
        self.hits: dict[str, tuple[int, int]] = {}  # rid -> (pages the tree holds, resume point) of its match
        self.recomputed_tokens = 0  # total prompt tokens computed although the tree held their pages
        self._dropped_tokens = 0
        super().__init__(params)

    # ---- matching -----------------------------------------------------------------------------------
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        if self.disable or params.req is None:  # internal re-matches (checkpoint) see the plain tree
            return super().match_prefix(params)
        rid = params.req.rid
        self._unreserve(rid)
        self.branch.pop(rid, None)
        tree = super().match_prefix(params)
        key = params.key
        namespace = (key.extra_key, key.cache_salt)
        best, best_node = None, self.root_node
        for node, depth in self._path(tree.last_device_node):
            for rec in _records(node):
                if rec.length > len(key) or (best is not None and rec.length <= best.length):
                    continue
                if rec.partial and (rec.reserved_by not in (None, rid) or rec.namespace != namespace
                                    or tuple(key.token_ids[depth:rec.length]) != rec.tokens):
                    continue
                best, best_node = rec, node
        resumed = best.length if best is not None else 0
        self.hits[rid] = (tree.device_prefix_len, resumed)
        if tree.device_prefix_len > resumed - (resumed % self.page_size):
            self.branch[rid] = tree.device_prefix_len
        if best is None:
            return self._empty_match_result
        self.chosen[rid] = best
        self._touch(best)
        depth = best.length if not best.partial else best.length - len(best.tokens)
        if best.partial:
            best.reserved_by = rid
            self.evictable_size_ -= self.page_size
            self.protected_size_ += self.page_size
        return MatchResult(device_prefix_len=best.length, last_device_node=best_node, last_host_node=best_node,
                           best_match_node=best_node, cache_protected_len=depth)

    def _path(self, node: TreeNode) -> list[tuple[TreeNode, int]]:
        """(node, depth at which it ends) from the root to ``node``."""
        chain = [node]
        while chain[-1] is not self.root_node:
            chain.append(chain[-1].parent)
        depth, out = 0, []
        for n in reversed(chain):
            depth += len(n.key)
            out.append((n, depth))
        return out

    def prefix_device_indices(self, req) -> torch.Tensor:
        rec = self.chosen.get(req.rid)
        if rec is None or not rec.partial or rec.length != req.prefix_len:
            return super().prefix_device_indices(req)
        if rec.dropped or rec.reserved_by != req.rid:
            raise RuntimeError(f"resume state for {req.rid} vanished between match and allocation")
        # claim: the incomplete page moves into the request's row
        self._detach(rec)
        self.protected_size_ -= self.page_size
        rec.reserved_by = None
        path = self.path_device_indices(req.last_node)
        return torch.cat([path, rec.locs.to(path.dtype)])

    def maybe_hand_to_session(self, req) -> None:
        """The row exists now: install the chosen resume state and the snapshot points of this request."""
        if self.disable or req.kv.req_pool_idx is None:
            return
        row = req.kv.req_pool_idx
        rec = self.chosen.pop(req.rid, None)
        if rec is not None and rec.length == req.prefix_len:
            self.pool.pending[row] = rec.tail if rec.partial else rec.tail.clone()
        if row not in self.pool.snapshot_requests:  # a new row: where its prefill leaves resume states
            n = len(req.origin_input_ids)
            points = set(range(self.every, n, self.every)) if self.every else set()
            last = n - n % self.page_size
            points.add(last)  # the prompt's last page boundary (a client may alter the reply)
            if last == n:  # the same prompt again matches at most n - 1 tokens: SGLang computes at least one
                points.add(n - self.page_size)
            if req.rid in self.branch:
                points.add(self.branch.pop(req.rid))
            self.pool.snapshot_requests[row] = {b for b in points if b > req.prefix_len}
            tree_pages, resumed = self.hits.pop(req.rid, (0, 0))
            recomputed = max(0, tree_pages - resumed)
            self.recomputed_tokens += recomputed
            log.info("v4tail: rid=%s prompt=%d cached=%d tree_pages=%d recomputed_cached=%d computed=%d "
                     "(recomputed_cached since start %d)", req.rid, len(req.origin_input_ids), req.prefix_len,
                     tree_pages, recomputed, len(req.origin_input_ids) - req.prefix_len, self.recomputed_tokens)

    # ---- inserting ----------------------------------------------------------------------------------
    def checkpoint(self, req, *, up_to: int):
        if self.disable:
            return
        super().checkpoint(req, up_to=up_to)
        row = req.kv.req_pool_idx
        ids = req.full_untruncated_fill_ids
        # page-aligned states the forward emitted at this request's snapshot points
        emitted = self.pool.snapshots.get(row, {})
        for b in sorted(b for b in emitted if b <= req.kv.cache_protected_len):
            node = self._node_at(req, ids, b)
            if node is not None:
                self._add(ResumeRecord(b, emitted[b], node))
            del emitted[b]
        if req.finished() and up_to > 0:
            self._donate(req, row, ids, up_to)

    def _node_at(self, req, ids, depth: int) -> TreeNode | None:
        if depth == 0:
            return self.root_node
        m = super().match_prefix(MatchPrefixParams(key=RadixKey(ids[:depth], req.extra_key,
                                                                 cache_salt=req.cache_salt)))
        return m.last_device_node if m.device_prefix_len == depth else None

    def _donate(self, req, row: int, ids, up_to: int) -> None:
        """A finished request leaves its tail at ``up_to`` (and its incomplete page) on the tree."""
        tail = self.pool.take_tail(row, up_to)
        if tail is None:
            log.warning("request %s ends at %d but its state is not there; no resume state kept", req.rid, up_to)
            return
        aligned = req.kv.cache_protected_len  # the checkpoint inserted exactly the complete pages
        node = req.last_node
        if up_to == aligned:
            self._add(ResumeRecord(up_to, tail, node, finish=True))
            return
        locs = self.req_to_token_pool.req_to_token[row, aligned:up_to].to(torch.int64).clone()
        req.kv.cache_protected_len = up_to  # the page now belongs to the record: release frees none of it
        self.evictable_size_ += self.page_size
        self._add(ResumeRecord(up_to, tail, node, tokens=tuple(ids[aligned:up_to]), locs=locs,
                               namespace=(req.extra_key, req.cache_salt or None), finish=True))

    # ---- bookkeeping --------------------------------------------------------------------------------
    def _add(self, rec: ResumeRecord) -> None:
        records = _records(rec.node)
        for old in [r for r in records if r.length == rec.length and r.tokens == rec.tokens
                    and r.namespace == rec.namespace and r.reserved_by is None]:
            self._drop(old)  # a newer state of the same sequence replaces an unclaimed one
            rec.finish |= old.finish
        records.append(rec)
        self.lru[id(rec)] = rec
        while len(self.lru) > self.pool.max_resume_states:
            free = [r for r in self.lru.values() if r.reserved_by is None]
            if not free:
                break
            # a session's next turn resumes from its finish state; snapshots serve edits and branches
            self._drop(next((r for r in free if not r.finish), free[0]))

    def _touch(self, rec: ResumeRecord) -> None:
        if id(rec) in self.lru:
            self.lru.move_to_end(id(rec))

    def _detach(self, rec: ResumeRecord) -> None:
        records = _records(rec.node)
        if rec in records:
            records.remove(rec)
        self.lru.pop(id(rec), None)

    def _drop(self, rec: ResumeRecord) -> None:
        """Forget a record; an unclaimed incomplete page goes back to the allocator."""
        self._detach(rec)
        rec.dropped = True
        if rec.partial:
            self.token_to_kv_pool_allocator.free(rec.locs)
            if rec.reserved_by is not None:
                self.protected_size_ -= self.page_size
                self.chosen.pop(rec.reserved_by, None)
            else:
                self.evictable_size_ -= self.page_size
            self._dropped_tokens += self.page_size

    def _unreserve(self, rid: str) -> None:
        rec = self.chosen.pop(rid, None)
        if rec is not None and rec.reserved_by == rid and not rec.dropped:
            rec.reserved_by = None
            self.protected_size_ -= self.page_size
            self.evictable_size_ += self.page_size

    def on_release(self, req, *, checkpointed: bool) -> None:
        self._forget(req.rid)

    def release_aborted_request(self, handle) -> None:
        """An aborted request (also one still waiting, which has no row to release) drops its reservation."""
        super().release_aborted_request(handle)
        self._forget(handle.rid)

    def _forget(self, rid: str) -> None:
        self._unreserve(rid)
        self.branch.pop(rid, None)
        self.hits.pop(rid, None)

    # ---- eviction -----------------------------------------------------------------------------------
    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        for rec in list(_records(node)):  # its pages are gone: its states can never be resumed
            self._drop(rec)

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable:
            return EvictResult()
        self._dropped_tokens = 0
        states = len(self.lru)
        done = super().evict(params).num_tokens_evicted
        for rec in [r for r in self.lru.values() if r.partial and r.reserved_by is None]:
            if done + self._dropped_tokens >= params.num_tokens:
                break
            self._drop(rec)
        log.info("v4tail: evicted %d tree tokens + %d tokens of incomplete pages, dropped %d resume states "
                 "(asked %d)", done, self._dropped_tokens, states - len(self.lru), params.num_tokens)
        return EvictResult(num_tokens_evicted=done + self._dropped_tokens)

    def reset(self):
        super().reset()
        if hasattr(self, "lru"):
            self.lru.clear()
            self.chosen.clear()
            self.branch.clear()
            self.hits.clear()


def create(ctx) -> RadixCache:
    """``register_radix_cache_backend`` factory: our cache for our pool, the default chain otherwise."""
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    if not isinstance(pool, V4KVPool):
        from sglang.srt.mem_cache import registry

        return registry.default_radix_cache_factory(ctx)
    every = int(os.environ.get("DSV4_AGENT_RESUME_EVERY_PAGES", "16"))
    return V4TailRadixCache(ctx.params, pool, every)


def hook_default_factory(original, ctx) -> RadixCache:
    """AROUND hook on ``registry.default_radix_cache_factory``: our pool always gets our tree."""
    if isinstance(ctx.params.token_to_kv_pool_allocator.get_kvcache(), V4KVPool):
        return create(ctx)
    return original(ctx)
