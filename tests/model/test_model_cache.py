"""The paged cache: snapshot / restore, page sharing between sequences, batches mixing prefills and decodes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_golden import get_golden, max_rel

from dsv4_agent.model import PAGE_SIZE, PagePool, SequenceCache, Step


def logits_of(model, seq, ids, **kw):
    return model.forward([Step(seq, ids, **kw)])[0]


@pytest.mark.parametrize("case,splits", [
    ("t1-mixed", (1, 5, 127, 128, 131, 256, 299)),
    ("t3-smooth", (3, 128, 130, 256, 385, 512, 517, 520)),
])
def test_restore_from_snapshot_matches_full_prefill(case, splits):
    """Snapshots taken inside one prefill call (not multiples of 4 / 128, and exactly at multiples of 128);
    restoring each and computing the rest gives logits_fp32 within 1e-5."""
    g = get_golden(case)
    model, ref = g.model, g.tensors["logits_fp32"]
    pool = PagePool(model.config, 64)
    seq = model.new_sequence(pool)
    out = logits_of(model, seq, g.ids, snapshot_at=splits)
    assert max_rel(out.logits, ref) <= 1e-5
    assert sorted(out.snapshots) == sorted(splits)
    for b, state in out.snapshots.items():
        assert state.length == b and len(state.pages) == b // PAGE_SIZE
        assert list(state.pages) == seq.pages[: b // PAGE_SIZE]  # shared, not copied
        resumed = SequenceCache.restore(pool, state)
        rest = g.ids[b:]
        if len(rest):  # one decode step, then the remainder as one chunk
            first = logits_of(model, resumed, rest[:1]).logits
            got = torch.cat([first, logits_of(model, resumed, rest[1:]).logits]) if len(rest) > 1 else first
            assert max_rel(got, ref[b:]) <= 1e-5, f"resume at {b}"
        else:  # a snapshot at the end of the call is a copy of the live tail
            assert torch.equal(resumed.tail.layers[0].window, seq.tail.layers[0].window)
        resumed.release()
        state.release()
    seq.release()
    assert pool.num_free == pool.num_pages


def test_snapshot_of_a_live_sequence():
    """seq.snapshot() between calls equals the in-call snapshot; the original continues unaffected."""
    g = get_golden("t1-mixed")
    model, ref = g.model, g.tensors["logits_fp32"]
    pool = PagePool(model.config, 16)
    seq = model.new_sequence(pool)
    logits_of(model, seq, g.ids[:133])
    state = seq.snapshot()
    a = logits_of(model, seq, g.ids[133:200]).logits
    b = logits_of(model, SequenceCache.restore(pool, state), g.ids[133:200]).logits
    assert torch.equal(a, b)
    assert max_rel(a, ref[133:200]) <= 1e-5


@pytest.mark.parametrize("case", ["t1-mixed", "t3-smooth"])
def test_prefix_pages_are_shared_exactly(case):
    """Two sequences with a common prefix of k full pages: the second, built on the first's pages and the
    resume state snapshotted at the page boundary during the first's prefill, equals computing it alone."""
    g = get_golden(case)
    model, cfg = g.model, g.model.config
    k = 2
    boundary = k * PAGE_SIZE
    gen = torch.Generator().manual_seed(7)
    first = g.ids[: boundary + 61]
    second = torch.cat([g.ids[:boundary], torch.randint(0, cfg.vocab_size, (97,), generator=gen)])

    pool = PagePool(cfg, 16)
    seq_a = model.new_sequence(pool)
    state = logits_of(model, seq_a, first, snapshot_at=(boundary,)).snapshots[boundary]
    seq_b = SequenceCache.restore(pool, state)
    shared = logits_of(model, seq_b, second[boundary:]).logits
    assert seq_b.pages[:k] == seq_a.pages[:k]
    assert all(pool.refcount[p] == 3 for p in seq_a.pages[:k])  # seq_a, the snapshot, seq_b

    alone_pool = PagePool(cfg, 16)
    alone = logits_of(model, model.new_sequence(alone_pool), second).logits
    assert max_rel(shared, alone[boundary:]) <= 1e-5
    # the shared pages hold what the second sequence computes for itself
    seq_alone = model.new_sequence(alone_pool)
    logits_of(model, seq_alone, second)
    for layer, t in pool.entries.items():
        got, want = t[seq_b.pages[:k]], alone_pool.entries[layer][seq_alone.pages[:k]]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("case", ["t1-mixed", "t3-smooth"])
