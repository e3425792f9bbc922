"""Agent-session benchmark (issue 6): multi-turn tool-using sessions replayed against running servers.

Each session is a system prompt with tools and a user task (rendered by ``dsv4_agent.encoding``), then turns
of: the model generates an assistant turn (a tool call's worth of tokens, greedy), the client sends back
exactly the generated ids + the end-of-sentence token + a tool result of realistic size (real source files,
command output, search hits) and asks for the next turn. Several sessions run interleaved (one thread
each). Per turn it records prompt tokens, cached tokens (SGLang's ``meta_info.cached_tokens``), computed
tokens (prompt - cached), tokens of the previous turn's prompt + completion that were recomputed, and the
time to first token (streaming). The same sessions run against a second server with the radix cache off,
side by side.

    python benchmarks/agent_session.py --launch            # start both servers (embedded tiny model), run
    python benchmarks/agent_session.py --url http://127.0.0.1:30000 [--url-off http://...]

With ``--launch`` the servers are ``dsv4-agent serve`` with the given ``--dtype`` (default bfloat16: the
released numerics and the packed pool). The KV memory per token measured from a pool instance of the
served config is reported against ``kv_bytes_per_token``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from dsv4_agent.encoding.encoder import encode_messages

TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": list(props)}}}
    for name, desc, props in [
        ("bash", "Run a shell command in the repository and return stdout and stderr.",
         {"command": {"type": "string", "description": "The command line."},
          "timeout": {"type": "integer", "description": "Seconds before the command is killed."}}),
        ("read_file", "Read a text file; returns its lines with line numbers.",
         {"path": {"type": "string"}, "start_line": {"type": "integer"}, "end_line": {"type": "integer"}}),
        ("write_file", "Create or overwrite a file with the given content.",
         {"path": {"type": "string"}, "content": {"type": "string"}}),
        ("search", "Search the repository for a regular expression; returns matching lines.",
         {"pattern": {"type": "string"}, "path": {"type": "string"}, "max_results": {"type": "integer"}}),
        ("list_dir", "List a directory (names, sizes, kinds).", {"path": {"type": "string"}}),
        ("apply_patch", "Apply a unified diff to the working tree.", {"patch": {"type": "string"}}),
    ]]
SYSTEM = ("You are a software engineering agent working in a git repository. Use the tools to inspect the code, "
          "run the tests and make minimal, correct changes. Think about the root cause before editing. After every "
          "change run the relevant tests. Never invent file contents; read files before editing them. When the task "
          "is done, reply with a short summary of the change and the evidence that it works.")
TASKS = ["The function that parses configuration files crashes on empty sections; find the bug and fix it.",
         "Tests in the networking module are flaky under load; find the race and make them deterministic.",
         "Add a --dry-run flag to the command line tool and cover it with tests.",
         "The CSV export writes dates in the local timezone; make it write UTC and update the tests."]


def _sources() -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f.read_text(errors="replace") for f in files[:200]]


@dataclass
class Turn:
    session: int
    turn: int
    prompt: int
    cached: int
    computed: int
    recomputed_prev: int  # tokens of the previous turn's prompt + completion computed again
    ttft: float


class Session:
    """Token-level replay of one agent session (exact generated ids are sent back)."""

    def __init__(self, idx: int, tokenizer, sources: list[str], seed: int, result_tokens: int):
        self.idx, self.tok, self.rng = idx, tokenizer, random.Random(seed)
        self.sources, self.result_tokens = sources, result_tokens
        msgs = [{"role": "system", "content": SYSTEM, "tools": TOOLS},
                {"role": "user", "content": TASKS[idx % len(TASKS)]}]
        self.ids = self._encode(encode_messages(msgs, "chat"))
        self.eos = self._encode("<｜end▁of▁sentence｜>")

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def tool_result(self) -> list[int]:
        """`<｜User｜><tool_result>...</tool_result><｜Assistant｜></think>` with output of a realistic size."""
        kind = self.rng.choice(["read", "bash", "search"])
        src = self.rng.choice(self.sources)
        budget = int(self.result_tokens * {"read": 2.0, "bash": 0.7, "search": 0.5}[kind] * self.rng.uniform(0.5, 1.5))
        start = self.rng.randrange(max(1, len(src) - 8 * budget))
        text = src[start:start + 4 * budget]
        if kind == "bash":
            text = "$ python -m pytest -q\n" + text
        elif kind == "search":
            text = "\n".join(f"src/mod{self.rng.randrange(40)}.py:{i}: {line}" for i, line in
                             enumerate(text.splitlines()[:40]))
        body = self._encode(text)[:budget]
        return (self._encode("<｜User｜><tool_result>") + body + self._encode("</tool_result><｜Assistant｜></think>"))


def generate_stream(client: httpx.Client, url: str, ids: list[int], new_tokens: int) -> tuple[list[int], int, float]:
    """(output ids, cached tokens, seconds to the first streamed chunk)."""
    t0 = time.perf_counter()
    ttft, last = None, None
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}}
    with client.stream("POST", url + "/generate", json=payload, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = json.loads(line[5:])
    return last["output_ids"], last["meta_info"]["cached_tokens"], ttft


def run_session(url: str, session: Session, turns: int, new_tokens: int, max_len: int) -> list[Turn]:
    out, prev_total = [], 0
    with httpx.Client() as client:
        for k in range(turns):
            if len(session.ids) + new_tokens + 1 > max_len:
                break
            gen, cached, ttft = generate_stream(client, url, session.ids, new_tokens)
            prompt = len(session.ids)
            out.append(Turn(session.idx, k, prompt, cached, prompt - cached, max(0, prev_total - cached), ttft))
            prev_total = prompt + len(gen) - 1  # the last generated token was never fed to the model
            session.ids = session.ids + gen + session.eos + session.tool_result()
    return out


def replay(url: str, args, tokenizer) -> list[Turn]:
    sources = _sources()
    sessions = [Session(i, tokenizer, sources, seed=args.seed + i, result_tokens=args.result_tokens)
                for i in range(args.sessions)]
    with cf.ThreadPoolExecutor(args.sessions) as ex:
        runs = list(ex.map(lambda s: run_session(url, s, args.turns, args.new_tokens, args.max_len), sessions))
    return [t for run in runs for t in run]


def table(on: list[Turn], off: list[Turn] | None) -> str:
    head = "| session | turn | prompt | cached | computed | recomputed prev | TTFT s |"
    sep = "|---|---|---|---|---|---|---|"
    if off is not None:
        head += " cached (off) | computed (off) | TTFT s (off) |"
        sep += "---|---|---|"
    rows = [head, sep]
    by_key = {(t.session, t.turn): t for t in off or []}
    for t in sorted(on, key=lambda t: (t.session, t.turn)):
        row = f"| {t.session} | {t.turn + 1} | {t.prompt} | {t.cached} | {t.computed} | {t.recomputed_prev} | {t.ttft:.3f} |"
        if off is not None and (t.session, t.turn) in by_key:
            o = by_key[(t.session, t.turn)]
            row += f" {o.cached} | {o.computed} | {o.ttft:.3f} |"
        rows.append(row)
    return "\n".join(rows)


def summary(name: str, turns: list[Turn]) -> str:
    later = [t for t in turns if t.turn > 0]
    if not later:
        return f"{name}: no turns >= 2"
    hit = sum(t.cached for t in later) / sum(t.prompt for t in later)
    worst = min(t.cached / t.prompt for t in later)
    return (f"{name}: turns>=2: {len(later)}, cached share {hit:.2%} (worst turn {worst:.2%}), "
            f"recomputed tokens of previous turns {sum(t.recomputed_prev for t in later)}, "
            f"mean TTFT {statistics.mean(t.ttft for t in later):.3f} s (turn 1: "
            f"{statistics.mean(t.ttft for t in turns if t.turn == 0):.3f} s)")


def pool_bytes(model_dir: Path, dtype: str) -> str:
    from dsv4_agent.model import kv_bytes_per_token, load_config
    from dsv4_agent.serve.v4pool import V4KVPool

    cfg = load_config(model_dir)
    pool = V4KVPool(cfg, 16 * 128, 128, packed=dtype != "float32")
    ref = kv_bytes_per_token(cfg, cfg.max_position_embeddings)
    return (f"KV pool bytes per cached token ({'packed' if pool.packed else 'fp32'} pages, {model_dir.name}): "
            f"{pool.bytes_per_token:.2f} B vs kv_bytes_per_token(max context) {ref:.2f} B "
            f"({(pool.bytes_per_token / ref - 1):+.2%}); tail per request / resume state {pool.tail_bytes / 2**20:.2f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="server with the radix cache on")
    p.add_argument("--url-off", help="server with --disable-radix-cache (side by side)")
    p.add_argument("--launch", action="store_true", help="start both servers with `dsv4-agent serve`")
    p.add_argument("--model-path", help="with --launch: checkpoint (default: the embedded tiny model)")
    p.add_argument("--dtype", default="bfloat16", help="with --launch: float32 or bfloat16")
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per assistant turn")
    p.add_argument("--result-tokens", type=int, default=160, help="mean tool-result size in tokens")
    p.add_argument("--max-len", type=int, default=8000, help="stop a session before its prompt exceeds this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown report here too")
    args = p.parse_args(argv)

    from tokenizers import Tokenizer

    from dsv4_agent.serve.embedded import ensure_tiny_model

    model_dir = Path(args.model_path) if args.model_path else ensure_tiny_model()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    servers = []
    if args.launch:
        from dsv4_agent.serve.testing import ServerProcess

        common = ["--model-path", str(model_dir), "--dtype", args.dtype, "--max-total-tokens", "65536",
                  "--max-running-requests", str(max(4, args.sessions)), "--enable-cache-report"]
        servers = [ServerProcess(common, startup_timeout=600),
                   ServerProcess([*common, "--disable-radix-cache"], startup_timeout=600)]
        for s in servers:
            s.start()
        args.url, args.url_off = servers[0].base_url, servers[1].base_url
    if not args.url:
        p.error("give --url (and optionally --url-off) or --launch")
    try:
        on = replay(args.url, args, tokenizer)
        off = replay(args.url_off, args, tokenizer) if args.url_off else None
    finally:
        for s in servers:
            s.stop()
    report = "\n".join([
        f"sessions={args.sessions} turns={args.turns} new_tokens={args.new_tokens} "
        f"result_tokens~{args.result_tokens} dtype={args.dtype} model={model_dir.name}",
        "", table(on, off), "", summary("cache on", on)]
        + ([summary("cache off", off)] if off else []) + [pool_bytes(model_dir, args.dtype)])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
