"""Built-in tools of the CLI, confined to one working directory.

* `read_file`, `list_dir`: read-only, paths resolved (symlinks included) and rejected if they leave the
  working directory. These are the CLI's default tools.
* `write_file`: same confinement; opt-in.
* `shell`: `bash -c` with the working directory as cwd and $HOME, a timeout that kills the whole process
  group, output truncated. Opt-in. A guard rejects commands naming absolute paths outside the working
  directory (other than a program in command position), `..` that climbs out of it, or `~`, unless
  `unrestricted_shell=True`. The guard is a
  safety net against mistakes, NOT a sandbox: a program can still reach anything the user can. Run untrusted
  tasks in a container.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
from pathlib import Path

from dsv4_agent.agent.tools import Tool, tool

__all__ = ["BUILTIN_TOOLS", "DEFAULT_TOOLS", "workspace_tools"]

BUILTIN_TOOLS = ("read_file", "list_dir", "write_file", "shell")
DEFAULT_TOOLS = ("read_file", "list_dir")
_COMMAND_SEPARATORS = (";", "|", "||", "&", "&&", "(", ")", "\n")
_HARMLESS_ABSOLUTE = ("/dev/null", "/dev/stdin", "/dev/stdout", "/dev/stderr")


def workspace_tools(
    workdir: str | os.PathLike[str],
    names: tuple[str, ...] | list[str] = DEFAULT_TOOLS,
    *,
    shell_timeout: float = 60.0,
    unrestricted_shell: bool = False,
    max_output_chars: int = 20_000,
) -> list[Tool]:
    """The named built-in tools bound to `workdir` (which must exist)."""
    root = Path(workdir).resolve()
    if not root.is_dir():
        raise ValueError(f"workdir: {str(workdir)!r} is not a directory")
    if not shell_timeout > 0:
        raise ValueError(f"shell_timeout: expected seconds > 0, got {shell_timeout}")
    unknown = sorted(set(names) - set(BUILTIN_TOOLS))
    if unknown:
        raise ValueError(f"tools: unknown built-in tool(s) {unknown}; available: {', '.join(BUILTIN_TOOLS)}")

    def inside(path: str) -> Path:
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root):
            raise PermissionError(f"{path!r} is outside the working directory")
        return resolved

    @tool
    def read_file(path: str, start_line: int = 1, max_lines: int = 400) -> str:
        """Read a text file of the working directory; lines are numbered.

        Args:
            path: file path relative to the working directory.
            start_line: first line to show (1-based).
            max_lines: how many lines to show at most.
        """
        lines = inside(path).read_text(encoding="utf-8", errors="replace").splitlines()
        first = max(start_line, 1) - 1
        shown = lines[first : first + max(max_lines, 1)]
        text = "\n".join(f"{first + i + 1:>6}\t{line}" for i, line in enumerate(shown))
        if first + len(shown) < len(lines):
            text += f"\n[... {len(lines) - first - len(shown)} more lines; use start_line]"
        return _truncate(text, max_output_chars)

    @tool
    def list_dir(path: str = ".") -> str:
        """List a directory of the working directory (directories end with '/').

        Args:
            path: directory path relative to the working directory.
        """
        entries = sorted(inside(path).iterdir(), key=lambda p: p.name)
        return _truncate("\n".join(p.name + ("/" if p.is_dir() else "") for p in entries), max_output_chars)

    @tool
    def write_file(path: str, content: str) -> str:
        """Create or overwrite a text file in the working directory (parent directories are created).

        Args:
            path: file path relative to the working directory.
            content: the complete new file content.
        """
        target = inside(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        return f"wrote {len(content)} characters to {target.relative_to(root)}"

    @tool(timeout=shell_timeout + 10)  # the shell's own timeout fires first and kills the process group
    async def shell(command: str) -> str:
        """Run a bash command in the working directory and return its exit code and output (stdout and
        stderr merged). Commands time out; avoid interactive programs.

        Args:
            command: the bash command line.
        """
        if not unrestricted_shell:
            _check_shell_paths(command, root)
        env = {**os.environ, "HOME": str(root), "PWD": str(root)}
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", command, cwd=root, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), shell_timeout)
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            return f"Error: the command timed out after {shell_timeout:g}s and was killed"
        except asyncio.CancelledError:
            _kill_group(proc)
            raise
        text = out.decode("utf-8", errors="replace")
        return _truncate(f"exit code: {proc.returncode}\n{text}", max_output_chars)

    available = {t.name: t for t in (read_file, list_dir, write_file, shell)}
    return [available[n] for n in dict.fromkeys(names)]


def _check_shell_paths(command: str, root: Path) -> None:
    # Split like the shell: words, quotes, and operators (; | & < > parentheses) as separate tokens. Comments
    # are scanned too (shlex would cut at a '#' inside a word, where bash does not).
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        words = list(lexer)
    except ValueError as e:
        raise ValueError(f"cannot parse the command ({e})") from e
    command_position = True
    for word in words:
        # A program named by absolute path is allowed where a command starts (e.g. a venv's python); its
        # arguments are checked like any other word.
        if command_position and os.path.isabs(word) and os.access(word, os.X_OK) and Path(word).is_file():
            command_position = False
            continue
        command_position = word in _COMMAND_SEPARATORS
        # Look at every path-like piece, also inside `--opt=/path` and `a:/b` forms.
        for piece in word.replace("=", " ").replace(":", " ").split():
            if piece.startswith("~"):
                raise PermissionError(f"{piece!r}: the home directory is outside the working directory")
            if piece.startswith("/") and piece not in _HARMLESS_ABSOLUTE:
                candidate = Path(piece)
            elif ".." in Path(piece).parts:
                candidate = root / piece
            else:
                continue
            if not candidate.resolve().is_relative_to(root):
                raise PermissionError(
                    f"{piece!r} is outside the working directory (the shell is confined to it; the user can "
                    "allow more with --unrestricted-shell)"
                )


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _truncate(text: str, limit: int) -> str:
    """Keep the head and the tail: errors tend to be at the end of long outputs."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit // 2], text[-(limit // 2) :]
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters cut ...]\n{tail}"
