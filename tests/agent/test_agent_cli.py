"""Built-in workspace tools (confinement, timeouts) and the `run`/`chat` CLI over real HTTP."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from agent_fakes import Reply, ThreadedScriptedServer
from agent_fixtures import anyio_backend  # noqa: F401  (pytest fixture)

from dsv4_agent.agent.builtin_tools import workspace_tools
from dsv4_agent.agent.cli import main
from dsv4_agent.cli import main as dispatcher_main

pytestmark = pytest.mark.anyio


def tools_in(tmp_path, *names, **kw):
    return {t.name: t for t in workspace_tools(tmp_path, names, **kw)}


async def call(t, **kwargs):
    return await t.invoke(t.params(**kwargs))


async def test_file_tools_stay_inside_the_workdir(tmp_path):
    outside = tmp_path.parent / f"outside-{os.getpid()}.txt"
    outside.write_text("secret")
    (tmp_path / "link").symlink_to(outside)
    tools = tools_in(tmp_path, "read_file", "write_file", "list_dir")

    assert (
        await call(tools["write_file"], path="sub/a.txt", content="one\ntwo\nthree")
        == "wrote 13 characters to sub/a.txt"
    )
    assert await call(tools["read_file"], path="sub/a.txt", start_line=2, max_lines=1) == (
        "     2\ttwo\n[... 1 more lines; use start_line]"
    )
    assert await call(tools["list_dir"]) == "link\nsub/"
    for bad in ("../" + outside.name, str(outside), "link", "sub/../../x"):
        with pytest.raises(PermissionError, match="outside the working directory"):
            await call(tools["read_file"], path=bad)
        with pytest.raises(PermissionError):
            await call(tools["write_file"], path=bad, content="x")
    assert outside.read_text() == "secret"
    outside.unlink()


async def test_shell_runs_in_the_workdir_with_a_guard_and_a_timeout(tmp_path):
    shell = tools_in(tmp_path, "shell", shell_timeout=0.5)["shell"]
    assert await call(shell, command="pwd; echo $HOME; echo err >&2; exit 3") == (
        f"exit code: 3\n{tmp_path.resolve()}\n{tmp_path.resolve()}\nerr\n"
    )
    for bad in (
        "cat /etc/passwd",
        "ls ..",
        "cd ~ && ls",
        "grep -r x --include=/etc/x .",
        "echo a#b;cat /etc/x",
    ):
        with pytest.raises(PermissionError):
            await call(shell, command=bad)
    assert (await call(shell, command="ls sub/.. > /dev/null; echo ok")).endswith("ok\n")
    py = sys.executable  # a program by absolute path is fine where a command starts, not as an argument
    assert (await call(shell, command=f"echo a && {py} -c 'print(6*7)'")).endswith("42\n")
    with pytest.raises(PermissionError):
        await call(shell, command=f"cat {py}")

    t0 = time.perf_counter()
    out = await call(shell, command="sleep 30 & sleep 30; echo never")
    assert out == "Error: the command timed out after 0.5s and was killed"
    assert time.perf_counter() - t0 < 5

    free = tools_in(tmp_path, "shell", unrestricted_shell=True)["shell"]
    assert (await call(free, command="ls / > /dev/null && echo listed")).endswith("listed\n")


def test_shell_output_is_truncated_head_and_tail(tmp_path):
    import asyncio

    shell = tools_in(tmp_path, "shell", max_output_chars=200)["shell"]
    out = asyncio.run(call(shell, command="seq 1 10000"))
    assert len(out) < 300 and out.startswith("exit code: 0\n1\n2\n") and out.endswith("9999\n10000\n")
    assert "characters cut" in out


def test_unknown_builtin_tool_is_a_usage_error(tmp_path, capsys):
    assert main(["run", "x", "--tools", "shell,rm_rf", "--workdir", str(tmp_path)]) == 2
    assert "unknown built-in tool(s) ['rm_rf']" in capsys.readouterr().err
    assert main(["run", "--bogus"]) == 2


def test_run_streams_progress_and_prints_the_answer(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("the answer is 42\n")
    script = [
        Reply(reasoning="Read the notes.", tool_calls=[("c1", "read_file", '{"path": "notes.txt"}')]),
        Reply(reasoning="It says 42.", content="42"),
    ]
    with ThreadedScriptedServer(*script) as server:
        code = dispatcher_main(
            [
                "run",
                "What is the answer?",
                "--base-url",
                server.base_url,
                "--workdir",
                str(tmp_path),
                "--max-turns",
                "4",
            ]
        )
    out, err = capsys.readouterr()
    assert code == 0 and out == "42\n"
    assert "[thinking] Read the notes." in err and '-> read_file({"path": "notes.txt"})' in err
    assert "<- read_file" in err and "the answer is 42" in err
    first, second = server.requests
    assert [t["function"]["name"] for t in first["tools"]] == ["read_file", "list_dir"]  # safe default
    assert str(tmp_path.resolve()) in first["messages"][0]["content"]
    assert second["messages"][2]["reasoning_content"] == "Read the notes."
    assert second["messages"][3]["content"] == "     1\tthe answer is 42"


def test_run_json_events_and_limit_exit_code(tmp_path, capsys):
    loop = [Reply(tool_calls=[(f"c{i}", "list_dir", "{}")]) for i in range(2)]
    with ThreadedScriptedServer(*loop) as server:
        code = main(
            [
                "run",
                "loop",
                "--base-url",
                server.base_url,
                "--workdir",
                str(tmp_path),
                "--max-turns",
                "2",
                "--json",
            ]
        )
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "MaxTurnsExceeded" in err
    assert [e["type"] for e in events].count("ToolResult") == 2
    assert {e["type"] for e in events} >= {"TurnStarted", "ToolCallStarted", "ToolCallFinished", "TurnUsage"}


def test_chat_keeps_history_across_turns(tmp_path, capsys, monkeypatch):
    script = [Reply(reasoning="greet", content="Hi!"), Reply(reasoning="recall", content="You said hello.")]
    lines = iter(["hello", "what did I say?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    with ThreadedScriptedServer(*script) as server:
        code = main(["chat", "--base-url", server.base_url, "--workdir", str(tmp_path), "--tools", "none"])
    out = capsys.readouterr().out
    assert code == 0 and "Hi!" in out and "You said hello." in out and "[thinking] greet" in out
    second = server.requests[1]
    assert "tools" not in second
    assert second["messages"][1:] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi!", "reasoning_content": "greet"},
        {"role": "user", "content": "what did I say?"},
    ]


def test_dispatcher_usage_and_exit_codes(capsys):
    assert dispatcher_main(["--help"]) == 0
    assert "usage: dsv4-agent" in capsys.readouterr().out
    assert dispatcher_main([]) == 2
    assert "usage: dsv4-agent" in capsys.readouterr().err
    assert dispatcher_main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