def test_batch_mixing_prefill_and_decodes(case):
    """One forward over a fresh prefill, a decode at 200, a 6-token chunk at 127 and a decode crossing a page
    boundary equals each sequence alone (and the golden logits)."""
    g = get_golden(case)
    model, ref = g.model, g.tensors["logits_fp32"]
    pool = PagePool(model.config, 32)
    starts, lengths = [0, 200, 127, 255], [37, 1, 6, 1]
    seqs = []
    for s in starts:
        seq = model.new_sequence(pool)
        if s:
            logits_of(model, seq, g.ids[:s])
        seqs.append(seq)
    alone = []
    for seq, s, n in zip(seqs, starts, lengths, strict=True):
        twin = SequenceCache.restore(pool, seq.snapshot())
        alone.append(logits_of(model, twin, g.ids[s:s + n]).logits)
    outs = model.forward([Step(seq, g.ids[s:s + n]) for seq, s, n in zip(seqs, starts, lengths, strict=True)])
    for out, a, s, n in zip(outs, alone, starts, lengths, strict=True):
        assert out.logits.shape == (n, model.config.vocab_size)
        assert max_rel(out.logits, a) <= 1e-5
        assert max_rel(out.logits, ref[s:s + n]) <= 1e-5
    assert [sq.length for sq in seqs] == [s + n for s, n in zip(starts, lengths, strict=True)]
    assert len(seqs[3].pages) == 2  # the decode at 255 completed page 1


def test_empty_batch_and_bad_steps():
    g = get_golden("t2-window")
    model = g.model
    pool = PagePool(model.config, 2)
    assert model.forward([]) == []
    seq = model.new_sequence(pool)
    with pytest.raises(ValueError, match="non-empty"):
        model.forward([Step(seq, torch.zeros(0, dtype=torch.long))])
    with pytest.raises(ValueError, match="token id"):
        model.forward([Step(seq, torch.tensor([model.config.vocab_size]))])
    with pytest.raises(ValueError, match="snapshot position"):
        model.forward([Step(seq, g.ids[:3], snapshot_at=(5,))])


def test_page_pool_accounting():
    g = get_golden("t3-smooth")
    pool = PagePool(g.model.config, 2)
    seq = g.model.new_sequence(pool)
    logits_of(g.model, seq, g.ids[:256])
    assert pool.num_free == 0 and seq.pages == [0, 1]
    with pytest.raises(RuntimeError, match="exhausted"):
        logits_of(g.model, seq, g.ids[256:384])
    seq.release()
    assert pool.num_free == 2
    with pytest.raises(RuntimeError, match="released"):
        pool.release([0])
    other = PagePool(g.model.config, 2)
    with pytest.raises(ValueError, match="different PagePool"):
        SequenceCache.restore(other, g.model.new_sequence(pool).snapshot())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 519), min_size=1, max_size=5, unique=True), data=st.data())
def test_any_chunking_with_restores_matches_prefill(cuts, data):
    """Property: splitting t3-smooth (no discrete decisions) into arbitrary chunks, and moving to a restored
    copy at an arbitrary chunk boundary, always reproduces the full-prefill golden logits."""
    g = get_golden("t3-smooth")
    model, ref = g.model, g.tensors["logits_fp32"]
    bounds = [0, *sorted(cuts), g.T]
    restore_at = data.draw(st.sampled_from(bounds[1:-1]))
    pool = PagePool(model.config, 16)
    seq = model.new_sequence(pool)
    got = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a == restore_at:
            state = seq.snapshot()
            seq.release()
            seq = SequenceCache.restore(pool, state)
            state.release()
        got.append(logits_of(model, seq, g.ids[a:b]).logits)
    assert max_rel(torch.cat(got), ref) <= 1e-5
    seq.release()
    assert pool.num_free == pool.num_pages
