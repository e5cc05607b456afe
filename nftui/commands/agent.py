"""`nf agent`: run one node's agent in the foreground."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nftui.output import errors


def agent(
    config: Annotated[Path, typer.Option("--config", "-c", help="This node's node.toml (cluster.toml is found beside it or one directory up).")],
) -> None:
    """Run this node's agent until SIGTERM."""
    from engine.agent import run_agent

    with errors(False):
        raise typer.Exit(run_agent(config))
