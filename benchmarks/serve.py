"""Serving-layer costs of `dsv4-agent serve` on the scripted model (no network compute, so what is measured is
SGLang's scheduler + our encoding, tokenization, parsers and HTTP).

    python benchmarks/serve.py [--requests 20]

Prints: startup (launch -> /v1/models ready), latency of a short non-streamed request, time to first
token and tokens/s of a streamed 400-token reply (1 and 8 concurrent streams), and request latency for
tool-loop conversations of growing length (prompt encoding + tokenization of the whole history).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time

import httpx
from dsv4_agent.encoding import render_assistant
from dsv4_agent.encoding.tokens import EOS

from dsv4_agent.serve.testing import ScriptedServer

TOOL = {"type": "function", "function": {"name": "bash", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}


def _reply(reasoning: str, content: str = "", command: str | None = None) -> str:
    calls = [] if command is None else [{"type": "function", "function": {
        "name": "bash", "arguments": json.dumps({"command": command})}}]
    msg = {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": calls}
    return render_assistant(msg, "thinking")[: -len(EOS)]


def _stream(client: httpx.Client, body: dict) -> tuple[float, float, int]:
    """(seconds to the first content/reasoning delta, total seconds, deltas)."""
    t0 = time.perf_counter()
    first, n = None, 0
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"delta"' in line and ('"content": "' in line or '"reasoning_content": "' in line):
                first = first or time.perf_counter() - t0
                n += 1
    return first or 0.0, time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        server = ScriptedServer(work)
        t0 = time.perf_counter()
        server.start()
        startup = time.perf_counter() - t0
        long_text = " ".join(f"w{i}" for i in range(400))
        server.script([{"when": "short", "reply": _reply("ok", "Hi.")},
                       {"when": "long", "reply": _reply("thinking", long_text)},
                       {"when": "step", "reply": _reply("next", "", "ls -la")}])
        rows = [("startup, launch -> ready (s)", f"{startup:.1f}")]
        try:
            with httpx.Client(base_url=server.base_url, timeout=600) as client:
                body = {"model": server.model, "messages": [{"role": "user", "content": "short"}], "max_tokens": 16}
                client.post("/v1/chat/completions", json=body)  # warm
                lat = []
                for _ in range(args.requests):
                    t = time.perf_counter()
                    client.post("/v1/chat/completions", json=body).raise_for_status()
                    lat.append(time.perf_counter() - t)
                rows.append(("short non-streamed request, median (ms)", f"{1000 * statistics.median(lat):.1f}"))
                long_body = {"model": server.model, "messages": [{"role": "user", "content": "long"}], "max_tokens": 1000}
                ttft, total, n = _stream(client, long_body)
                rows.append(("streamed reply: first token (ms)", f"{1000 * ttft:.0f}"))
                rows.append((f"streamed reply: {n} deltas, tokens/s, 1 stream", f"{n / total:.0f}"))
                results: list[tuple[float, float, int]] = []
                threads = [threading.Thread(target=lambda: results.append(_stream(client, long_body))) for _ in range(8)]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                wall = time.perf_counter() - t
                rows.append(("8 concurrent streams: total tokens/s", f"{sum(r[2] for r in results) / wall:.0f}"))
                for turns in (1, 10, 50):
                    messages = [{"role": "user", "content": "step"}]
                    for i in range(turns - 1):
                        cid = f"call_{i}"
                        messages += [{"role": "assistant", "content": "", "reasoning_content": "next", "tool_calls": [
                            {"id": cid, "type": "function", "function": {"name": "bash",
                                                                         "arguments": '{"command": "ls -la"}'}}]},
                                     {"role": "tool", "tool_call_id": cid, "content": "file.txt\n" * 20 + "step"}]
                    b = {"model": server.model, "messages": messages, "tools": [TOOL], "max_tokens": 64}
                    client.post("/v1/chat/completions", json=b)
                    lat = []
                    for _ in range(5):
                        t = time.perf_counter()
                        r = client.post("/v1/chat/completions", json=b)
                        lat.append(time.perf_counter() - t)
                    prompt = r.json()["usage"]["prompt_tokens"]
                    rows.append((f"tool loop, {turns} turns ({prompt} prompt tokens), median (ms)",
                                 f"{1000 * statistics.median(lat):.1f}"))
        finally:
            server.stop()
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
