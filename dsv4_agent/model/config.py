"""Typed DeepSeek-V4 configuration read from the Hugging Face ``config.json`` (spec section 1).

Only the fields that change the computation are kept; anything the reference would reject (or that this
implementation cannot represent) raises :class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Compressed entries live in pages of this many tokens, aligned to absolute positions (see cache.py).
PAGE_SIZE = 128
# Every linear that the release stores as FP8 uses square blocks of this size for its scales.
FP8_WEIGHT_BLOCK = 128


class ConfigError(ValueError):
    """A config.json that is missing a field, has a wrong type, or is internally inconsistent."""


@dataclass(frozen=True)
class DeepSeekV4Config:
    vocab_size: int
    hidden_size: int  # d
    num_hidden_layers: int
    num_nextn_predict_layers: int  # MTP blocks
    num_attention_heads: int  # H
    head_dim: int  # D (K = V, one shared KV head)
    qk_rope_head_dim: int  # r: the last r dims of every head carry RoPE
    q_lora_rank: int
    o_groups: int  # G
    o_lora_rank: int  # R
    sliding_window: int  # W, includes the current token
    compress_ratios: tuple[int, ...]  # per layer (main layers, then MTP blocks): 0, 4 (CSA) or other m (HCA)
    rope_theta: float  # base of layers with m = 0 (no YaRN)
    compress_rope_theta: float  # base of layers with m > 0 (with YaRN)
    rope_factor: float
    rope_original_max_position: int  # 0: no YaRN (rope_scaling absent or null)
    rope_beta_fast: float
    rope_beta_slow: float
    max_position_embeddings: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    num_hash_layers: int
    swiglu_limit: float  # 0: no clamp
    expert_dtype: str  # "fp4" (packed e2m1 + per-32 scales) or "fp8" (128x128 blocks)
    bos_token_id: int = 0
    eos_token_id: int = 1

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def yarn(self) -> tuple[int, float, float, float] | None:
        """YaRN parameters of the compressed layers (original length, factor, beta_fast, beta_slow), None = none."""
        if self.rope_original_max_position <= 0:
            return None
        return (self.rope_original_max_position, self.rope_factor, self.rope_beta_fast, self.rope_beta_slow)

    def ratio(self, layer_id: int) -> int:
        """Compression ratio m of main layer ``layer_id`` (or MTP block ``layer_id - n_layers``)."""
        return self.compress_ratios[layer_id]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.num_hash_layers

    @property
    def csa_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.compress_ratios[i] == 4]

    @property
    def hca_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.compress_ratios[i] not in (0, 4)]

    # ---- I/O -----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DeepSeekV4Config:
        """Build from the HF ``config.json`` dict; raises :class:`ConfigError` on any problem."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config must be a JSON object, got {type(hf).__name__}")

        def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
            if key not in hf:
                if default is not None:
                    return default
                raise ConfigError(f"config.json: missing required field {key!r}")
            v = hf[key]
            if isinstance(v, bool) and kind is not bool:
                raise ConfigError(f"config.json: field {key!r} must be {_kind(kind)}, got bool")
            if not isinstance(v, kind):
                raise ConfigError(f"config.json: field {key!r} must be {_kind(kind)}, got {v!r}")
            return v

        num = (int, float)
        yarn = _yarn_fields(hf.get("rope_scaling"))
        ratios = get("compress_ratios", list)
        if not all(isinstance(m, int) and not isinstance(m, bool) for m in ratios):
            raise ConfigError(f"config.json: 'compress_ratios' must be a list of integers, got {ratios!r}")
        n_layers = get("num_hidden_layers", int)
        # absent: the MTP blocks are the entries of compress_ratios beyond the main layers
        n_mtp = get("num_nextn_predict_layers", int, max(len(ratios) - n_layers, 0))

        # Fields the reference hard-codes: accept only the values it implements.
        fixed = {
            "num_key_value_heads": 1,
            "n_shared_experts": 1,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": True,
            "topk_method": "noaux_tc",
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
        }
        for key, want in fixed.items():
            if key in hf and hf[key] != want:
                raise ConfigError(f"config.json: field {key!r} must be {want!r} for DeepSeek-V4, got {hf[key]!r}")
        _check_quantization(hf.get("quantization_config"))

        cfg = cls(
            vocab_size=get("vocab_size", int),
            hidden_size=get("hidden_size", int),
            num_hidden_layers=n_layers,
            num_nextn_predict_layers=n_mtp,
            num_attention_heads=get("num_attention_heads", int),
            head_dim=get("head_dim", int),
            qk_rope_head_dim=get("qk_rope_head_dim", int),
            q_lora_rank=get("q_lora_rank", int),
            o_groups=get("o_groups", int),
            o_lora_rank=get("o_lora_rank", int),
            sliding_window=get("sliding_window", int),
            # entries beyond the main layers and MTP blocks are unused, as in the reference (e.g. a re-release's
            # trailing zeros for extra draft layers)
            compress_ratios=tuple(ratios[:n_layers + n_mtp]),
            rope_theta=float(get("rope_theta", num)),
            compress_rope_theta=float(get("compress_rope_theta", num)),
            **yarn,
            max_position_embeddings=get("max_position_embeddings", int),
            index_n_heads=get("index_n_heads", int),
            index_head_dim=get("index_head_dim", int),
            index_topk=get("index_topk", int),
            hc_mult=get("hc_mult", int),
            hc_sinkhorn_iters=get("hc_sinkhorn_iters", int),
            hc_eps=float(get("hc_eps", num)),
            rms_norm_eps=float(get("rms_norm_eps", num)),
            n_routed_experts=get("n_routed_experts", int),
            num_experts_per_tok=get("num_experts_per_tok", int),
            moe_intermediate_size=get("moe_intermediate_size", int),
            routed_scaling_factor=float(get("routed_scaling_factor", num)),
            num_hash_layers=get("num_hash_layers", int),
            swiglu_limit=float(get("swiglu_limit", num)),
            # absent or null: the experts are stored like the other linears (FP8)
            expert_dtype="fp8" if hf.get("expert_dtype") is None else get("expert_dtype", str),
            bos_token_id=_token_id(hf, "bos_token_id", 0),
            eos_token_id=_token_id(hf, "eos_token_id", 1),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> DeepSeekV4Config:
        """Read ``config.json`` (a file or a model directory containing one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json at {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
        return cls.from_hf(hf)

    def validate(self) -> None:
        """Reject inconsistent values with a message naming the field (HF key names)."""
        positive = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "head_dim": self.head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "q_lora_rank": self.q_lora_rank, "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window, "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim, "index_topk": self.index_topk, "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "moe_intermediate_size": self.moe_intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for key, v in positive.items():
            if v <= 0:
                raise ConfigError(f"config.json: field {key!r} must be positive, got {v}")
        for key, v in {"num_nextn_predict_layers": self.num_nextn_predict_layers,
                       "num_hash_layers": self.num_hash_layers,
                       "rope_scaling.original_max_position_embeddings": self.rope_original_max_position}.items():
            if v < 0:
                raise ConfigError(f"config.json: field {key!r} must be >= 0, got {v}")
        for key, v in {"rope_theta": self.rope_theta, "compress_rope_theta": self.compress_rope_theta,
                       "rope_scaling.factor": self.rope_factor, "rms_norm_eps": self.rms_norm_eps,
                       "hc_eps": self.hc_eps, "routed_scaling_factor": self.routed_scaling_factor,
                       "rope_scaling.beta_fast": self.rope_beta_fast,
                       "rope_scaling.beta_slow": self.rope_beta_slow}.items():
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"config.json: field {key!r} must be a positive finite number, got {v}")
        for key, v in {"rope_theta": self.rope_theta, "compress_rope_theta": self.compress_rope_theta}.items():
            if v <= 1:
                raise ConfigError(f"config.json: field {key!r} (a RoPE base) must be > 1, got {v}")
        if not (self.swiglu_limit >= 0 and math.isfinite(self.swiglu_limit)):
            raise ConfigError(f"config.json: field 'swiglu_limit' must be >= 0 (0: no clamp), got {self.swiglu_limit}")
        n_total = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != n_total:
            raise ConfigError(
                f"config.json: 'compress_ratios' has {len(self.compress_ratios)} entries, expected "
                f"num_hidden_layers + num_nextn_predict_layers = {n_total}")
        for i, m in enumerate(self.compress_ratios):
            if m < 0 or (m > 0 and PAGE_SIZE % m != 0):
                raise ConfigError(
                    f"config.json: 'compress_ratios[{i}]' = {m}: must be 0 or a divisor of the {PAGE_SIZE}-token page")
        for k in range(self.num_nextn_predict_layers):
            if self.compress_ratios[self.num_hidden_layers + k] != 0:
                raise ConfigError(
                    f"config.json: 'compress_ratios[{self.num_hidden_layers + k}]' (MTP block {k}) must be 0: "
                    "the MTP block is a sliding-window block")
        r = self.qk_rope_head_dim
        if r % 2:
            raise ConfigError(f"config.json: 'qk_rope_head_dim' must be even, got {r}")
        if self.head_dim <= r or (self.head_dim - r) % 64:
            raise ConfigError(
                f"config.json: 'head_dim' - 'qk_rope_head_dim' = {self.head_dim - r} must be a positive multiple "
                "of 64 (the KV FP8 simulation uses 64-wide blocks)")
        di = self.index_head_dim
        if di < r or di % 32 or di & (di - 1):
            raise ConfigError(
                f"config.json: 'index_head_dim' = {di} must be a power of two, a multiple of 32 and >= "
                "'qk_rope_head_dim' (Hadamard rotation, FP4 blocks of 32, RoPE on its last dims)")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(
                f"config.json: 'num_attention_heads' ({self.num_attention_heads}) must be divisible by "
                f"'o_groups' ({self.o_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"config.json: 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds 'n_routed_experts' "
                f"({self.n_routed_experts})")
        if self.num_hash_layers > n_total:  # layer ids n_layers.. are the MTP blocks: hashed too below this count
            raise ConfigError(
                f"config.json: 'num_hash_layers' ({self.num_hash_layers}) exceeds 'num_hidden_layers' + "
                f"'num_nextn_predict_layers' ({n_total})")
        if self.expert_dtype not in ("fp4", "fp8"):
            raise ConfigError(f"config.json: 'expert_dtype' must be 'fp4' or 'fp8', got {self.expert_dtype!r}")
        if self.expert_dtype == "fp4" and (self.hidden_size % 32 or self.moe_intermediate_size % 32):
            raise ConfigError(
                "config.json: FP4 experts need 'hidden_size' and 'moe_intermediate_size' divisible by 32")

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict with the released key names (inverse of :meth:`from_hf`)."""
        d = asdict(self)
        hf = {
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
            "num_key_value_heads": 1, "n_shared_experts": 1, "norm_topk_prob": True,
            "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "initializer_range": 0.02,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "scale_fmt": "ue8m0", "weight_block_size": [FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK]},
            "rope_scaling": {"type": "yarn", "factor": self.rope_factor,
                             "original_max_position_embeddings": self.rope_original_max_position,
                             "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow},
        }
        if {k: d.pop(k) for k in _NO_YARN} == _NO_YARN:
            hf["rope_scaling"] = None
        d["compress_ratios"] = list(self.compress_ratios)
        hf.update(d)
        return hf


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# rope_* fields of a config without rope_scaling
_NO_YARN = dict(rope_factor=1.0, rope_original_max_position=0, rope_beta_fast=32.0, rope_beta_slow=1.0)


def _yarn_fields(scaling: Any) -> dict[str, Any]:
    """The ``rope_scaling`` object -> the config's rope_* fields. Absent / null = no YaRN (original length 0:
    the compressed layers then use plain RoPE with ``compress_rope_theta``)."""
    if scaling is None:
        return dict(_NO_YARN)
    if not isinstance(scaling, dict):
        raise ConfigError(f"config.json: field 'rope_scaling' must be an object or null, got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"config.json: 'rope_scaling.type' must be 'yarn', got {kind!r}")
    values = {}
    for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        v = scaling.get(k)
        if k not in scaling:
            raise ConfigError(f"config.json: missing field 'rope_scaling.{k}'")
        whole = k == "original_max_position_embeddings"
        if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)):
            raise ConfigError(f"config.json: field 'rope_scaling.{k}' must be {'an integer' if whole else 'a number'}, "
                              f"got {v!r}")
        values[k] = v
    return dict(rope_factor=float(values["factor"]), rope_original_max_position=values["original_max_position_embeddings"],
                rope_beta_fast=float(values["beta_fast"]), rope_beta_slow=float(values["beta_slow"]))


def _check_quantization(quant: Any) -> None:
    """The released FP8 scheme (spec 7) is the only one implemented: e4m3, ue8m0 scales, 128x128 blocks,
    dynamic activation scales."""
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise ConfigError(f"config.json: field 'quantization_config' must be an object, got {quant!r}")
    want = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
            "weight_block_size": [FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK]}
    for key, value in want.items():
        if key in quant and quant[key] != value:
            raise ConfigError(f"config.json: 'quantization_config.{key}' must be {value!r}, got {quant[key]!r}")


