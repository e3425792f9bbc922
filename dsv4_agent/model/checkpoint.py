"""Official DeepSeek-V4 checkpoint format (spec sections 7-8): expected keys, loading, and writing.

* :func:`expected_tensors` - every key of a checkpoint for a config, with its released shape and dtype.
* :func:`load_model` - read ``config.json`` + safetensors shards (``model.safetensors.index.json`` when
  present), check every key / shape / dtype before reading data (errors name the key), keep the tensors as
  stored (FP8 / FP4 weights with their scales; the model dequantizes when it uses them), report progress per shard.
* :func:`save_random_checkpoint` - write a seeded random model in the released format (FP8 e4m3 weights
  with ue8m0 128x128 block scales, packed FP4 experts with per-32 scales, BF16 / F32 / I64 elsewhere).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import ops
from .config import FP8_WEIGHT_BLOCK, DeepSeekV4Config, load_config
from .model import DeepSeekV4

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (message names the key)."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F8_E4M3, F8_E8M0, I8, BF16, F32, I64
    kind: str  # "fp8" (weight with a .scale), "fp4", "scale", "plain"


@dataclass(frozen=True)
class LoadProgress:
    shard: str
    shard_index: int  # 1-based
    num_shards: int
    tensors_done: int
    tensors_total: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expected_tensors(cfg: DeepSeekV4Config) -> dict[str, TensorSpec]:
    """Every checkpoint key for ``cfg`` -> released shape / dtype (spec 8.1; MTP under ``mtp.k.``)."""
    d, hc = cfg.hidden_size, cfg.hc_mult
    H, D = cfg.num_attention_heads, cfg.head_dim
    out: dict[str, TensorSpec] = {}

    def plain(key: str, shape: tuple[int, ...], dtype: str) -> None:
        out[key] = TensorSpec(tuple(shape), dtype, "plain")

    def linear(key: str, o: int, i: int, stored: str) -> None:
        # the shapes the model's linears hold (one rule for both, in ops)
        (w_shape, w_dtype), scale = ops.stored_weight_shapes(o, i, stored)
        out[key + ".weight"] = TensorSpec(w_shape, _SAFETENSORS_NAMES[w_dtype], stored)
        if scale is not None:
            out[key + ".scale"] = TensorSpec(scale[0], _SAFETENSORS_NAMES[scale[1]], "scale")

    def fp8(key: str, o: int, i: int) -> None:
        linear(key, o, i, "fp8")

    def expert(key: str, o: int, i: int) -> None:
        linear(key, o, i, cfg.expert_dtype)

    def block(p: str, layer_id: int) -> None:
        mix = (2 + hc) * hc
        for sub in ("attn", "ffn"):
            plain(f"{p}hc_{sub}_fn", (mix, hc * d), "F32")
            plain(f"{p}hc_{sub}_base", (mix,), "F32")
            plain(f"{p}hc_{sub}_scale", (3,), "F32")
        plain(f"{p}attn_norm.weight", (d,), "BF16")
        plain(f"{p}ffn_norm.weight", (d,), "BF16")
        a = p + "attn."
        plain(a + "attn_sink", (H,), "F32")
        fp8(a + "wq_a", cfg.q_lora_rank, d)
        plain(a + "q_norm.weight", (cfg.q_lora_rank,), "BF16")
        fp8(a + "wq_b", H * D, cfg.q_lora_rank)
        fp8(a + "wkv", D, d)
        plain(a + "kv_norm.weight", (D,), "BF16")
        fp8(a + "wo_a", cfg.o_groups * cfg.o_lora_rank, H * D // cfg.o_groups)
        fp8(a + "wo_b", d, cfg.o_groups * cfg.o_lora_rank)
        m = cfg.ratio(layer_id)
        if m:
            k = 2 if m == 4 else 1
            plain(a + "compressor.ape", (m, k * D), "F32")
            plain(a + "compressor.wkv.weight", (k * D, d), "BF16")
            plain(a + "compressor.wgate.weight", (k * D, d), "BF16")
            plain(a + "compressor.norm.weight", (D,), "BF16")
        if m == 4:
            DI, HI = cfg.index_head_dim, cfg.index_n_heads
            fp8(a + "indexer.wq_b", HI * DI, cfg.q_lora_rank)
            plain(a + "indexer.weights_proj.weight", (HI, d), "BF16")
            plain(a + "indexer.compressor.ape", (4, 2 * DI), "F32")
            plain(a + "indexer.compressor.wkv.weight", (2 * DI, d), "BF16")
            plain(a + "indexer.compressor.wgate.weight", (2 * DI, d), "BF16")
            plain(a + "indexer.compressor.norm.weight", (DI,), "BF16")
        f = p + "ffn."
        E, F_ = cfg.n_routed_experts, cfg.moe_intermediate_size
        plain(f + "gate.weight", (E, d), "BF16")
        if cfg.is_hash_layer(layer_id):
            plain(f + "gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "I64")
        else:
            plain(f + "gate.bias", (E,), "F32")
        for w, (o, i) in (("w1", (F_, d)), ("w2", (d, F_)), ("w3", (F_, d))):
            fp8(f"{f}shared_experts.{w}", o, i)
            for e in range(E):
                expert(f"{f}experts.{e}.{w}", o, i)

    plain("embed.weight", (cfg.vocab_size, d), "BF16")
    for layer in range(cfg.n_layers):
        block(f"layers.{layer}.", layer)
    plain("norm.weight", (d,), "BF16")
    plain("head.weight", (cfg.vocab_size, d), "BF16")
    plain("hc_head_fn", (hc, hc * d), "F32")
    plain("hc_head_base", (hc,), "F32")
    plain("hc_head_scale", (1,), "F32")
    for k in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{k}."
        block(p, cfg.n_layers + k)
        fp8(p + "e_proj", d, d)
        fp8(p + "h_proj", d, d)
        for n in ("enorm", "hnorm", "norm"):
            plain(f"{p}{n}.weight", (d,), "BF16")
        plain(p + "hc_head_fn", (hc, hc * d), "F32")
        plain(p + "hc_head_base", (hc,), "F32")
        plain(p + "hc_head_scale", (1,), "F32")
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def _open_shard(path: Path) -> Iterator:
    """``safe_open`` whose failures (corrupt or truncated file) are a :class:`CheckpointError` naming the file."""
    try:
        f = safe_open(path, "pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    with f:
        yield f


def _shard_map(model_dir: Path) -> dict[str, str]:
    """key -> shard file name, from the index file or the single-file layout."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        return dict(weight_map)
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    with _open_shard(single) as f:
        return {k: SINGLE_FILE for k in f.keys()}


SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8,
                      "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def check_tensor(expected: dict[str, TensorSpec], key: str, shape: tuple[int, ...], dtype: str) -> None:
    """Raise :class:`CheckpointError` naming ``key`` unless it is expected with this shape and safetensors dtype."""
    spec = expected.get(key)
    if spec is None:
        raise CheckpointError(f"checkpoint has unexpected tensor {key!r}")
    if tuple(shape) != spec.shape or dtype != spec.dtype:
        raise CheckpointError(f"tensor {key!r}: expected shape {list(spec.shape)} dtype {spec.dtype}, "
                              f"got shape {list(shape)} dtype {dtype}")


def check_keys(expected: dict[str, TensorSpec], found: set[str]) -> None:
    """Raise :class:`CheckpointError` naming the first missing or unexpected key."""
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        if all(k.endswith(".scale") for k in missing):
            more += ("; every FP8 / FP4 weight needs its block scale (an unquantized BF16 checkpoint is not the "
                     "released format)")
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]!r}{more}")


def _check_expert_ids(key: str, tid2eid: torch.Tensor, n_experts: int) -> None:
    """A hash-routing table may only name existing experts."""
    if tid2eid.numel() and not (0 <= int(tid2eid.min()) and int(tid2eid.max()) < n_experts):
        bad = tid2eid[(tid2eid < 0) | (tid2eid >= n_experts)][0]
        raise CheckpointError(f"tensor {key!r}: expert id {int(bad)} outside [0, {n_experts}) (n_routed_experts)")


def load_state_dict(model_dir: str | Path, cfg: DeepSeekV4Config, *,
                    progress: Callable[[LoadProgress], None] | None = None) -> dict[str, torch.Tensor]:
    """Read and validate a checkpoint; returns the module state dict, every tensor as stored (``tid2eid`` int64)."""
    model_dir = Path(model_dir)
    expected = expected_tensors(cfg)
    shard_of = _shard_map(model_dir)
    check_keys(expected, set(shard_of))
    shards = sorted(set(shard_of.values()))
    by_shard: dict[str, list[str]] = {s: [] for s in shards}
    for k, s in shard_of.items():
        by_shard[s].append(k)

    # Pass 1: headers only, so that a bad checkpoint fails before any large read.
    for shard in shards:
        path = model_dir / shard
        if not path.exists():
            raise CheckpointError(f"shard {shard!r} named in {INDEX_FILE} (for {by_shard[shard][0]!r}) does not exist")
        with _open_shard(path) as f:
            present = set(f.keys())
            unlisted = sorted(present - set(by_shard[shard]))
            if unlisted:  # a tensor the index does not name would silently not be loaded
                raise CheckpointError(f"shard {shard!r} stores tensor {unlisted[0]!r} that {INDEX_FILE} does not list"
                                      + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))
            for key in by_shard[shard]:
                if key not in present:
                    raise CheckpointError(f"tensor {key!r} is listed in {INDEX_FILE} for {shard!r} but not stored there")
                sl = f.get_slice(key)
                check_tensor(expected, key, tuple(sl.get_shape()), sl.get_dtype())

    # Pass 2: read.
    state: dict[str, torch.Tensor] = {}
    done = 0
    for i, shard in enumerate(shards, 1):
        with _open_shard(model_dir / shard) as f:
            for key in by_shard[shard]:
                state[key] = f.get_tensor(key)
                if key.endswith("gate.tid2eid"):
                    _check_expert_ids(key, state[key], cfg.n_routed_experts)
                done += 1
        log.info("loaded shard %d/%d %s (%d/%d tensors)", i, len(shards), shard, done, len(expected))
        if progress is not None:
            progress(LoadProgress(shard, i, len(shards), done, len(expected)))
    return state


