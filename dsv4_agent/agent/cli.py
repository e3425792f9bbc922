"""`dsv4-agent chat` (interactive) and `dsv4-agent run "task"` (one task) against a V4 endpoint.

Both stream the model's reasoning, tool calls and tool results as they happen. `run` writes the final answer
to stdout and the progress to stderr (so it can be piped), or every event as a JSON line with `--json`.

Safe defaults: the built-in tools are confined to `--workdir` (default: the current directory), and only the
read-only ones (read_file, list_dir) are on unless `--tools` names more (write_file, shell). The shell's path
guard is lifted only by `--unrestricted-shell`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from dsv4_agent.agent.agent import Agent
from dsv4_agent.agent.builtin_tools import BUILTIN_TOOLS, DEFAULT_TOOLS, workspace_tools
from dsv4_agent.agent.context import ContextPolicy
from dsv4_agent.agent.errors import AgentError
from dsv4_agent.agent.events import (
    ContentDelta,
    ContextTrimmed,
    Event,
    FinalOutput,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallFinished,
    ToolCallStarted,
    ToolResult,
    TurnRetried,
    TurnUsage,
)
from dsv4_agent.agent.runner import DEFAULT_BASE_URL, Limits, Runner

__all__ = ["main"]

INSTRUCTIONS = (
    "You are a careful assistant working in the directory {workdir}. Use the tools to inspect and change "
    "files there; paths are relative to it. Think before acting, check results, and finish with a short "
    "answer for the user."
)


def main(argv: list[str] | None = None) -> int:
    """Entry point: `argv` starts with the command, "chat" or "run"."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return int(e.code or 0)
    try:  # bad values (a workdir that is not there, --max-turns 0 ...) are usage errors, like argparse's
        tool_names = _tool_names(args.tools)
        workdir = Path(args.workdir).resolve()
        tools = workspace_tools(
            workdir, tool_names, shell_timeout=args.shell_timeout, unrestricted_shell=args.unrestricted_shell
        )
        limits = Limits(
            max_turns=args.max_turns, tool_timeout=args.tool_timeout, max_total_tokens=args.max_total_tokens
        )
        context = ContextPolicy(max_prompt_tokens=args.max_prompt_tokens)
    except ValueError as e:
        print(f"dsv4-agent {args.command}: {e}", file=sys.stderr)
        return 2
    agent = Agent(
        instructions=args.instructions or INSTRUCTIONS.format(workdir=workdir),
        tools=tools,
        model=args.model,
        reasoning_effort=args.reasoning_effort,
    )
    runner = Runner(base_url=args.base_url, api_key=args.api_key, limits=limits, context=context)
    try:
        if args.command == "run":
            return _run(runner, agent, args)
        return _chat(runner, agent, args)
    finally:
        runner.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4-agent", description="Agent CLI for a DeepSeek-V4 endpoint.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url",
        default=os.environ.get("DSV4_BASE_URL") or DEFAULT_BASE_URL,
        help="OpenAI-compatible endpoint (env DSV4_BASE_URL; default %(default)s)",
    )
    common.add_argument("--api-key", default=None, help="API key (env DSV4_API_KEY / OPENAI_API_KEY)")
    common.add_argument(
        "--model", default=os.environ.get("DSV4_MODEL"), help="model name (default: the endpoint's)"
    )
    common.add_argument("--reasoning-effort", choices=("none", "high", "max"), default="high")
    common.add_argument(
        "--max-turns", type=int, default=30, help="model calls per task (default %(default)s)"
    )
    common.add_argument("--max-total-tokens", type=int, default=None, help="token budget per task")
    common.add_argument("--max-prompt-tokens", type=int, default=None, help="trim old history above this")
    common.add_argument("--tool-timeout", type=float, default=120.0, help="seconds per tool call")
    common.add_argument(
        "--tools",
        default=",".join(DEFAULT_TOOLS),
        help=f"comma-separated built-in tools from {', '.join(BUILTIN_TOOLS)}, 'all' or 'none' "
        "(default: %(default)s; write_file and shell must be named)",
    )
    common.add_argument("--workdir", default=".", help="the only directory the tools may touch (default: .)")
    common.add_argument("--shell-timeout", type=float, default=60.0, help="seconds per shell command")
    common.add_argument(
        "--unrestricted-shell",
        action="store_true",
        help="lift the shell's guard against paths outside --workdir (it is not a sandbox either way)",
    )
    common.add_argument("--instructions", default=None, help="system prompt (default: a workdir assistant)")
    common.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning stream")
    run = commands.add_parser("run", parents=[common], help="run one task and print the answer")
    run.add_argument("task", help="what to do")
    run.add_argument("--json", action="store_true", help="print every event as a JSON line on stdout")
    commands.add_parser(
        "chat", parents=[common], help="interactive chat (/reset clears, /exit or Ctrl-D quits)"
    )
    return parser


