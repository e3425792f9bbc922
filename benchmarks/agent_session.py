"""Agent-session benchmark (issue 6): multi-turn tool-using sessions replayed against a server, radix cache on
and off, side by side.

Each session is a system prompt with tool schemas and a user task (rendered by ``dsv4_agent.encoding``), then
turns of: the model generates an assistant turn (a tool call's worth of tokens, greedy), the client sends back
exactly the generated ids + the end-of-sentence token + a tool result (real source files, command output,
search hits) and asks for the next turn. Several sessions run interleaved (one thread each). Per turn it
records prompt tokens, new tokens (what the turn appended: EOS + tool result), cached tokens (SGLang's
``meta_info.cached_tokens``), computed tokens (prompt - cached), tokens of the previous turn's prompt +
completion that were recomputed, and the time to first token (streaming).

Session profile (defaults), after what agent clients send (``../shared/notes/ecosystem.md`` section 1 and
the issue): SWE-agent / OpenHands / mini-swe-agent send a system prompt with instructions and tool schemas of
several thousand tokens on every turn (``--system-tokens 4000``), one tool call per assistant turn
(``--new-tokens 48``), tool results of 100-2000 tokens (``--result-min/--result-max``, log-uniform: many small
outputs, a few whole files), sessions of 20-50 turns (``--turns 30``). Token counts are in the embedded tiny
model's 2048-token BPE (more tokens per word than V4's own vocabulary).

The cached share of a turn is bounded by the workload: (prompt - new tokens) / prompt, since the tool result
it appends was never seen. The report gives the aggregate over turns >= 2, the share at each turn index, and the
share by prompt size (the way published coding-agent traces report their reuse: it grows with the context,
since the new tokens of a turn do not), each beside its bound and as a share of the tokens the server had seen.

    python benchmarks/agent_session.py --launch        # both servers, one after the other, embedded tiny model
    python benchmarks/agent_session.py --launch --turns 150 --max-positions 131072 --max-total-tokens 400000
                                                       # long sessions: prompts grow past 100k tokens
    python benchmarks/agent_session.py --url http://127.0.0.1:30000 [--url-off http://...]
    python benchmarks/agent_session.py --from-json run.json   # re-render an earlier run saved with --json

With ``--launch`` the servers are ``dsv4-agent serve`` on the embedded tiny V4 built with ``--max-positions``
(default 65536; the CI default model has 8192) and ``--dtype`` (default bfloat16: the released numerics and the
packed pool); the cache-on server runs first, then the cache-off one (never both at once). The cache-off
side replays only the first ``--off-sessions`` sessions for ``--off-turns`` turns (recomputing whole prompts
on CPU is slow); those turns are identical on both sides (greedy outputs are exact with the cache on). The KV
memory per token measured from a pool instance of the served config is reported against
``kv_bytes_per_token``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from dsv4_agent.encoding.encoder import encode_messages


def _tool(name: str, desc: str, props: dict, required: list[str] | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": list(props) if required is None else required}}}


# Tools in the style of SWE-agent / OpenHands: few tools, long descriptions (the schemas alone are ~2k tokens).
TOOLS = [
    _tool("bash", "Execute a bash command in the terminal of the sandbox.\n* Long running commands: for commands "
          "that may run indefinitely, run them in the background and redirect the output to a file, e.g. "
          "`python3 app.py > server.log 2>&1 &`.\n* Interactive commands: if a command returns exit code -1, the "
          "process is still running; send empty input to read more output, text to answer it, or C-c to stop it."
          "\n* Timeout: a command that produces no output for 120 seconds is interrupted; pass a larger timeout for "
          "test suites and builds.\n* Output longer than 30000 characters is truncated in the middle; page "
          "through large outputs with head, tail or grep instead of printing them whole.\n* One command at a time: "
          "chain commands with && or ; instead of sending several calls.",
          {"command": {"type": "string", "description": "The bash command to execute. Can be empty to view more "
                       "output of the running command, or C-c to interrupt it."},
           "is_input": {"type": "boolean", "description": "Whether the command is input to the running process."},
           "timeout": {"type": "integer", "description": "Seconds without output before the command is killed."}},
          ["command"]),
    _tool("str_replace_editor", "Custom editing tool for viewing, creating and editing files.\n* State is "
          "persistent across command calls and discussions with the user.\n* If `path` is a file, `view` displays "
          "the result of applying `cat -n`. If `path` is a directory, `view` lists non-hidden files and "
          "directories up to 2 levels deep.\n* The `create` command cannot be used if the specified `path` already "
          "exists as a file.\n* If a `command` generates a long output, it will be truncated and marked with "
          "<response clipped>.\n* The `undo_edit` command reverts the last edit made to the file at `path`.\n"
          "Notes for using the `str_replace` command:\n* The `old_str` parameter should match EXACTLY one or more "
          "consecutive lines from the original file. Be mindful of whitespaces!\n* If the `old_str` parameter is "
          "not unique in the file, the replacement will not be performed. Make sure to include enough context in "
          "`old_str` to make it unique.\n* The `new_str` parameter should contain the edited lines that should "
          "replace the `old_str`.",
          {"command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"],
                       "description": "The command to run."},
           "path": {"type": "string", "description": "Absolute path to file or directory, e.g. `/repo/file.py`."},
           "file_text": {"type": "string", "description": "Required for `create`: the content of the file."},
           "old_str": {"type": "string", "description": "Required for `str_replace`: the string to replace."},
           "new_str": {"type": "string", "description": "For `str_replace` and `insert`: the new string."},
           "insert_line": {"type": "integer", "description": "Required for `insert`: insert after this line."},
           "view_range": {"type": "array", "items": {"type": "integer"}, "description": "Optional for `view` of "
                          "a file: the line range to show, e.g. [11, 12]; [start, -1] shows all lines from start."}},
          ["command", "path"]),
    _tool("search", "Search the repository for a regular expression (ripgrep syntax) and return matching lines "
          "with file names and line numbers. Use it to find definitions, call sites and tests before reading "
          "whole files. Results are capped; narrow the pattern or the path when the cap is reached.",
          {"pattern": {"type": "string", "description": "The regular expression."},
           "path": {"type": "string", "description": "Directory or file to search (default: the repository)."},
           "include": {"type": "string", "description": "Glob of files to include, e.g. `*.py`."},
           "max_results": {"type": "integer", "description": "Maximum number of matching lines."}},
          ["pattern"]),
    _tool("find_file", "Find files whose name matches a glob pattern in a directory tree.",
          {"file_name": {"type": "string"}, "dir": {"type": "string"}}, ["file_name"]),
    _tool("think", "Use the tool to think about something. It will not obtain new information or make any "
          "changes to the repository, but just log the thought. Use it when complex reasoning or brainstorming "
          "is needed, for example to list possible root causes of a bug before testing them, or to plan a "
          "refactoring across several files.",
          {"thought": {"type": "string", "description": "The thought to log."}}),
    _tool("finish", "Signals the completion of the current task. Call it once the change is done and verified; "
          "the message is shown to the user.",
          {"message": {"type": "string", "description": "Final message to send to the user."},
           "task_completed": {"type": "string", "enum": ["true", "false", "partial"]}}),
]
SYSTEM = ("You are a software engineering agent working in a git repository checked out at /repo. You are "
          "given a task by the user and tools to inspect and change the code. Work step by step.\n\n"
          "<ROLE>Your primary role is to solve the task with minimal, correct changes. If the user asks a "
          "question, like \"why is X happening\", do not try to fix the problem; answer the question.</ROLE>\n\n"
          "<EFFICIENCY>Each action is expensive: combine several shell commands into one when you can, use "
          "search instead of reading whole files, and avoid repeating commands whose output you already have."
          "</EFFICIENCY>\n\n<FILE_SYSTEM_GUIDELINES>Read a file before editing it. Never invent file contents. "
          "Edit files in place instead of creating new versions of them; do not leave backup files behind."
          "</FILE_SYSTEM_GUIDELINES>\n\n<PROBLEM_SOLVING_WORKFLOW>1. EXPLORATION: explore the relevant files "
          "and understand the context. 2. ANALYSIS: consider multiple approaches and choose the most promising "
          "one. 3. TESTING: for bug fixes, write a test that reproduces the bug first. 4. IMPLEMENTATION: make "
          "focused, minimal changes. 5. VERIFICATION: run the tests, including the ones you wrote, and make sure "
          "nothing else broke.</PROBLEM_SOLVING_WORKFLOW>\n\n<TROUBLESHOOTING>If you have tried three times "
          "to solve an issue without success, step back, list five to seven possible sources of the problem, "
          "assess their likelihood and address the most likely one.</TROUBLESHOOTING>\n\n"
          "The repository contains the following modules (path: summary):\n")
TASKS = ["The function that parses configuration files crashes on empty sections; find the bug and fix it.",
         "Tests in the networking module are flaky under load; find the race and make them deterministic.",
         "Add a --dry-run flag to the command line tool and cover it with tests.",
         "The CSV export writes dates in the local timezone; make it write UTC and update the tests."]


def _repo_map() -> list[str]:
    """`path: first docstring line` of the stdlib modules: the repository overview agents put in the prompt."""
    lines = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        doc = f.read_text(errors="replace").lstrip().lstrip("rRbBuU")
        first = doc[3:].strip().splitlines()[0].strip(" \"'") if doc[:3] in ('"""', "'''") and doc[3:].strip() else ""
        lines.append(f"src/{f.stem}.py: {first}" if first else f"src/{f.stem}.py")
    return lines


