"""Measured errors of ``reference_logits`` against every public golden case and mode (not timed).

    python benchmarks/model_conformance.py [path/to/shared/conformance/model]

Prints one row per (case, check): max_rel (row-wise max|a - g| / max|g|), fro_rel, argmax agreement, and the
case's own tolerance from the golden metadata.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from dsv4_agent.model import reference_logits


def metrics(a: torch.Tensor, g: torch.Tensor) -> tuple[float, float, float]:
    a, g = a.float().flatten(1), g.float().flatten(1)
    max_rel = ((a - g).abs().amax(-1) / g.abs().amax(-1)).max().item()
    fro = ((a - g).norm() / g.norm()).item()
    return max_rel, fro, (a.argmax(-1) == g.argmax(-1)).float().mean().item()


def main() -> None:
    torch.set_num_threads(1)
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/conformance/model"
    print(f"{'case':10} {'check':26} {'max_rel':>9} {'fro_rel':>9} {'argmax':>7}  tolerance")
    for case in ("t2-window", "t1-mixed", "t3-smooth"):
        d = root / case
        with safe_open(d / "golden.safetensors", "pt") as f:
            meta, g = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tol = json.loads(meta["tolerances"])
        ids, P = g["input_ids"], int(meta["P"])
        full = reference_logits(d, ids, return_hidden=True)
        rows = [("logits_fp32", full["logits"], g["logits_fp32"], tol["logits_fp32"]),
                (f"logits_decode_fp32 (P={P})", reference_logits(d, ids, prefill_len=P), g["logits_decode_fp32"],
                 tol["logits_decode_fp32"])]
        for i, h in full["hidden"].items():
            rows.append((f"hidden_fp32.layer{i}", h, g[f"hidden_fp32.layer{i}"], tol["hidden_fp32"]))
        if "mtp_logits_fp32" in g:
            rows.append(("mtp_logits_fp32", reference_logits(d, ids, mode="mtp"), g["mtp_logits_fp32"],
                         tol["mtp_logits_fp32"]))
            rows.append(("mtp_logits_fp32 (decode)", reference_logits(d, ids, mode="mtp", prefill_len=P),
                         g["mtp_logits_fp32"], tol["mtp_logits_fp32"]))
        for mode in ("fp32_sim", "quant"):
            rows.append((f"logits_{mode}", reference_logits(d, ids, mode=mode), g[f"logits_{mode}"],
                         tol[f"logits_{mode}"]))
            rows.append((f"logits_{mode} (decode)", reference_logits(d, ids, mode=mode, prefill_len=P),
                         g[f"logits_{mode}"], tol[f"logits_{mode}"]))
        for name, a, ref, t in rows:
            mr, fro, am = metrics(a, ref)
            shown = {k: v for k, v in t.items() if k != "kind"}
            print(f"{case:10} {name:26} {mr:9.2e} {fro:9.2e} {am:7.3f}  {shown}")


if __name__ == "__main__":
    main()