def _tool_names(spec: str) -> tuple[str, ...]:
    if spec == "all":
        return BUILTIN_TOOLS
    if spec in ("none", ""):
        return ()
    return tuple(n.strip() for n in spec.split(",") if n.strip())


def _run(runner: Runner, agent: Agent, args: argparse.Namespace) -> int:
    printer = (
        None if args.json else Printer(sys.stderr, show_reasoning=not args.hide_reasoning, show_content=False)
    )
    stream = runner.stream_sync(agent, args.task)
    try:
        for event in stream:
            if args.json:
                print(json.dumps(event_to_json(event), ensure_ascii=False), flush=True)
            else:
                printer.handle(event)  # type: ignore[union-attr]
                if isinstance(event, FinalOutput):
                    print(event.output, flush=True)
    except KeyboardInterrupt:
        stream.cancel()
        print("\n[cancelled]", file=sys.stderr)
        return 130
    except AgentError as e:
        print(f"\ndsv4-agent run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _chat(runner: Runner, agent: Agent, args: argparse.Namespace) -> int:
    printer = Printer(sys.stdout, show_reasoning=not args.hide_reasoning, show_content=True)
    history: list[dict[str, Any]] = []
    print("dsv4-agent chat: /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("[conversation cleared]")
            continue
        stream = runner.stream_sync(agent, line, history=history)
        try:
            for event in stream:
                printer.handle(event)
                if isinstance(event, FinalOutput):
                    history = event.result.messages
        except KeyboardInterrupt:
            stream.cancel()
            history = stream.snapshot().messages  # continuable: unfinished tool calls read "cancelled"
            print("\n[stopped]")
        except AgentError as e:
            print(f"\n[{type(e).__name__}: {e}]")
            if hasattr(e, "result"):
                history = e.result.messages


class Printer:
    """Human-readable rendering of the event stream (ANSI dim/colour only on a terminal)."""

    def __init__(self, out: TextIO, *, show_reasoning: bool, show_content: bool) -> None:
        self.out = out
        self.show_reasoning = show_reasoning
        self.show_content = show_content
        self.color = out.isatty() and not os.environ.get("NO_COLOR")
        self.in_reasoning = False

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def handle(self, event: Event) -> None:
        if isinstance(event, ReasoningDelta) and self.show_reasoning:
            if not self.in_reasoning:
                self.write(self._style("\n[thinking] ", "2;3"))
                self.in_reasoning = True
            self.write(self._style(event.text, "2"))
            return
        if self.in_reasoning and not isinstance(event, ReasoningDelta):
            self.write("\n")
            self.in_reasoning = False
        if isinstance(event, ContentDelta) and self.show_content:
            self.write(event.text)
        elif isinstance(event, ToolCallStarted):
            self.write(self._style(f"\n-> {event.name}(", "36"))
        elif isinstance(event, ToolCallArgumentsDelta):
            self.write(self._style(event.delta, "36"))
        elif isinstance(event, ToolCallFinished):
            self.write(self._style(")", "36"))
        elif isinstance(event, ToolResult):
            lines = event.output.splitlines() or [""]
            shown = "\n   ".join(lines[:8]) + (
                f"\n   [... {len(lines) - 8} more lines]" if len(lines) > 8 else ""
            )
            style = "31" if event.error else "32"
            self.write(self._style(f"\n<- {event.name} ({event.duration_s:.2f}s): ", style) + shown + "\n")
        elif isinstance(event, TurnUsage):
            u = event.usage
            self.write(
                self._style(
                    f"\n[turn {event.turn}: {u.prompt_tokens} prompt ({u.cached_tokens} cached) + "
                    f"{u.completion_tokens} completion tokens]",
                    "2",
                )
            )
        elif isinstance(event, TurnRetried):
            self.write(self._style(f"\n[retry {event.attempt} in {event.delay_s:.1f}s: {event.error}]", "33"))
        elif isinstance(event, ContextTrimmed):
            self.write(
                self._style(
                    f"\n[context trimmed: {event.elided_tool_results} tool results elided, "
                    f"{event.dropped_messages} messages dropped, ~{event.estimated_tokens_before} -> "
                    f"~{event.estimated_tokens_after} tokens]",
                    "33",
                )
            )
        elif isinstance(event, FinalOutput):
            self.write("\n")


def event_to_json(event: Event) -> dict[str, Any]:
    """A JSON-able dict of an event: its fields plus `type`; FinalOutput carries the run's totals."""
    if isinstance(event, FinalOutput):
        r = event.result
        return {
            "type": "FinalOutput",
            "output": event.output,
            "turns": r.turns,
            "usage": dataclasses.asdict(r.usage),
            "messages": r.messages,
        }
    data: dict[str, Any] = {"type": type(event).__name__}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if isinstance(value, BaseException):
            value = f"{type(value).__name__}: {value}"
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        data[field.name] = value
    return data