def _token_id(hf: dict[str, Any], key: str, default: int) -> int:
    """A special token id: an integer, or a non-empty list of them (the first is kept), or absent / null."""
    v = hf.get(key)
    if v is None:
        return default
    first = v[0] if isinstance(v, list) and v else v
    if isinstance(first, bool) or not isinstance(first, int):
        raise ConfigError(f"config.json: field {key!r} must be an integer or a non-empty list of them, got {v!r}")
    return first


def tiny_config(**overrides: Any) -> DeepSeekV4Config:
    """The spec's T1 "all-mechanisms" test configuration (section 11), with HF-key ``overrides``:
    4 layers [SWA, CSA, HCA, CSA] + an MTP block, d = 256, 4 heads of 128, window 16, top-8 indexer."""
    hf: dict[str, Any] = {
        "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 4, "num_nextn_predict_layers": 1,
        "num_attention_heads": 4, "head_dim": 128, "qk_rope_head_dim": 64, "q_lora_rank": 128, "o_groups": 2,
        "o_lora_rank": 64, "sliding_window": 16, "compress_ratios": [0, 4, 128, 4, 0], "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0, "max_position_embeddings": 512, "index_n_heads": 16,
        "index_head_dim": 64, "index_topk": 8, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "routed_scaling_factor": 1.5, "num_hash_layers": 1, "swiglu_limit": 10.0, "expert_dtype": "fp4",
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1},
    }
    hf.update(overrides)
    return DeepSeekV4Config.from_hf(hf)


def load_config(model_dir: str | Path) -> DeepSeekV4Config:
    """Typed config of a model directory (or a config.json path)."""
    return DeepSeekV4Config.from_file(model_dir)
