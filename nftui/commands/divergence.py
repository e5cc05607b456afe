"""`nf divergence list/show`: writes a stale active made after the fork, kept aside, never merged."""
from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from engine import client
from nftui.options import ConfigOpt, JsonOpt
from nftui.output import console, errors, print_json

app = typer.Typer(help="Writes a stale active made after another node took over, kept aside for you.",
                  no_args_is_help=True)


@app.command("list")
def list_(config: ConfigOpt = None, json: JsonOpt = False) -> None:
    """List every node's divergences: when, at which epoch, how many paths."""
    with errors(json):
        answers = [dict({"divergences": []}, **a) for a in client.ask_all(config, "divergences")]
    if json:
        print_json({"nodes": answers})
        return
    found = False
    for a in answers:
        if "error" in a:
            console.print(f"[bold]{a['node']}[/]: [red]{a['error']}[/]")
            continue
        for d in a["divergences"]:
            found = True
            when = dt.datetime.fromtimestamp(d["ts"]).strftime("%Y-%m-%d %H:%M:%S")
            console.print(f"[bold]{a['node']}[/] #{d['id']}  {when}  superseded at epoch {d['epoch']}  "
                          f"{d['paths']} path(s)  in {d['directory']}", highlight=False)
    if not found:
        console.print("No divergences: no node wrote anything after another took over.")
    else:
        console.print("See one with: nf divergence show --node NODE ID")


@app.command()
def show(
    div_id: Annotated[int, typer.Argument(metavar="ID", min=1, help="The divergence id from nf divergence list.")],
    node: Annotated[str, typer.Option("--node", help="The node that kept it.")],
    config: ConfigOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show the paths of one divergence and where their kept copies are."""
    with errors(json):
        agents = [a for a in client.find_agents(config) if a.node == node]
        if not agents:
            raise client.NfError(f"no node {node!r} in this cluster", hint="nf divergence list names the nodes")
        answer = client.request(agents[0].socket, "divergence", timeout=10, id=div_id)
    if json:
        print_json(answer)
        return
    console.print(f"[bold]{answer['node']}[/] divergence #{answer['id']}: superseded at epoch {answer['epoch']}, "
                  f"after record {answer['fork_seq']}; copies in {answer['directory']}", highlight=False)
    for p in answer["paths"]:
        detail = {"file": f"{p.get('size', 0)} bytes", "symlink": f"-> {p.get('target')}",
                  "missing": "deleted after the fork"}.get(p["kind"], p["kind"])
        console.print(f"  {p['path']}  ({detail})", highlight=False)