def system_prompt(tokenizer, target_tokens: int) -> str:
    """SYSTEM + as much of the repository overview as makes the system message with TOOLS ~target_tokens."""
    base = len(tokenizer.encode(encode_messages([{"role": "system", "content": SYSTEM, "tools": TOOLS}], "chat"),
                                add_special_tokens=False).ids)
    text, used = SYSTEM, base
    for line in _repo_map():
        cost = len(tokenizer.encode(line + "\n", add_special_tokens=False).ids)
        if used + cost > target_tokens:
            break
        text, used = text + line + "\n", used + cost
    return text


def _sources() -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f.read_text(errors="replace") for f in files[:200]]


@dataclass
class Turn:
    session: int
    turn: int
    prompt: int
    new: int  # tokens this turn appended that the server never saw (EOS + tool result); 0 on turn 1
    cached: int
    computed: int
    recomputed_prev: int  # tokens of the previous turn's prompt + completion computed again
    ttft: float


class Session:
    """Token-level replay of one agent session (exact generated ids are sent back)."""

    def __init__(self, idx: int, tokenizer, sources: list[str], system: str, seed: int, result_range: tuple[int, int]):
        self.idx, self.tok, self.rng = idx, tokenizer, random.Random(seed)
        self.sources, self.result_range = sources, result_range
        msgs = [{"role": "system", "content": system, "tools": TOOLS},
                {"role": "user", "content": TASKS[idx % len(TASKS)]}]
        self.ids = self._encode(encode_messages(msgs, "chat"))
        self.eos = self._encode("<｜end▁of▁sentence｜>")

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def tool_result(self) -> list[int]:
        """`<｜User｜><tool_result>...</tool_result><｜Assistant｜></think>` around a file view, test output or
        search hits of a log-uniform size in the result range."""
        lo, hi = self.result_range
        budget = round(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))
        kind = self.rng.choice(["read", "bash", "search"])
        text = ""
        while len(self._encode(text)) < budget:  # sources are concatenated until the budget is reached
            src = self.rng.choice(self.sources)
            start = self.rng.randrange(max(1, len(src) - 4 * budget))
            chunk = src[start:start + 4 * budget]
            if kind == "search":
                chunk = "\n".join(f"src/mod{self.rng.randrange(40)}.py:{i}: {line}" for i, line in
                                  enumerate(chunk.splitlines()[:60]))
            text += chunk + "\n"
        if kind == "bash":
            text = "$ python -m pytest -q tests/\n" + text
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
    out, prev_total, appended = [], 0, 0
    with httpx.Client() as client:
        for k in range(turns):
            if len(session.ids) + new_tokens + 1 > max_len:
                break
            gen, cached, ttft = generate_stream(client, url, session.ids, new_tokens)
            prompt = len(session.ids)
            out.append(Turn(session.idx, k, prompt, appended, cached, prompt - cached, max(0, prev_total - cached), ttft))
            print(f"{url} session {session.idx} turn {k + 1}: prompt {prompt} cached {cached} ttft {ttft:.2f} s",
                  file=sys.stderr, flush=True)
            prev_total = prompt + len(gen) - 1  # the last generated token was never fed to the model
            result = session.tool_result()
            appended = len(session.eos) + len(result) + 1  # + the last generated token, fed in the next turn
            session.ids = session.ids + gen + session.eos + result
    return out


