"""Options shared by every command, declared once."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="The cluster's cluster.toml (default: $NF_CONFIG, then /etc/nf/cluster.toml).",
                 show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a stable JSON document instead of a table.")]
WatchOpt = Annotated[bool, typer.Option("--watch", "-w", help="Refresh every second until interrupted.")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-d", help="Directory holding the demo cluster.")]
