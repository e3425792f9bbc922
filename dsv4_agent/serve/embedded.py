"""The embedded default model: a tiny DeepSeek-V4 checkpoint in the released format plus a small tokenizer.

`dsv4-agent serve` with no `--model-path` serves this, so the server starts anywhere with nothing downloaded.
The tokenizer is a byte-level BPE trained locally on Python standard-library sources, with every V4 marker
(spec section 1: BOS, EOS, `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`, `｜DSML｜`, the task
tokens ...) as one added special token; BOS and EOS get ids 0 and 1 as in the release. The weights are
seeded random (the model helper's `save_random_checkpoint`). Everything is built once into a cache folder
whose name carries a hash of the recipe, so a changed recipe builds a fresh folder.

The default context is 8192 positions (fast CI). Long-session benchmarks need more: `max_positions` (or the
environment variable `DSV4_AGENT_TINY_MAX_POSITIONS`, which `dsv4-agent serve` without `--model-path` then
honours) builds the same model with another `max_position_embeddings` into its own folder; the weights, the
tokenizer and the released checkpoint format are unchanged (no weight depends on the context length).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dsv4_agent.encoding.tokens import BOS, EOS, SPECIAL_TOKENS

RECIPE_VERSION = 1
TOKENIZER_VOCAB = 2048  # BPE vocabulary incl. special tokens; the model's vocab_size equals it
TRAINING_BYTES = 2_000_000  # of stdlib sources: enough for a sensible BPE, trained in a few seconds
SEED = 1234

# Tiny V4 (architecture spec section 11, T1-like): every mechanism present, seconds to build, MBs on disk.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "vocab_size": TOKENIZER_VOCAB, "hidden_size": 256, "num_hidden_layers": 4, "num_nextn_predict_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128, "qk_rope_head_dim": 64,
    "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 64, "sliding_window": 16,
    "compress_ratios": [0, 4, 128, 4, 0], "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 8192, "index_n_heads": 16, "index_head_dim": 64, "index_topk": 8,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "routed_scaling_factor": 1.5,
    "num_hash_layers": 1, "swiglu_limit": 10.0, "expert_dtype": "fp4", "bos_token_id": 0, "eos_token_id": 1,
}

MAX_POSITIONS_ENV = "DSV4_AGENT_TINY_MAX_POSITIONS"

# The released generation_config.json: recommended sampling T=1.0, top_p=1.0.
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0}

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"[dsv4-agent] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("DSV4_AGENT_CACHE", Path.home() / ".cache" / "dsv4-agent"))


def tiny_config(max_positions: int | None = None) -> dict[str, Any]:
    """The embedded model's config.json: `TINY_CONFIG` with `max_position_embeddings` = `max_positions`, else
    $DSV4_AGENT_TINY_MAX_POSITIONS, else the default (8192)."""
    if max_positions is None and os.environ.get(MAX_POSITIONS_ENV):
        try:
            max_positions = int(os.environ[MAX_POSITIONS_ENV])
        except ValueError:
            raise ValueError(f"{MAX_POSITIONS_ENV}: expected an integer, got {os.environ[MAX_POSITIONS_ENV]!r}") from None
    if max_positions is None:
        return TINY_CONFIG
    if max_positions < 128:  # at least one compressed page (compress ratio 128)
        raise ValueError(f"max_positions ({MAX_POSITIONS_ENV}): must be at least 128, got {max_positions}")
    return {**TINY_CONFIG, "max_position_embeddings": max_positions}


def recipe_key(config: dict[str, Any] = TINY_CONFIG) -> str:
    recipe = {"v": RECIPE_VERSION, "config": config, "vocab": TOKENIZER_VOCAB, "bytes": TRAINING_BYTES,
              "seed": SEED, "special": SPECIAL_TOKENS, "gen": GENERATION_CONFIG}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _training_text() -> Iterator[str]:
    """The first TRAINING_BYTES of the standard library's .py files in sorted order (deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget = TRAINING_BYTES
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")[:budget]
        budget -= len(text)
        yield text
        if budget <= 0:
            return


def build_tokenizer(out_dir: Path, max_length: int = TINY_CONFIG["max_position_embeddings"]) -> int:
    """Train the byte-level BPE; write tokenizer.json + tokenizer_config.json. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [BOS, EOS, *(t for t in SPECIAL_TOKENS if t not in (BOS, EOS))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer=trainer)
    for i, t in enumerate(specials[:2]):  # the release's BOS = 0, EOS = 1
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.save(str(out_dir / "tokenizer.json"))
    token = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "bos_token": {**token, "content": BOS},
        "eos_token": {**token, "content": EOS}, "pad_token": {**token, "content": EOS},
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": max_length,
        "unk_token": None, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2, ensure_ascii=False))
    return tok.get_vocab_size()


def ensure_tiny_model(progress: Progress = _stderr, max_positions: int | None = None) -> Path:
    """The cached tiny V4 model folder, built on first use (atomic: built aside, then renamed).
    `max_positions`: its context length (see `tiny_config`)."""
    config = tiny_config(max_positions)
    target = cache_root() / f"tiny-v4-{recipe_key(config)}"
    if (target / "config.json").is_file():
        return target
    from dsv4_agent.model import DeepSeekV4Config, save_random_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        progress(f"building the embedded tiny DeepSeek-V4 model in {target} (once)")
        progress(f"  1/3 training a {TOKENIZER_VOCAB}-token BPE tokenizer on Python stdlib sources")
        vocab = build_tokenizer(work, config["max_position_embeddings"])
        if vocab != config["vocab_size"]:
            raise RuntimeError(f"tokenizer has {vocab} tokens, the config expects {config['vocab_size']}")
        progress("  2/3 writing seeded random weights in the released FP8/FP4 checkpoint format")
        save_random_checkpoint(DeepSeekV4Config.from_hf(config), work, SEED)
        progress("  3/3 writing generation_config.json")
        (work / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
        try:
            work.rename(target)
        except OSError:  # a concurrent build won the race; use its folder
            if not (target / "config.json").is_file():
                raise
        progress("  done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def ensure_tokenizer(progress: Progress = _stderr) -> Path:
    """A cached folder with just the tiny tokenizer (tokenizer.json, tokenizer_config.json)."""
    target = cache_root() / f"tokenizer-{recipe_key()}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        progress(f"training the tiny V4 tokenizer into {target} (once)")
        build_tokenizer(work)
        try:
            work.rename(target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