def replay(url: str, args, tokenizer, sessions: int, turns: int) -> list[Turn]:
    sources = _sources()
    system = system_prompt(tokenizer, args.system_tokens)
    runs = [Session(i, tokenizer, sources, system, seed=args.seed + i, result_range=(args.result_min, args.result_max))
            for i in range(sessions)]
    with cf.ThreadPoolExecutor(sessions) as ex:
        done = list(ex.map(lambda s: run_session(url, s, turns, args.new_tokens, args.max_len), runs))
    return [t for run in done for t in run]


def table(on: list[Turn], off: list[Turn] | None) -> str:
    head = "| session | turn | prompt | new | cached | computed | recomputed prev | TTFT s |"
    sep = "|---|---|---|---|---|---|---|---|"
    if off is not None:
        head += " cached (off) | computed (off) | TTFT s (off) |"
        sep += "---|---|---|"
    rows = [head, sep]
    by_key = {(t.session, t.turn): t for t in off or []}
    for t in sorted(on, key=lambda t: (t.session, t.turn)):
        row = (f"| {t.session} | {t.turn + 1} | {t.prompt} | {t.new} | {t.cached} | {t.computed} | "
               f"{t.recomputed_prev} | {t.ttft:.3f} |")
        if off is not None:
            o = by_key.get((t.session, t.turn))
            row += f" {o.cached} | {o.computed} | {o.ttft:.3f} |" if o else " | | |"
        rows.append(row)
    return "\n".join(rows)


