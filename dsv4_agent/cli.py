"""`dsv4-agent` command line: `serve` (the OpenAI-compatible server), `chat` and `run` (the agent CLI)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: dsv4-agent {serve,chat,run} [args...]   (dsv4-agent COMMAND --help for details)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv:  # a missing command is a usage error, as for any other bad invocation
        print(usage, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from dsv4_agent.serve.cli import main as serve_main

        return serve_main(rest)
    if command in ("chat", "run"):
        from dsv4_agent.agent.cli import main as agent_main

        return agent_main([command, *rest])
    print(f"dsv4-agent: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
