"""End to end against a real `dsv4-agent serve` (SGLang, our encoding and parsers) with the scripted model.

How reasoning preservation is observed: the scripted model picks its reply by matching text in the
*rendered prompt*. The rule for step k+1 requires step k's reasoning followed by `</think>` in the prompt,
so it only fires when the reasoning of the earlier tool-call turn was rendered back, either because the
client sent `reasoning_content` or because the server restored it by tool_call_id. A fallback rule answers
"REASONING WAS LOST" otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from agent_fixtures import completion_text, v4_server_fixture  # noqa: F401  (pytest fixture `v4_server`)

from dsv4_agent.agent import Agent, FinalOutput, Runner, ToolCallStarted, TurnUsage, tool
from dsv4_agent.agent.cli import main as cli_main

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LOST = {"when": "<tool_result>", "reply": completion_text("?", "REASONING WAS LOST")}


def after(reasoning: str, reply: str, when: str = "<tool_result>") -> dict[str, str]:
    """A rule firing on a tool-result turn whose prompt still holds `reasoning</think>`."""
    return {"when": when, "when_prompt": f"{reasoning}</think>", "reply": reply}


@tool
def get_weather(city: str) -> str:
    """Current weather of a city.

    Args:
        city: city name.
    """
    return {"Oslo": "Oslo: -3C snow", "Lima": "Lima: 19C overcast"}.get(city, f"{city}: unknown")


def test_sdk_parallel_calls_and_interleaved_reasoning(v4_server):
    v4_server.script_rules(
        after("SDK-R2 compare", completion_text("SDK-R3", "Lima is warmer than Oslo.")),
        after(
            "SDK-R1 two cities",
            completion_text("SDK-R2 compare", "", [("get_weather", {"city": "Reykjavik"})]),
        ),
        LOST,
        {
            "when": "Compare Oslo and Lima",
            "reply": completion_text(
                "SDK-R1 two cities",
                "",
                [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Lima"})],
            ),
        },
    )
    runner = Runner(base_url=v4_server.base_url)
    events = list(
        runner.stream_sync(Agent(instructions="Be brief.", tools=[get_weather]), "Compare Oslo and Lima")
    )
    runner.close()
    final = events[-1]
    assert isinstance(final, FinalOutput) and final.output == "Lima is warmer than Oslo."
    assert final.result.turns == 3 and final.result.reasoning == "SDK-R3"

    started = [e for e in events if isinstance(e, ToolCallStarted)]
    assert [(e.turn, e.index, e.name) for e in started] == [
        (1, 0, "get_weather"),
        (1, 1, "get_weather"),
        (2, 0, "get_weather"),
    ]
    messages = final.result.messages
    first_call = messages[1]
    assert first_call["reasoning_content"] == "SDK-R1 two cities"
    ids = [c["id"] for c in first_call["tool_calls"]]
    assert len(set(ids)) == 2 and all(ids)
    assert [json.loads(c["function"]["arguments"]) for c in first_call["tool_calls"]] == [
        {"city": "Oslo"},
        {"city": "Lima"},
    ]
    assert messages[2:4] == [
        {"role": "tool", "tool_call_id": ids[0], "content": "Oslo: -3C snow"},
        {"role": "tool", "tool_call_id": ids[1], "content": "Lima: 19C overcast"},
    ]
    usage = [e.usage for e in events if isinstance(e, TurnUsage)]
    assert len(usage) == 3 and all(u.prompt_tokens > 0 and u.completion_tokens > 0 for u in usage)
    assert usage[1].prompt_tokens > usage[0].prompt_tokens + usage[0].completion_tokens  # append-only growth


def test_second_turn_reports_cached_prompt_tokens(v4_server):
    v4_server.script_rules(
        after("CACHE-R1", completion_text("CACHE-R2", "done")),
        LOST,
        {
            "when": "Cache check",
            "reply": completion_text("CACHE-R1", "", [("get_weather", {"city": "Oslo"})]),
        },
    )
    runner = Runner(base_url=v4_server.base_url)
    result = runner.run_sync(Agent(tools=[get_weather]), "Cache check " + "padding " * 300)
    runner.close()
    first, second = result.turn_usage
    assert result.final_output == "done"
    # Turn 2's prompt starts with turn 1's prompt (append-only): most of it should come from the cache.
    assert second.cached_tokens >= first.prompt_tokens // 2


def test_cli_run_with_the_shell_tool(v4_server, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("alpha\n")
    v4_server.script_rules(
        after("CLI-R1 look", completion_text("CLI-R2", "The directory holds a.txt.")),
        LOST,
        {
            "when": "What files are here",
            "reply": completion_text("CLI-R1 look", "", [("shell", {"command": "ls"})]),
        },
    )
    code = cli_main(
        [
            "run",
            "What files are here?",
            "--base-url",
            v4_server.base_url,
            "--workdir",
            str(tmp_path),
            "--tools",
            "shell",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and out == "The directory holds a.txt.\n"
    assert "-> shell(" in err and "a.txt" in err


def test_weather_example_runs_against_the_server(v4_server):
    v4_server.script_rules(
        after("EX-R1", completion_text("EX-R2", "409.5, and Lima is warmer.")),
        LOST,
        {
            "when": "17.5% of 2340",
            "reply": completion_text(
                "EX-R1",
                "",
                [("calculator", {"expression": "2340 * 17.5 / 100"}), ("get_weather", {"city": "Lima"})],
            ),
        },
    )
    env = {**os.environ, "DSV4_BASE_URL": v4_server.base_url}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "weather_calculator.py"), "What is 17.5% of 2340, warmer in Oslo or Lima?"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "409.5, and Lima is warmer." in proc.stdout and "called calculator" in proc.stdout


# ---- integrations -----------------------------------------------------------------------------------------


def test_mini_swe_agent_yaml_config(v4_server, tmp_path, monkeypatch):
    """The real mini-swe-agent (DefaultAgent + LitellmModel + LocalEnvironment) with examples/mini_swe_agent.yaml."""
    monkeypatch.setenv("MSWEA_CONFIGURED", "true")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.config import builtin_config_dir
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models import get_model

    v4_server.script_rules(
        after(
            "MSWEA-R2 check",
            completion_text(
                "MSWEA-R3", "", [("bash", {"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"})]
            ),
        ),
        after(
            "MSWEA-R1 create",
            completion_text("MSWEA-R2 check", "Check it.", [("bash", {"command": "cat hello.txt"})]),
        ),
        {
            "when": "<tool_result>",
            "reply": completion_text("?", "lost", [("bash", {"command": "echo REASONING WAS LOST"})]),
        },
        {
            "when": "Create hello.txt",
            "reply": completion_text(
                "MSWEA-R1 create", "", [("bash", {"command": "echo hello > hello.txt"})]
            ),
        },
    )
    config = yaml.safe_load((EXAMPLES / "mini_swe_agent.yaml").read_text())["model"]
    config["model_kwargs"]["api_base"] = v4_server.base_url
    agent_config = yaml.safe_load((builtin_config_dir / "mini.yaml").read_text())["agent"]
    agent = DefaultAgent(
        get_model(config=config),
        LocalEnvironment(cwd=str(tmp_path)),
        system_template=agent_config["system_template"],
        instance_template=agent_config["instance_template"],
        step_limit=6,
    )
    result = agent.run("Create hello.txt containing hello")
    assert result["exit_status"] == "Submitted", agent.messages[-1]
    assert (tmp_path / "hello.txt").read_text() == "hello\n"
    assistant = [m for m in agent.messages if m["role"] == "assistant"]
    assert [m.get("reasoning_content") for m in assistant] == [
        "MSWEA-R1 create",
        "MSWEA-R2 check",
        "MSWEA-R3",
    ]
    tool_results = [m for m in agent.messages if m["role"] == "tool"]
    assert "hello" in tool_results[1]["content"]
    assert assistant[0]["tool_calls"][0]["id"] == tool_results[0]["tool_call_id"]


def test_swe_agent_litellm_call_relies_on_server_side_restoration(v4_server):
    """SWE-agent's own call (`litellm.completion`, non-streaming) with examples/swe_agent.yaml's model
    settings. Its history drops reasoning_content; the server restores it by tool_call_id."""
    import litellm

    cfg = yaml.safe_load((EXAMPLES / "swe_agent.yaml").read_text())["agent"]["model"]
    bash = {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "runs the given command directly in bash",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        },
    }
    v4_server.script_rules(
        after("SWEA-R1 inspect", completion_text("SWEA-R2", "submit now", [("submit", {})])),
        {"when": "<tool_result>", "reply": completion_text("?", "REASONING WAS LOST", [("submit", {})])},
        {
            "when": "Fix the off-by-one",
            "reply": completion_text("SWEA-R1 inspect", "Look first.", [("bash", {"command": "ls"})]),
        },
    )

    def query(messages):
        return litellm.completion(
            model=cfg["name"], messages=messages, temperature=cfg["temperature"], top_p=cfg["top_p"],
            api_version=None, api_key=cfg["api_key"], fallbacks=[], api_base=v4_server.base_url, tools=[bash],
            n=None, **cfg["completion_kwargs"], extra_headers={"User-Agent": "swe-agent/1.1.0"},
        )  # fmt: skip

    history = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Fix the off-by-one in stats.py"},
    ]
    first = query(history).choices[0].message
    assert first.reasoning_content == "SWEA-R1 inspect" and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    # SWE-agent's _history_to_messages: content + tool_calls (to_dict), no reasoning_content.
    history += [
        {"role": "assistant", "content": first.content or "", "tool_calls": [call.to_dict()]},
        {"role": "tool", "content": "stats.py test_stats.py", "tool_call_id": call.id},
    ]
    second = query(history).choices[0].message
    assert second.content == "submit now" and second.reasoning_content == "SWEA-R2"


def test_openhands_llm_litellm_call(v4_server):
    """The OpenHands SDK `LLM.completion` transport (openhands-sdk needs Python >= 3.12; this is the litellm
    call it makes with examples/openhands_llm.py's settings): `openai/` model, list-of-parts content,
    tool messages with `name`, reasoning_content sent only with `model_canonical_name` (else restored)."""
    import litellm

    think = {
        "type": "function",
        "function": {
            "name": "think",
            "description": "Log a thought.",
            "parameters": {
                "type": "object",
                "properties": {"thought": {"type": "string"}},
                "required": ["thought"],
            },
        },
    }

    def parts(text):
        return [{"type": "text", "text": text}]

    def query(messages):
        return litellm.completion(
            model=f"openai/{v4_server.model}", api_key="EMPTY", base_url=v4_server.base_url, api_version=None,
            timeout=120, drop_params=True, seed=None, messages=messages, tools=[think], top_p=1.0,
            temperature=1.0, extra_body={"thinking": {"type": "enabled"}, "reasoning_effort": "high"},
        )  # fmt: skip

    for send_reasoning in (True, False):
        marker = f"OH-R1-{send_reasoning}"
        v4_server.script_rules(
            after(marker, completion_text("OH-R2", f"done {send_reasoning}")),
            LOST,
            {
                "when": f"Plan the work {send_reasoning}",
                "reply": completion_text(marker, "", [("think", {"thought": "plan"})]),
            },
        )
        messages = [
            {"role": "system", "content": parts("You are OpenHands.")},
            {"role": "user", "content": parts(f"Plan the work {send_reasoning}")},
        ]
        first = query(messages).choices[0].message
        assert first.reasoning_content == marker
        call = first.tool_calls[0]
        assistant = {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "think", "arguments": call.function.arguments},
                }
            ],
        }
        if send_reasoning:  # what Message.to_chat_dict(send_reasoning_content=True) adds
            assistant["reasoning_content"] = first.reasoning_content
        messages += [
            assistant,
            {
                "role": "tool",
                "content": parts("Your thought has been logged."),
                "tool_call_id": call.id,
                "name": "think",
            },
        ]
        second = query(messages).choices[0].message
        assert second.content == f"done {send_reasoning}"


@pytest.mark.parametrize("strict", [True, False], ids=["strict-tools", "plain-tools"])
def test_openai_agents_example_in_its_own_venv(v4_server, strict):
    """The real openai-agents package (needs openai>=3, so it runs from a separate venv, talking HTTP)."""
    from agent_clients import client_python

    python = client_python("openai-agents", ["openai-agents==0.24.0"])
    v4_server.script_rules(
        after("OA-R2 add", completion_text("OA-R3", "413")),
        after("OA-R1 multiply", completion_text("OA-R2 add", "", [("add", {"a": 408, "b": 5})])),
        LOST,
        {
            "when": "12 * 34 + 5",
            "reply": completion_text(
                "OA-R1 multiply", "", [("multiply", {"a": 12, "b": 34}), ("add", {"a": 0, "b": 0})]
            ),
        },
    )
    env = {**os.environ, "DSV4_BASE_URL": v4_server.base_url, "DSV4_MODEL": v4_server.model}
    env["DSV4_STRICT_TOOLS"] = "1" if strict else "0"
    proc = subprocess.run(
        [str(python), str(EXAMPLES / "openai_agents_dsv4.py"), "What's 12 * 34 + 5?"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "413"
