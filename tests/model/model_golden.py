"""Golden cases for the model tests: paths, loaded cases, metrics; one thread.

A plain module, not a conftest.py: a second ``conftest`` module would shadow the root one that other test
packages import by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from ground_truth import SHARED
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4_agent.model import PAGE_SIZE, PagePool, Step, load_model

torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI shares 2 cores

MODEL_DIR = SHARED / "conformance" / "model"
# every case directory that carries golden data, smallest first
CASES = tuple(sorted((d.name for d in MODEL_DIR.iterdir() if (d / "golden.safetensors").is_file()),
                     key=lambda name: (MODEL_DIR / name / "model.safetensors").stat().st_size))


class Golden:
    """One conformance case: its directory, golden tensors and metadata."""

    def __init__(self, case_dir: Path):
        self.dir = case_dir
        with safe_open(case_dir / "golden.safetensors", "pt") as f:
            self.meta = f.metadata()
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.tolerances = json.loads(self.meta["tolerances"])
        self.T, self.P = int(self.meta["T"]), int(self.meta["P"])
        self.ids = self.tensors["input_ids"]

    @property
    def model(self):
        return load_model(self.dir, cache=True)


_GOLDEN: dict[str, Golden] = {}


def get_golden(case: str) -> Golden:
    """The conformance case ``case`` (loaded once per session)."""
    if case not in _GOLDEN:
        _GOLDEN[case] = Golden(MODEL_DIR / case)
    return _GOLDEN[case]


def max_rel(a: torch.Tensor, g: torch.Tensor) -> float:
    """max over rows of max|a - g| / max|g| (the README's row-wise metric)."""
    a, g = a.float().flatten(1), g.float().flatten(1)
    return ((a - g).abs().amax(-1) / g.abs().amax(-1)).max().item()


def fro_rel(a: torch.Tensor, g: torch.Tensor) -> float:
    return ((a.float() - g.float()).norm() / g.float().norm()).item()


def argmax_agree(a: torch.Tensor, g: torch.Tensor) -> float:
    return (a.argmax(-1) == g.argmax(-1)).float().mean().item()


def check_tolerance(a: torch.Tensor, g: torch.Tensor, tol: dict) -> dict[str, float]:
    """Assert every metric named in a golden ``tolerances`` entry; returns the measured values."""
    measured = {}
    for metric, fn in (("max_rel", max_rel), ("fro_rel", fro_rel)):
        if metric in tol:
            measured[metric] = fn(a, g)
            assert measured[metric] <= tol[metric], f"{metric} {measured[metric]:.3g} > {tol[metric]}"
    if "argmax_agree" in tol:
        measured["argmax_agree"] = argmax_agree(a, g)
        assert measured["argmax_agree"] >= tol["argmax_agree"], f"argmax_agree {measured['argmax_agree']:.3f}"
    assert measured, f"no metric in tolerance entry {tol}"
    return measured


def run_chunks(model, ids: torch.Tensor, chunks: list[int], mode: str = "fp32") -> torch.Tensor:
    """Logits [len(ids), vocab] of one fresh sequence fed ``ids`` in calls of ``chunks`` tokens each."""
    seq = model.new_sequence(PagePool(model.config, len(ids) // PAGE_SIZE + 1))
    out, pos = [], 0
    for n in chunks:
        out.append(model.forward([Step(seq, ids[pos:pos + n])], numerics=mode)[0].logits)
        pos += n
    assert pos == len(ids) == seq.length and len(seq.pages) == len(ids) // PAGE_SIZE
    return torch.cat(out)


def rewrite_checkpoint(path: Path, edit: Callable[[dict], object],
                       index_edit: Callable[[dict], object] | None = None) -> None:
    """Apply ``edit`` to the tensors of a single-file checkpoint, then ``index_edit`` to its index weight map
    (by default the index lists exactly the tensors stored)."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(tensors, "model.safetensors")
    if index_edit is not None:
        index_edit(index["weight_map"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
