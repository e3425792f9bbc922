"""`dsv4-agent serve` command-line assembly (no server started here)."""

from __future__ import annotations

import json
from pathlib import Path

from dsv4_agent.serve import MODEL_ARCH, MODELS_PACKAGE, REASONING_PARSER, TOOL_PARSER
from dsv4_agent.serve.cli import CPU_MAX_TOTAL_TOKENS, SHIM_DIR, build_command


def _model(tmp_path: Path, arch: str, name: str = "DeepSeek-V4-Flash") -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [arch]}))
    return str(d)


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_official_checkpoint_routed_and_defaults_set(tmp_path):
    path = _model(tmp_path, "DeepseekV4ForCausalLM")
    args, env = build_command(["--model-path", path, "--tp-size", "8", "--enable-cache-report"], cuda=True)
    assert args[:5] == ["--model-path", path, "--tp-size", "8", "--enable-cache-report"]  # passed through
    assert _value(args, "--tool-call-parser") == TOOL_PARSER
    assert _value(args, "--reasoning-parser") == REASONING_PARSER
    assert _value(args, "--served-model-name") == "deepseek-v4-flash"
    assert _value(args, "--sampling-defaults") == "model"
    assert args.count("--enable-cache-report") == 1  # a user flag is not doubled
    assert json.loads(_value(args, "--json-model-override-args")) == {"architectures": [MODEL_ARCH]}
    assert env["SGLANG_EXTERNAL_MODEL_PACKAGE"] == MODELS_PACKAGE
    assert "SGLANG_USE_CPU_ENGINE" not in env and "--max-total-tokens" not in args  # CUDA: no CPU setup
    assert "--sleep-on-idle" not in args


def test_user_flags_win_and_overrides_merge(tmp_path):
    path = _model(tmp_path, "DeepseekV4ForCausalLM", "ckpt")
    args, _ = build_command(["--model-path", path, "--served-model-name", "mine", "--tool-call-parser=hermes",
                             "--json-model-override-args", '{"max_position_embeddings": 4096}'], cuda=True)
    assert args.count("--served-model-name") == 1 and _value(args, "--served-model-name") == "mine"
    assert "--enable-cache-report" in args  # our default: cached_tokens in every response's usage
    assert "--tool-call-parser=hermes" in args and "--tool-call-parser" not in args
    assert json.loads(_value(args, "--json-model-override-args")) == {"max_position_embeddings": 4096,
                                                                      "architectures": [MODEL_ARCH]}


def test_cpu_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    path = _model(tmp_path, "SomethingElse", "other-model")
    args, env = build_command(["--model-path", path], cuda=False)
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(":") == [str(SHIM_DIR), "/somewhere"]
    assert (SHIM_DIR / "sgl_kernel" / "__init__.py").is_file()
    assert _value(args, "--max-total-tokens") == str(CPU_MAX_TOTAL_TOKENS)
    assert args.count("--sleep-on-idle") == 1  # an idle CPU server does not spin a core
    assert "--json-model-override-args" not in args  # not an official V4 checkpoint
    assert _value(args, "--served-model-name") == "deepseek-v4-other-model"
    args, _ = build_command(["--model-path", path, "--mem-fraction-static", "0.2"], cuda=False)
    assert "--max-total-tokens" not in args


def test_no_model_path_uses_embedded_model(tmp_path, monkeypatch):
    built = _model(tmp_path, "DeepseekV4ForCausalLM", "tiny-v4-x")
    monkeypatch.setattr("dsv4_agent.serve.embedded.ensure_tiny_model", lambda: Path(built))
    args, _ = build_command(["--port", "8000"], cuda=False)
    assert _value(args, "--model-path") == built and _value(args, "--port") == "8000"
    assert _value(args, "--served-model-name") == "deepseek-v4-tiny"
    assert json.loads(_value(args, "--json-model-override-args")) == {"architectures": [MODEL_ARCH]}


def test_shim_assigns_request_slots():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("shim_sgl_kernel", SHIM_DIR / "sgl_kernel" / "__init__.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    shim.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), req_to_token, torch.tensor([1, 0]),
                                      torch.tensor([4, 2]), torch.tensor([7, 8, 9, 5, 6]), 10)
    assert req_to_token[2, :5].tolist() == [0, 7, 8, 9, 0] and req_to_token[0, :3].tolist() == [5, 6, 0]
    try:
        shim.some_cuda_kernel(1)
    except NotImplementedError as e:
        assert "some_cuda_kernel" in str(e)
    else:
        raise AssertionError("placeholder kernels must raise")


def test_console_script_and_module_entry_points():
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("dsv4-agent")
    for cmd in ([str(exe), "serve", "--help"], [sys.executable, "-m", "dsv4_agent.launch_server", "--help"]):
        if not Path(cmd[0]).exists():
            continue  # the console script exists only in an installed environment
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "dsv4-agent serve [--model-path PATH]" in out.stdout
