"""`nf switchover`: a planned role change that loses nothing."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from engine import client
from nftui.options import ConfigOpt, JsonOpt
from nftui.output import console, errors, print_json


def switchover(
    to: Annotated[Optional[str], typer.Option("--to", help="The passive to make active (default: the most up to date).")] = None,
    config: ConfigOpt = None,
    json: JsonOpt = False,
) -> None:
    """Drain replication, move the public identity to a passive, and report the service gap."""
    with errors(json):
        args = {"to": to} if to else {}
        if json:
            doc = client.ask_active(config, "switchover", timeout=600, **args)
        else:
            with console.status("switching over: draining replication, then handing over…"):
                doc = client.ask_active(config, "switchover", timeout=600, **args)
    if json:
        print_json(doc)
        return
    if doc["took_over"]:
        console.print(f"{doc['to']} is active; {doc['from']} follows it. Service unavailable "
                      f"{doc['unavailable_seconds']:.3f} s, {doc['lost_records']} records lost.")
    else:
        console.print(f"[red]{doc['to']} did not take over within the timeout; see nf why[/]")
        raise typer.Exit(1)
