"""Start and stop real `dsv4-agent serve` servers for tests (and write scripted-model folders).

    with ServerProcess(["--model-path", path], env={"DSV4_SCRIPT": script}) as server:
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")

A server is `python -m dsv4_agent.launch_server` on a free port in its own process group; `stop()` sends
SIGTERM to the group, then SIGKILL, so SGLang's scheduler and detokenizer children go too. Its log is a temp
file (`log_path`, shown when startup fails), removed on stop unless DSV4_KEEP_SERVER_LOGS is set. Startup on
CPU takes 15-30 s and about 4 GB of RAM, so share servers (session-scoped fixtures in tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dsv4_agent.serve import SCRIPTED_ARCH

SCRIPTED_HIDDEN = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_scripted_model(out_dir: str | Path, script_path: str | Path | None = None) -> Path:
    """A model folder for `DSV4ScriptedForCausalLM`: config.json, the tiny V4 tokenizer, a placeholder
    weight file. `script_path` is stored in the config (the env var `DSV4_SCRIPT` overrides it)."""
    import torch
    from safetensors.torch import save_file

    from dsv4_agent.serve.embedded import GENERATION_CONFIG, ensure_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = ensure_tokenizer()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    vocab = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab_size = len(vocab["model"]["vocab"]) + sum(1 for t in vocab["added_tokens"]
                                                     if t["content"] not in vocab["model"]["vocab"])
    config = {
        "architectures": [SCRIPTED_ARCH], "model_type": "llama", "vocab_size": vocab_size,
        # Attention geometry only sizes SGLang's (unused) KV pool: keep it minimal.
        "hidden_size": SCRIPTED_HIDDEN, "intermediate_size": SCRIPTED_HIDDEN, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": SCRIPTED_HIDDEN,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    }
    if script_path is not None:
        config["script_path"] = str(script_path)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    save_file({"dummy": torch.zeros(1)}, str(out / "model.safetensors"))
    return out


def write_script(path: str | Path, rules: list[dict[str, str]], seed: int = 0) -> None:
    """Atomically (re)write a script file; a running scripted server picks it up at its next request."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rules": rules, "seed": seed}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


class ServerProcess:
    """A `dsv4-agent serve` subprocess. `start()` waits for /health and a ready model; `stop()` ends
    the whole process group. The server log is kept in `log_path` (shown when startup fails)."""

    def __init__(self, args: list[str] | None = None, *, env: dict[str, str] | None = None,
                 startup_timeout: float = 900.0, host: str = "127.0.0.1"):
        self.port = free_port()
        self.host = host
        self.args = [*(args or []), "--host", host, "--port", str(self.port)]
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="dsv4-serve-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "dsv4_agent.launch_server", *self.args],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{tail}")
            if self.healthy(timeout=2.0) and self._model_ready():
                self.startup_seconds = time.monotonic() - t0
                return self
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"server not ready after {self.startup_timeout} s:\n{tail}")

    def _model_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/v1/models", timeout=5) as r:
                return bool(json.loads(r.read()).get("data"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def healthy(self, timeout: float = 10.0) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def model_name(self) -> str:
        with urllib.request.urlopen(self.base_url + "/v1/models", timeout=10) as r:
            return json.loads(r.read())["data"][0]["id"]

    def log_tail(self, n: int = 80) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children that outlived the launcher
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not os.environ.get("DSV4_KEEP_SERVER_LOGS") and not self._log.closed:
            self._log.close()
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def scripted_server(work_dir: str | Path, args: list[str] | None = None) -> tuple[ServerProcess, Path]:
    """(an unstarted server for a fresh scripted model in work_dir, the script path to write rules to)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    script = work / "script.json"
    write_script(script, [])
    model = build_scripted_model(work / "model", script)
    return ServerProcess(["--model-path", str(model), *(args or [])]), script


class ScriptedServer:
    """A running scripted-model server whose rules tests replace with `script(rules)` (one server, many
    tests: the model re-reads the script file at the next request)."""

    def __init__(self, work_dir: str | Path, args: list[str] | None = None):
        self.process, self.script_path = scripted_server(work_dir, args)
        self.model_dir = Path(work_dir) / "model"
        self._base_url = self.process.base_url

    @classmethod
    def attach(cls, base_url: str, work_dir: str | Path) -> ScriptedServer:
        """A handle on a scripted server already running from `work_dir` (not stopped by `stop`)."""
        self = cls.__new__(cls)
        self.process, self._base_url = None, base_url.rstrip("/")
        self.script_path = Path(work_dir) / "script.json"
        self.model_dir = Path(work_dir) / "model"
        with urllib.request.urlopen(self._base_url + "/v1/models", timeout=10) as r:
            self.model = json.loads(r.read())["data"][0]["id"]
        return self

    @property
    def base_url(self) -> str:
        return self._base_url

    def script(self, rules: list[dict[str, str]], seed: int = 0) -> None:
        write_script(self.script_path, rules, seed)

    def start(self) -> ScriptedServer:
        self.process.start()
        self.model = self.process.model_name()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
