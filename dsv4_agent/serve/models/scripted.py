"""Test-only SGLang model whose logits force a scripted completion for a given prompt.

Random weights produce noise, so agent flows (multi-call, parallel calls, a tool loop with reasoning) can't be
tested end to end with a random checkpoint. This model replaces the network, and nothing else: SGLang's
scheduler, radix cache, sampler and grammar backend, our encoding, tokenizer, parsers and the HTTP layer all
run for real. It is selected by `architectures: ["DSV4ScriptedForCausalLM"]` in `config.json`
(`dsv4_agent.serve.testing.build_scripted_model` writes such a folder).

Script file (JSON; path in the env var `DSV4_SCRIPT`, else the config field `script_path`; re-read whenever it
changes on disk, so one running server can serve many tests):

    {"rules": [{"when": "weather in Paris", "reply": "Let me look.</think>\\n\\n<｜DSML｜tool_calls>..."},
               {"when_prompt": "<｜User｜>hi", "reply": "hello</think>Hi!"}],
     "seed": 0}

* A rule matches when `when` occurs in the *latest user turn* of the prompt (the text after the last
  `<｜User｜>`, which also holds folded tool results) and/or `when_prompt` occurs anywhere in the prompt;
  the first matching rule wins.
* `reply` is the raw completion text a V4 model would write after the prompt (reasoning and `</think>` in
  thinking mode, content, a DSML tool block). It is tokenized with special tokens recognised, then EOS is
  appended; once the reply is exhausted the model keeps emitting EOS.
* With no matching rule the model is a seeded random model: noise logits drawn from (seed, position,
  previous token), i.e. a random tiny model whose outputs depend only on the context.

Bookkeeping: the model keeps, per KV-cache slot, the token id written there (its "KV cache" is the token
itself), so the full token sequence of every request is `tokens[req_to_token[row, :seq_len]]`, prefix-cache
hits included. The prompt length of a request row is recorded at its (last) extend.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv4_agent.encoding.tokens import USER

FORCED_LOGIT = 0.0
OTHER_LOGIT = -1.0e4  # exp(-1e4) == 0: forced tokens are sampled with probability 1 at any temperature


class Script:
    """The rules of a script file, re-read when the file changes."""

    def __init__(self, path: str | None):
        self.path = path
        self._mtime: float | None = None
        self.rules: list[dict[str, str]] = []
        self.seed = 0
        self._lock = threading.Lock()

    def refresh(self) -> None:
        if not self.path:
            return
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return
        with self._lock:
            if mtime == self._mtime:
                return
            data = json.loads(Path(self.path).read_text(encoding="utf-8"))
            self.rules = list(data.get("rules", []))
            self.seed = int(data.get("seed", 0))
            self._mtime = mtime

    def reply_for(self, prompt: str) -> str | None:
        latest_user = prompt.rsplit(USER, 1)[-1]
        for rule in self.rules:
            when, when_prompt = rule.get("when"), rule.get("when_prompt")
            if when is None and when_prompt is None:
                continue
            if (when is None or when in latest_user) and (when_prompt is None or when_prompt in prompt):
                return rule["reply"]
        return None


class DSV4ScriptedForCausalLM(nn.Module):
    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__()
        from tokenizers import Tokenizer

        self.config = config
        self.vocab_size = int(config.vocab_size)
        self.eos_id = int(config.eos_token_id)
        model_dir = Path(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""))
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        script_path = os.environ.get("DSV4_SCRIPT") or getattr(config, "script_path", None)
        self.script = Script(script_path)
        # SGLang needs at least one parameter (dtype/device probing); it carries no information.
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.token_at_slot = torch.zeros(0, dtype=torch.long)  # [num KV slots] token id written there
        self.prompt_len: dict[int, int] = {}  # request row -> prompt length at its last extend
        self.plan: dict[int, list[int] | None] = {}  # request row -> forced completion ids (None: random)

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def _remember(self, slots: torch.Tensor, ids: torch.Tensor) -> None:
        need = int(slots.max()) + 1 if slots.numel() else 0
        if need > self.token_at_slot.numel():
            grown = torch.zeros(max(need, 2 * self.token_at_slot.numel()), dtype=torch.long)
            grown[: self.token_at_slot.numel()] = self.token_at_slot
            self.token_at_slot = grown
        self.token_at_slot[slots.long().cpu()] = ids.long().cpu()

    def _plan(self, prompt_ids: list[int]) -> list[int] | None:
        self.script.refresh()
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        reply = self.script.reply_for(prompt)
        if reply is None:
            return None
        return self.tokenizer.encode(reply, add_special_tokens=False).ids + [self.eos_id]

    def _next_logits(self, row: int, tokens: list[int]) -> torch.Tensor:
        logits = torch.full((self.vocab_size,), OTHER_LOGIT)
        plan = self.plan.get(row)
        done = len(tokens) - self.prompt_len.get(row, len(tokens))
        if plan is not None:
            logits[plan[done] if done < len(plan) else self.eos_id] = FORCED_LOGIT
            return logits
        g = torch.Generator().manual_seed(hash((self.script.seed, len(tokens), tokens[-1])) & 0x7FFFFFFF)
        return torch.randn(self.vocab_size, generator=g)

    # ---- SGLang model interface -----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any, **_: Any) -> Any:
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput
        from sglang.srt.model_executor.forward_context import get_req_to_token_pool

        mode = forward_batch.forward_mode
        if mode.is_idle() or forward_batch.batch_size == 0:
            return LogitsProcessorOutput(next_token_logits=torch.zeros(0, self.vocab_size))
        self._remember(forward_batch.out_cache_loc, input_ids)
        req_to_token = get_req_to_token_pool().req_to_token
        rows = forward_batch.req_pool_indices.tolist()
        seq_lens = forward_batch.seq_lens.tolist()
        out = []
        for row, seq_len in zip(rows, seq_lens, strict=True):
            tokens = self.token_at_slot[req_to_token[row, :seq_len].long().cpu()].tolist()
            if mode.is_extend():
                self.prompt_len[row] = seq_len
                self.plan[row] = self._plan(tokens)
            out.append(self._next_logits(row, tokens))
        logits = torch.stack(out).to(device=input_ids.device, dtype=torch.float32)
        return LogitsProcessorOutput(next_token_logits=logits)

    def load_weights(self, weights: Any) -> None:
        for _ in weights:  # the checkpoint holds one placeholder tensor
            pass


EntryClass = DSV4ScriptedForCausalLM