def by_turn(on: list[Turn], off: list[Turn] | None) -> str:
    """Per turn index over the sessions: prompt, cached share, its bound (prompt - new) / prompt, TTFT."""
    rows = ["| turn | sessions | mean prompt | cached share | bound (prompt-new)/prompt | min cached share | "
            "mean TTFT s | mean TTFT s (off) |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted({t.turn for t in on}):
        ts = [t for t in on if t.turn == k]
        offs = [t for t in off or [] if t.turn == k]
        share = sum(t.cached for t in ts) / sum(t.prompt for t in ts)
        bound = sum(t.prompt - t.new for t in ts) / sum(t.prompt for t in ts)
        ttft_off = f"{statistics.mean(t.ttft for t in offs):.3f}" if offs else ""
        rows.append(f"| {k + 1} | {len(ts)} | {statistics.mean(t.prompt for t in ts):.0f} | {share:.2%} | "
                    f"{bound:.2%} | {min(t.cached / t.prompt for t in ts):.2%} | "
                    f"{statistics.mean(t.ttft for t in ts):.3f} | {ttft_off} |")
    return "\n".join(rows)


BANDS = [(0, 5_000), (5_000, 20_000), (20_000, 50_000), (50_000, 10**9)]


def by_context(on: list[Turn]) -> str:
    """Turns >= 2 by prompt size: published coding-agent traces report their reuse by context size the same way
    (RESULTS.md), since the cached share of a turn is bounded by new tokens / prompt."""
    rows = ["| prompt tokens | turns | prompt tokens (sum) | cached share | bound (prompt-new)/prompt | "
            "share of seen tokens cached |", "|---|---|---|---|---|---|"]
    for lo, hi in BANDS:
        ts = [t for t in on if t.turn > 0 and lo <= t.prompt < hi]
        if ts:
            total, seen = sum(t.prompt for t in ts), sum(t.prompt - t.new for t in ts)
            band = f">= {lo // 1000}k" if hi == 10**9 else f"{lo // 1000}k-{hi // 1000}k"
            rows.append(f"| {band} | {len(ts)} | {total} | {sum(t.cached for t in ts) / total:.2%} | "
                        f"{seen / total:.2%} | {sum(t.cached for t in ts) / seen:.2%} |")
    return "\n".join(rows)


def summary(name: str, turns: list[Turn]) -> str:
    later = [t for t in turns if t.turn > 0]
    if not later:
        return f"{name}: no turns >= 2"
    hit = sum(t.cached for t in later) / sum(t.prompt for t in later)
    seen = sum(t.prompt - t.new for t in later)
    worst = min(later, key=lambda t: t.cached / t.prompt)
    return (f"{name}: turns>=2: {len(later)}, prompt tokens {sum(t.prompt for t in later)}, cached share {hit:.2%} "
            f"(bound {seen / sum(t.prompt for t in later):.2%}; of the tokens the server had seen "
            f"{sum(t.cached for t in later) / seen:.2%}; worst turn "
            f"{worst.cached / worst.prompt:.2%}: session {worst.session} turn {worst.turn + 1}, prompt {worst.prompt}, "
            f"new {worst.new}), computed {sum(t.computed for t in later)}, recomputed tokens of previous turns "
            f"{sum(t.recomputed_prev for t in later)}, mean TTFT {statistics.mean(t.ttft for t in later):.3f} s "
            f"(turn 1: {statistics.mean(t.ttft for t in turns if t.turn == 0):.3f} s)")


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
    p.add_argument("--launch", action="store_true", help="start the servers with `dsv4-agent serve`, one at a time")
    p.add_argument("--model-path", help="with --launch: checkpoint (default: the embedded tiny model)")
    p.add_argument("--max-positions", type=int, default=65536,
                   help="context of the embedded tiny model (default 65536; the CI default model has 8192)")
    p.add_argument("--dtype", default="bfloat16", help="with --launch: float32 or bfloat16")
    p.add_argument("--max-total-tokens", type=int, default=131072, help="with --launch: KV pool size in tokens")
    p.add_argument("--sessions", type=int, default=3, help="sessions run interleaved (cache on)")
    p.add_argument("--max-running-requests", type=int,
                   help="with --launch: the servers' limit (default: one per session, at least 4)")
    p.add_argument("--turns", type=int, default=30, help="turns per session (agent sessions: 20-50)")
    p.add_argument("--off-sessions", type=int, default=1, help="sessions replayed with the cache off (0: none)")
    p.add_argument("--off-turns", type=int, default=10, help="turns replayed with the cache off")
    p.add_argument("--system-tokens", type=int, default=4000, help="system prompt + tool schemas, in tokens")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per assistant turn (a tool call)")
    p.add_argument("--result-min", type=int, default=100, help="smallest tool result in tokens")
    p.add_argument("--result-max", type=int, default=2000, help="largest tool result in tokens (log-uniform)")
    p.add_argument("--max-len", type=int, help="stop a session before its prompt exceeds this (default: context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown report here too")
    p.add_argument("--json", help="write the per-turn records here (JSON)")
    p.add_argument("--from-json", help="render the report of an earlier run's --json records; runs nothing")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        off = saved["off"]
        write_report(args.out, saved["header"], [Turn(**t) for t in saved["on"]],
                     None if off is None else [Turn(**t) for t in off], Path(saved["model_dir"]), saved["dtype"])
        return 0

    from tokenizers import Tokenizer

    from dsv4_agent.serve.embedded import ensure_tiny_model

    model_dir = Path(args.model_path) if args.model_path else ensure_tiny_model(max_positions=args.max_positions)
    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    args.max_len = args.max_len or context
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if not (args.launch or args.url):
        p.error("give --url (and optionally --url-off) or --launch")
    common = ["--model-path", str(model_dir), "--dtype", args.dtype, "--max-total-tokens", str(args.max_total_tokens),
              "--max-running-requests", str(args.max_running_requests or max(4, args.sessions)), "--enable-cache-report"]
    t0 = time.perf_counter()
    on = run_against(args, common, args.url, tokenizer, args.sessions, args.turns, cache=True)
    off = None
    if (args.launch or args.url_off) and args.off_sessions > 0 and args.off_turns > 0:
        off = run_against(args, [*common, "--disable-radix-cache"], args.url_off, tokenizer, args.off_sessions,
                          args.off_turns, cache=False)
    header = (f"sessions={args.sessions} turns={args.turns} (off: {args.off_sessions} x {args.off_turns}) "
              f"system_tokens~{args.system_tokens} results={args.result_min}-{args.result_max} (log-uniform) "
              f"new_tokens={args.new_tokens} dtype={args.dtype} model={model_dir.name} context={context} "
              f"wall={time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "model_dir": str(model_dir), "dtype": args.dtype,
                                               "on": [vars(t) for t in on],
                                               "off": None if off is None else [vars(t) for t in off]}))
    write_report(args.out, header, on, off, model_dir, args.dtype)
    return 0


def write_report(out: str | None, header: str, on: list[Turn], off: list[Turn] | None, model_dir: Path,
                 dtype: str) -> None:
    report = "\n".join([
        header, "", table(on, off), "", by_turn(on, off), "", by_context(on), "", summary("cache on", on)]
        + ([summary("cache off", off), summary("cache on, the turns replayed off", [
            t for t in on if (t.session, t.turn) in {(o.session, o.turn) for o in off}])] if off else [])
        + [pool_bytes(model_dir, dtype)])
    print(report)
    if out:
        Path(out).write_text(report + "\n")
    return 0


def run_against(args, server_args: list[str], url: str | None, tokenizer, sessions: int, turns: int,
                cache: bool) -> list[Turn]:
    """Replay on `url`, or (with --launch) on a server started for this side alone and stopped after."""
    if not args.launch:
        return replay(url, args, tokenizer, sessions, turns)
    from dsv4_agent.serve.testing import ServerProcess

    with ServerProcess(server_args, startup_timeout=900) as server:
        print(f"cache {'on' if cache else 'off'}: server ready in {server.startup_seconds:.0f} s", file=sys.stderr)
        return replay(server.base_url, args, tokenizer, sessions, turns)


if __name__ == "__main__":
    sys.exit(main())
