"""`python -m dsv4_agent.launch_server [flags]`: the same as `dsv4-agent serve [flags]`
(mirrors `python -m sglang.launch_server`)."""

import sys

from dsv4_agent.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
