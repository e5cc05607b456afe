"""`nf verify`: compare the active with its passives by block hashes."""
from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine import client
from nftui.options import ConfigOpt, JsonOpt
from nftui.output import EXIT_DIFFERENCES, EXIT_ERROR, console, errors, print_json


def verify(
    config: ConfigOpt = None,
    json: JsonOpt = False,
    repair: Annotated[bool, typer.Option("--repair", help="Ship the active's version of every difference.")] = False,
) -> None:
    """Report every difference between the active and the passives (exit 4 if any remain).

    Runs as long as the active agent keeps answering; Ctrl-C stops the verify in the agent too.
    """
    with errors(json):
        if json:
            doc = client.run_on_active(config, "verify", repair=repair)
        else:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                          TimeElapsedColumn(), console=console, transient=True) as bar:
                task = bar.add_task("verifying: draining replication", total=None)
                doc = client.run_on_active(config, "verify", on_status=lambda st: _show(bar, task, st),
                                           repair=repair)
    if json:
        print_json(doc)
    else:
        _print(doc)
    if any(not n["checked"] for n in doc["nodes"]):
        raise typer.Exit(EXIT_ERROR)
    if doc["remaining"]:
        raise typer.Exit(EXIT_DIFFERENCES)


#: What the passive is doing at each step of a verify, for the progress line.
_STEPS = {"draining": "waiting until {node} has applied everything", "listing": "{node} hashing its tree",
          "repairing": "repairing {node}", "checking again": "{node} hashing its tree again"}


def _show(bar: Progress, task: TaskID, status: dict[str, Any]) -> None:
    """The progress line from the active's status: the passive's hashed bytes against the
    active's journaled ones while it lists its tree, a pulse otherwise."""
    v = status.get("verify")
    if not v or not v["node"]:
        return
    text = "verifying: " + _STEPS.get(v["step"], v["step"] + " {node}").format(node=v["node"])
    if v["step"] in ("listing", "checking again"):
        bar.update(task, description=text, total=max(v["bytes"], v["listed_bytes"]) or None,
                   completed=v["listed_bytes"])
    else:
        bar.update(task, description=text, total=None, completed=0)


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
