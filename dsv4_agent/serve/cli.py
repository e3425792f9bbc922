"""`dsv4-agent serve [--model-path PATH] [any sglang.launch_server flag]`.

Builds the `python -m sglang.launch_server` command line and environment, then replaces this process
with it (same PID, so signals reach the server directly). Every SGLang flag passes through unchanged; ours
are only defaults a user flag overrides:

* `--tool-call-parser dsv4_agent --reasoning-parser dsv4_agent` (our plugin also selects our chat encoding);
* `--served-model-name deepseek-v4-...` (clients such as openai-agents replay reasoning only for names
  containing "deepseek"), `--sampling-defaults model` (generation_config: T=1.0, top_p=1.0),
  `--enable-cache-report` (agents see `usage.prompt_tokens_details.cached_tokens`);
* official `DeepseekV4ForCausalLM` checkpoints are routed to our architecture with
  `--json-model-override-args '{"architectures": ["DSV4AgentForCausalLM"]}'` (SGLang applies it to the
  loaded config in every process; nothing on disk changes), merged into a user-given override;
* no `--model-path`: the embedded tiny V4 model (built once, cached);
* on a machine without CUDA: `SGLANG_USE_CPU_ENGINE=1`, the pure-torch `sgl_kernel` stand-in first on the
  server's PYTHONPATH, `--max-total-tokens 16384` unless a KV budget is given (otherwise SGLang sizes
  the KV pool to ~70% of RAM), and `--sleep-on-idle` (an idle scheduler busy-polls a core; requests still
  wake it at once).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

from dsv4_agent.serve import MODEL_ARCH, MODELS_PACKAGE, OFFICIAL_ARCHS, REASONING_PARSER, TOOL_PARSER
from dsv4_agent.serve.plugin import ENABLE_ENV

SHIM_DIR = Path(__file__).resolve().parent / "shim"
CPU_MAX_TOTAL_TOKENS = 16384

USAGE = """usage: dsv4-agent serve [--model-path PATH] [sglang.launch_server flags ...]

Serve DeepSeek-V4 with SGLang's OpenAI-compatible API (our encoding, tool-call and reasoning parsers).
Without --model-path a tiny random V4 model is built once and served (CPU works). Every flag of
`python -m sglang.launch_server` is accepted and passed through; `--sglang-help` lists them.
"""


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` / `--name=VALUE` in argv, "" for a bare flag, None when absent."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def _drop(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def _has_cuda() -> bool:
    """A usable CUDA device, asked of the driver directly (importing torch here would cost seconds)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


def _architecture(model_path: str) -> str | None:
    try:
        archs = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None  # a hub id or a remote path: SGLang resolves it
    return archs[0] if archs else None


def _served_name(model_path: str) -> str:
    name = Path(model_path.rstrip("/")).name.lower() or "model"
    return name if "deepseek" in name else f"deepseek-v4-{name}"


def build_command(argv: list[str], *, cuda: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv for `python -m sglang.launch_server`, environment additions)."""
    args = list(argv)
    env: dict[str, str] = {ENABLE_ENV: "1", "SGLANG_EXTERNAL_MODEL_PACKAGE": MODELS_PACKAGE}
    model_path = _flag(args, "--model-path") or _flag(args, "--model")
    if not model_path:
        from dsv4_agent.serve.embedded import ensure_tiny_model

        model_path = str(ensure_tiny_model())
        args = ["--model-path", model_path, *_drop(_drop(args, "--model-path"), "--model")]
        if _flag(args, "--served-model-name") is None:
            args += ["--served-model-name", "deepseek-v4-tiny"]

    defaults = {"--tool-call-parser": TOOL_PARSER, "--reasoning-parser": REASONING_PARSER,
                "--served-model-name": _served_name(model_path), "--sampling-defaults": "model"}
    for name, value in defaults.items():
        if _flag(args, name) is None:
            args += [name, value]
    if "--enable-cache-report" not in args:  # usage.prompt_tokens_details.cached_tokens on every response
        args.append("--enable-cache-report")

    if _architecture(model_path) in OFFICIAL_ARCHS:
        raw = _flag(args, "--json-model-override-args")
        override = json.loads(raw) if raw else {}
        if not isinstance(override, dict):
            raise SystemExit("dsv4-agent serve: --json-model-override-args must be a JSON object")
        override.setdefault("architectures", [MODEL_ARCH])
        args = [*_drop(args, "--json-model-override-args"), "--json-model-override-args", json.dumps(override)]

    if not (_has_cuda() if cuda is None else cuda) and (_flag(args, "--device") in (None, "cpu")):
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_DIR), os.environ.get("PYTHONPATH", "")) if p)
        if _flag(args, "--max-total-tokens") is None and _flag(args, "--mem-fraction-static") is None:
            args += ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]
        if "--sleep-on-idle" not in args:  # an idle scheduler busy-polls a whole core the agent's tools need
            args.append("--sleep-on-idle")
    return args, env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "--sglang-help":
        argv = ["--help"]
    elif "--help" in argv:
        print(USAGE)
        return 0
    args, env = build_command(argv)
    full_env = {**os.environ, **env}
    cmd = [sys.executable, "-m", "sglang.launch_server", *args]
    print("[dsv4-agent] " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, full_env)
    return 0  # not reached
