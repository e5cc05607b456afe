"""`nf verify`: compare the active with its passives by block hashes."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from engine import client
from nftui.options import ConfigOpt, JsonOpt
from nftui.output import EXIT_DIFFERENCES, EXIT_ERROR, console, errors, print_json


def verify(
    config: ConfigOpt = None,
    json: JsonOpt = False,
    repair: Annotated[bool, typer.Option("--repair", help="Ship the active's version of every difference.")] = False,
) -> None:
    """Report every difference between the active and the passives (exit 4 if any remain)."""
    with errors(json):
        if json:
            doc = client.ask_active(config, "verify", repair=repair)
        else:
            with console.status("verifying: draining replication, then comparing block hashes…"):
                doc = client.ask_active(config, "verify", repair=repair)
    if json:
        print_json(doc)
    else:
        _print(doc)
    if any(not n["checked"] for n in doc["nodes"]):
        raise typer.Exit(EXIT_ERROR)
    if doc["remaining"]:
        raise typer.Exit(EXIT_DIFFERENCES)


def _print(doc: dict) -> None:
    for n in doc["nodes"]:
        if not n["checked"]:
            console.print(f"[red]{n['id']}: not checked: {n['error']}[/]")
            continue
        diffs = n["differences"]
        if not diffs:
            console.print(f"[green]{n['id']}: equal to the active[/]")
            continue
        table = Table(title=f"{n['id']}: {len(diffs)} difference(s)", title_justify="left")
        table.add_column("path")
        table.add_column("difference")
        for d in diffs[:200]:
            table.add_row(d["path"], d["kind"])
        console.print(table)
        if "repaired" in n:
            console.print(f"repaired {n['repaired']}, {len(n['remaining'])} remaining")
    if doc["remaining"] and not doc["repair"]:
        console.print("[dim]Hint: nf verify --repair ships the active's version of each difference.[/]")
