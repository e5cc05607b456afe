"""The agent process without the console's libraries: `python -m engine.daemon --config NODE_TOML`.

`nf agent` runs the same `run_agent`, but imports typer and rich first: 0.15 s more start-up for
a passive, which its sync waits out. The demo and the test bed start agents this way; a systemd
unit may use either.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.daemon",
        description="Run this node's agent until SIGTERM (what `nf agent` does, with fewer imports).")
    parser.add_argument("--config", "-c", type=Path, required=True,
                        help="this node's node.toml (cluster.toml is found beside it or one directory up)")
    args = parser.parse_args(argv)
    from engine.agent import run_agent
    from engine.errors import NfError

    try:
        return run_agent(args.config)
    except NfError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"Hint: {exc.hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
