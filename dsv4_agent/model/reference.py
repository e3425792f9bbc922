"""``reference_logits``: the one documented entry point for conformance checks."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import PAGE_SIZE, PagePool
from .checkpoint import load_model
from .model import Step
from .ops import Numerics

MODES = ("fp32", "fp32_sim", "quant", "mtp")


def reference_logits(model_dir: str | Path, input_ids, *, mode: str = "fp32", prefill_len: int | None = None,
                     return_hidden: bool = False):
    """Logits of the model in ``model_dir`` (official format) at every position of ``input_ids``.

    ``input_ids``: 1-D int sequence of T >= 1 token ids (position 0 first).
    ``mode`` (conformance/model/README.md):
      * ``"fp32"``: weights dequantized exactly, fp32 everywhere, KV FP8 / indexer FP4 simulations off;
      * ``"fp32_sim"``: the same with those simulations on;
      * ``"quant"``: released precision (bf16 activations, FP8 activation quantization before FP8 / FP4
        linears, simulations on, attention probabilities rounded to bf16);
      * ``"mtp"``: fp32; returns the MTP block's logits ``[T - 1, vocab]``, row t = the MTP block on (main
        streams of position t, token t + 1), i.e. the prediction of token t + 2.
    ``prefill_len=P``: the first P tokens run as one prefill, the rest as single-token decode steps through
    the paged cache (``None``: one prefill of all T tokens).
    Returns fp32 logits ``[T, vocab]`` (``[T - 1, vocab]`` for ``"mtp"``), or with ``return_hidden=True``
    ``{"logits": ..., "hidden": {layer: fp32 [T, hc_mult, hidden_size]}}`` (main-block output streams).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    T = ids.numel()
    if prefill_len is not None and not 1 <= prefill_len <= T:
        raise ValueError(f"prefill_len must be in [1, {T}], got {prefill_len}")
    model = load_model(model_dir, cache=True)
    cfg = model.config
    if mode == "mtp" and not model.mtp:
        raise ValueError(f"{model_dir}: mode 'mtp' needs an MTP block (num_nextn_predict_layers = 0)")
    num = Numerics.from_mode("fp32" if mode == "mtp" else mode)

    pool = PagePool(cfg, T // PAGE_SIZE + 1)
    seq = model.new_sequence(pool)
    P = T if prefill_len is None else prefill_len
    chunks = [ids[:P]] + [ids[t:t + 1] for t in range(P, T)]
    outs = [model.forward([Step(seq, c)], numerics=num, return_hidden=return_hidden)[0] for c in chunks]
    if mode == "mtp":
        streams = torch.cat([o.streams for o in outs])
        pairs = [(0, min(P, T - 1))] + [(t, t + 1) for t in range(P, T - 1)]
        logits_parts = [model.forward_mtp([seq], [streams[a:b]], [ids[a + 1:b + 1]], numerics=num)[0]
                        for a, b in pairs if b > a]
        logits = torch.cat(logits_parts) if logits_parts else torch.zeros(0, cfg.vocab_size)
    else:
        logits = torch.cat([o.logits for o in outs])
    seq.release()
    if not return_hidden:
        return logits
    hidden = {i: torch.cat([o.hidden[i] for o in outs]).float() for i in range(cfg.n_layers)}
    return {"logits": logits, "hidden": hidden}
