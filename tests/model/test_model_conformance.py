"""Every public golden case at its own tolerances (golden metadata ``tolerances``)."""

from __future__ import annotations

import pytest
import torch
from model_golden import CASES, check_tolerance, get_golden, max_rel

from dsv4_agent.model import reference_logits


@pytest.mark.parametrize("case", CASES)
def test_fp32_prefill_logits_and_hidden(case):
    golden = get_golden(case)
    out = reference_logits(golden.dir, golden.ids, return_hidden=True)
    assert out["logits"].shape == golden.tensors["logits_fp32"].shape
    check_tolerance(out["logits"], golden.tensors["logits_fp32"], golden.tolerances["logits_fp32"])
    layers = sorted(int(k.rsplit("layer", 1)[1]) for k in golden.tensors if k.startswith("hidden_fp32."))
    assert sorted(out["hidden"]) == layers
    for i in layers:
        check_tolerance(out["hidden"][i], golden.tensors[f"hidden_fp32.layer{i}"], golden.tolerances["hidden_fp32"])


@pytest.mark.parametrize("case", CASES)
def test_fp32_prefill_then_decode(case):
    golden = get_golden(case)
    out = reference_logits(golden.dir, golden.ids, prefill_len=golden.P)
    check_tolerance(out, golden.tensors["logits_decode_fp32"], golden.tolerances["logits_decode_fp32"])


@pytest.mark.parametrize("case", CASES)
def test_mtp_logits(case):
    golden = get_golden(case)
    if "mtp_logits_fp32" not in golden.tensors:
        with pytest.raises(ValueError, match="MTP"):
            reference_logits(golden.dir, golden.ids[:3], mode="mtp")
        return
    out = reference_logits(golden.dir, golden.ids, mode="mtp")
    assert out.shape == (golden.T - 1, golden.model.config.vocab_size)
    check_tolerance(out, golden.tensors["mtp_logits_fp32"], golden.tolerances["mtp_logits_fp32"])
    # the MTP block through its own window cache, decoding after a prefill of P
    dec = reference_logits(golden.dir, golden.ids, mode="mtp", prefill_len=golden.P)
    check_tolerance(dec, golden.tensors["mtp_logits_fp32"], golden.tolerances["mtp_logits_fp32"])


@pytest.mark.parametrize("mode", ["fp32_sim", "quant"])
@pytest.mark.parametrize("case", CASES)
def test_simulated_and_released_precision(case, mode):
    golden = get_golden(case)
    out = reference_logits(golden.dir, golden.ids, mode=mode)
    assert torch.isfinite(out).all()
    check_tolerance(out, golden.tensors[f"logits_{mode}"], golden.tolerances[f"logits_{mode}"])


@pytest.mark.parametrize("case", CASES)
def test_fp32_sim_prefill_then_decode(case):
    """With the KV FP8 / indexer FP4 simulations on, decoding through the cache (rounded values stored in
    pages and tails) stays within the case's fp32_sim tolerance."""
    golden = get_golden(case)
    dec = reference_logits(golden.dir, golden.ids, mode="fp32_sim", prefill_len=golden.P)
    check_tolerance(dec, golden.tensors["logits_fp32_sim"], golden.tolerances["logits_fp32_sim"])


@pytest.mark.parametrize("case", CASES)
def test_quant_prefill_then_decode_is_close(case):
    """Released precision through the cache: within the reference's own prefill-vs-decode spread."""
    golden = get_golden(case)
    dec = reference_logits(golden.dir, golden.ids, mode="quant", prefill_len=golden.P)
    check_tolerance(dec, golden.tensors["logits_quant"], golden.tolerances["logits_quant"])


@pytest.mark.parametrize("case", CASES)
def test_selections_match_golden_topk(case):
    """Router and indexer decisions of the fp32 prefill equal the golden ones (sets, ascending)."""
    golden = get_golden(case)
    from dsv4_agent.model import ops

    model = golden.model
    seen: dict[str, list[torch.Tensor]] = {}
    orig_route, orig_topk = ops.route, ops.indexer_topk

    def route(logits, bias, hashed, topk, scale):
        w, e = orig_route(logits, bias, hashed, topk, scale)
        seen.setdefault("router", []).append(e)
        return w, e

    def topk(scores, n_avail, k):
        sel = orig_topk(scores, n_avail, k)
        seen.setdefault("indexer", []).append(sel)
        return sel

    ops.route, ops.indexer_topk = route, topk
    try:
        reference_logits(golden.dir, golden.ids)
    finally:
        ops.route, ops.indexer_topk = orig_route, orig_topk
    cfg = model.config
    routers = seen["router"][: cfg.n_layers]  # one routing call per main layer, in layer order
    for i in range(cfg.n_layers):
        if not cfg.is_hash_layer(i):
            assert torch.equal(routers[i].sort(-1).values.int(), golden.tensors[f"router_topk.layer{i}"]), i
    for i, sel in zip(cfg.csa_layers, seen.get("indexer", []), strict=True):
        want = golden.tensors[f"indexer_topk.layer{i}"]
        got = sel.masked_fill(sel < 0, torch.iinfo(torch.int64).max).sort(-1).values
        got = got.masked_fill(got == torch.iinfo(torch.int64).max, -1)[:, : want.shape[1]].int()
        assert torch.equal(got, want), f"indexer layer {i}"


@pytest.mark.parametrize("case", CASES)
def test_prefill_vs_golden_decode_consistency(case):
    """Sanity of the metric helper: the golden decode logits are within 1e-5 of the golden prefill."""
    golden = get_golden(case)
    assert max_rel(golden.tensors["logits_decode_fp32"], golden.tensors["logits_fp32"]) <= 1e-5