_MODEL_CACHE: dict[tuple, DeepSeekV4] = {}


def load_model(model_dir: str | Path, *, progress: Callable[[LoadProgress], None] | None = None,
               cache: bool = False) -> DeepSeekV4:
    """Build :class:`DeepSeekV4` from an official-format directory (config.json + safetensors).

    ``cache=True`` memoizes by path and the files' mtimes / sizes, so repeated checks do not reload.
    """
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors*"))]
    key = (str(model_dir.resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if cache and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    state = load_state_dict(model_dir, cfg, progress=progress)
    model = DeepSeekV4(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    if cache:
        _MODEL_CACHE[key] = model
    return model


# ---------------------------------------------------------------------------------------------------------
# Writing a seeded random checkpoint in the released format
# ---------------------------------------------------------------------------------------------------------
def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (float8_e4m3fn [out, in], float8_e8m0fnu [ceil(out/128), ceil(in/128)]) with power-of-two
    block scales (amax / 448 rounded up)."""
    out, inp = w.shape
    po, pi = _cdiv(out, FP8_WEIGHT_BLOCK) * FP8_WEIGHT_BLOCK, _cdiv(inp, FP8_WEIGHT_BLOCK) * FP8_WEIGHT_BLOCK
    padded = torch.zeros(po, pi)
    padded[:out, :inp] = w
    blocks = padded.view(po // FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, pi // FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK)
    amax = blocks.abs().amax((1, 3)).clamp_min(1e-4)
    scale = ops.pow2_ceil(amax / ops.FP8_MAX)
    q = (blocks / scale[:, None, :, None]).clamp(-ops.FP8_MAX, ops.FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(po, pi)[:out, :inp].contiguous(), scale.to(torch.float8_e8m0fnu)


def quantize_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (packed e2m1 int8 [out, in/2], float8_e8m0fnu [out, in/32])."""
    s = ops.fp4_scales(w, 32)
    codes = ops.fp4_sim(w, 32).float() / s.repeat_interleave(32, 1)  # the e2m1 values, s a power of two
    return ops.pack_fp4(codes), s.to(torch.float8_e8m0fnu)


def random_tensors(cfg: DeepSeekV4Config, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights (numpy PCG64) for every key of :func:`expected_tensors`, stored as released.

    Magnitudes keep a random tiny model numerically tame: linears ~ N(0, 1/in), norms ~ 1, small mHC
    mixing weights, hash tables with distinct experts per token.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    specs = expected_tensors(cfg)
    out: dict[str, torch.Tensor] = {}

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    for key, spec in specs.items():
        if spec.kind == "scale":
            continue
        if spec.kind in ("fp8", "fp4"):
            o = spec.shape[0]
            i = spec.shape[1] * (2 if spec.kind == "fp4" else 1)
            w = normal((o, i), 1 / math.sqrt(i))
            q, s = quantize_fp8_weight(w) if spec.kind == "fp8" else quantize_fp4_weight(w)
            out[key] = q
            out[key[: -len(".weight")] + ".scale"] = s
            continue
        if key.endswith("tid2eid"):
            rows = [rng.permutation(cfg.n_routed_experts)[: spec.shape[1]] for _ in range(spec.shape[0])]
            t = torch.from_numpy(np.stack(rows).astype(np.int64))
        elif key.endswith("norm.weight"):
            t = 1 + normal(spec.shape, 0.1)
        elif key.endswith("_fn"):
            t = normal(spec.shape, 0.5 / math.sqrt(spec.shape[1]))
        elif key.endswith("_base"):
            t = normal(spec.shape, 0.5)
        elif key.endswith("_scale"):
            t = 0.5 + normal(spec.shape, 0.1).abs()
        elif key.endswith("attn_sink") or key.endswith("gate.bias"):
            t = normal(spec.shape, 0.5)
        elif key.endswith("ape"):
            t = normal(spec.shape, 0.1)
        elif key == "embed.weight":
            t = normal(spec.shape, 1.0)
        else:  # bf16 linears: head, gate, compressor wkv/wgate, indexer weights_proj
            t = normal(spec.shape, 1 / math.sqrt(spec.shape[1]))
        out[key] = t.to(SAFETENSORS_DTYPES[spec.dtype])
    return out


def save_random_checkpoint(cfg: DeepSeekV4Config, out_dir: str | Path, seed: int, *,
                           max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json``, safetensors shard(s) and ``model.safetensors.index.json`` with seeded random
    weights, quantized exactly as the release stores them. ``max_shard_bytes`` splits into several shards
    (``model-00001-of-0000N.safetensors``); by default one ``model.safetensors``. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(cfg, seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return out_dir
