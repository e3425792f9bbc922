"""A repository-fixing agent: shell + file tools confined to one directory, streaming its work.

    python examples/repo_fixer.py                 # fixes a small demo repo created in a temp directory
    python examples/repo_fixer.py path/to/repo "make `python -m unittest` pass"

The agent runs the tests through the shell tool, reads the failing code, writes a fix and re-runs the tests.
The tools cannot touch files outside the repository (paths are resolved and checked; the shell runs there
with a guard against outside paths) and shell commands time out. This is a guard rail, not a sandbox: run
untrusted tasks in a container.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from dsv4_agent.agent import Agent, Limits, Runner
from dsv4_agent.agent.builtin_tools import workspace_tools
from dsv4_agent.agent.cli import Printer

DEMO_FILES = {
    "stats.py": '''def mean(values):
    """Arithmetic mean of a non-empty list."""
    return sum(values) / len(values) - 1


def median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
''',
    "test_stats.py": """import unittest

from stats import mean, median


class StatsTest(unittest.TestCase):
    def test_mean(self):
        self.assertEqual(mean([1, 2, 3, 4]), 2.5)

    def test_median(self):
        self.assertEqual(median([3, 1, 2]), 2)
        self.assertEqual(median([4, 1, 3, 2]), 2.5)


if __name__ == "__main__":
    unittest.main()
""",
}

INSTRUCTIONS = """You fix bugs in the repository in your working directory.
Work in small steps: run the tests with the shell tool, read the code, change the smallest thing that is
wrong with write_file, and run the tests again. Never edit the tests. When the tests pass, reply with a short
summary of the cause and the fix."""


def main() -> int:
    if len(sys.argv) > 1:
        repo = Path(sys.argv[1]).resolve()
    else:
        repo = Path(tempfile.mkdtemp(prefix="dsv4-demo-repo-"))
        for name, text in DEMO_FILES.items():
            (repo / name).write_text(text)
        print(f"demo repository: {repo}")
    task = sys.argv[2] if len(sys.argv) > 2 else "The tests fail (`python -m unittest -v`). Fix the code."
    agent = Agent(
        instructions=INSTRUCTIONS,
        tools=workspace_tools(repo, ["shell", "read_file", "write_file", "list_dir"], shell_timeout=60),
        reasoning_effort="high",
    )
    runner = Runner(model=os.environ.get("DSV4_MODEL"), limits=Limits(max_turns=25, tool_timeout=90))
    printer = Printer(sys.stdout, show_reasoning=True, show_content=True)
    try:
        for event in runner.stream_sync(agent, task):
            printer.handle(event)
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
