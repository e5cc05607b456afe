"""`nf cozen status/apply/remove`: the names each node presents, and making reality match the config."""
from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from engine import client
from nftui.options import ConfigOpt, JsonOpt
from nftui.output import EXIT_ERROR, console, errors, print_json

app = typer.Typer(help="Cozen identities: each passive's own names in DNS, the directory and NetBIOS.",
                  no_args_is_help=True)


@app.command()
def status(config: ConfigOpt = None, json: JsonOpt = False) -> None:
    """Per node: the names it presents, and whether DNS, directory and NetBIOS have them, verified."""
    with errors(json):
        answers = client.ask_all(config, "cozen")
    if json:
        print_json({"nodes": answers})
    else:
        _table(answers, "Cozen identities")
    raise typer.Exit(_exit_code(answers))


@app.command()
def apply(config: ConfigOpt = None, json: JsonOpt = False) -> None:
    """Make every node present the names of its current role now (changes only what differs)."""
    with errors(json):
        answers = client.ask_all(config, "cozen_apply", timeout=60)
    if json:
        print_json({"nodes": answers})
    else:
        _table(answers, "Applied")
        changed = sum(p.get("changed", False) for a in answers for p in a.get("providers", {}).values())
        console.print(f"{changed} change(s)." if changed else "Nothing to change: every name was already in place.")
    raise typer.Exit(_exit_code(answers))


@app.command()
def remove(
    node: Annotated[str, typer.Argument(help="The node that left the cluster (a passive, not this one).")],
    config: ConfigOpt = None,
    json: JsonOpt = False,
) -> None:
    """Take a node's cozen names out of DNS and the directory (it left the cluster)."""
    with errors(json):
        answer = client.ask_active(config, "cozen_remove", timeout=60, node=node)
    if json:
        print_json(answer)
    else:
        for name, p in answer["providers"].items():
            console.print(f"{name}: " + (f"[red]{p['error']}[/]" if p["error"] else f"removed ({p['detail']})"),
                          highlight=False)
    raise typer.Exit(_exit_code([answer]))


def _exit_code(answers: list[dict[str, Any]]) -> int:
    """1 when a node did not answer or a configured provider failed: scripts can trust it."""
    failed = any("error" in a or any(p.get("error") for p in a.get("providers", {}).values()) for a in answers)
    return EXIT_ERROR if failed else 0


def _table(answers: list[dict[str, Any]], title: str) -> None:
    """One row per node with a mark per provider; errors in full below the table (they are the fix)."""
    table = Table(title=title, title_justify="left")
    for col in ("node", "role", "presents", "dns", "directory", "netbios"):
        table.add_column(col)
    problems: list[str] = []
    for a in answers:
        if "error" in a:
            table.add_row(a["node"], "?", "[red]no answer[/]", "", "", "")
            problems.append(f"{a['node']}: {a['error']}")
            continue
        cells = []
        for name in ("dns", "directory", "netbios"):
            p = a["providers"][name]
            if not p["configured"]:
                cells.append("[dim]-[/]")
            elif p["error"]:
                cells.append("[red]failed[/]")
                problems.append(f"{a['node']} {name}: {p['error']}")
            elif p["registered"]:
                cells.append("[green]ok[/]" + (", verified" if p["verified"] else ""))
            else:
                cells.append(p["detail"] or "not registered")
        table.add_row(a["node"], a["role"] or "?", a["presented"], *cells)
    console.print(table)
    for line in problems:
        console.print(f"[red]{line}[/]", highlight=False)
    if any(not p["configured"] for a in answers if "error" not in a for p in a["providers"].values()):
        console.print("-: not configured in cluster.toml ([dns], [directory], [netbios])", markup=False, style="dim")
