"""`dsv4_agent.encoding` imports nothing outside the standard library (issue 2, acceptance)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENCODING = Path(__file__).resolve().parents[2] / "encoding"


def test_every_import_is_stdlib_or_relative():
    files = sorted(ENCODING.rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [] if node.level else [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in sys.stdlib_module_names or root == "__future__", f"{path.name} imports {root}"


def test_import_loads_no_third_party_module():
    code = ("import sys; before = set(sys.modules); import dsv4_agent.encoding; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(m for m in new if m not in sys.stdlib_module_names and m != 'dsv4_agent'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
