"""The examples run as scripts over real HTTP against a scripted endpoint (the same scripts run against
`dsv4-agent serve` in test_agent_e2e.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from agent_fakes import Reply, ThreadedScriptedServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PY = sys.executable  # a program by absolute path: allowed in command position by the shell guard


def run_example(name: str, *args: str, base_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSV4_BASE_URL": base_url, "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_weather_calculator_parallel_calls():
    script = [
        Reply(
            reasoning="Two independent lookups.",
            tool_calls=[
                ("c1", "calculator", '{"expression": "2340 * 17.5 / 100"}'),
                ("c2", "get_weather", '{"city": "Oslo"}'),
                ("c3", "get_weather", '{"city": "Atlantis"}'),
            ],
        ),
        Reply(reasoning="Compose.", content="409.5; Oslo is -3C."),
    ]
    with ThreadedScriptedServer(*script) as server:
        proc = run_example("weather_calculator.py", "q", base_url=server.base_url)
    assert proc.returncode == 0, proc.stderr
    assert "409.5; Oslo is -3C." in proc.stdout and "called get_weather" in proc.stdout
    results = {m["tool_call_id"]: m["content"] for m in server.requests[1]["messages"] if m["role"] == "tool"}
    assert results["c1"] == "409.5"
    assert json.loads(results["c2"]) == {"city": "Oslo", "temperature": -3, "unit": "celsius", "sky": "snow"}
    assert results["c3"].startswith("Error: tool 'get_weather' raised KeyError")


def test_event_printer():
    script = [Reply(reasoning="add", tool_calls=[("c1", "add", '{"a": 2, "b": 40}')]), Reply(content="42!")]
    with ThreadedScriptedServer(*script) as server:
        proc = run_example("event_printer.py", base_url=server.base_url)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "turn 1 started"
    assert '  call #0 add({"a": 2, "b": 40}) complete' in lines
    assert any(line.startswith("  result #0 add [ok") and "42.0" in line for line in lines)
    assert lines[-1] == "final output after 2 turns: '42!'"


def test_repo_fixer_fixes_the_demo_repo(tmp_path):
    spec = importlib.util.spec_from_file_location("repo_fixer", EXAMPLES / "repo_fixer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.DEMO_FILES.items():
        (tmp_path / name).write_text(text)
    fixed = module.DEMO_FILES["stats.py"].replace(" - 1\n", "\n")
    script = [
        Reply(
            reasoning="Run the tests.",
            tool_calls=[("c1", "shell", json.dumps({"command": f"{PY} -m unittest 2>&1 | tail -3"}))],
        ),
        Reply(
            reasoning="mean is off by one.",
            tool_calls=[("c2", "write_file", json.dumps({"path": "stats.py", "content": fixed}))],
        ),
        Reply(
            reasoning="Re-run.", tool_calls=[("c3", "shell", json.dumps({"command": f"{PY} -m unittest"}))]
        ),
        Reply(reasoning="Green.", content="Removed the stray `- 1` in mean()."),
    ]
    with ThreadedScriptedServer(*script) as server:
        proc = run_example("repo_fixer.py", str(tmp_path), base_url=server.base_url)
    assert proc.returncode == 0, proc.stderr
    outputs = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "tool"]
    assert "FAILED (failures=1)" in outputs[0]
    assert outputs[2].startswith("exit code: 0") and "OK" in outputs[2]
    assert (tmp_path / "stats.py").read_text() == fixed
    assert "Removed the stray" in proc.stdout
