"""`nf why`: the decision journal — why the cluster did or did not fail over, cycle by cycle."""
from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from engine import client
from nftui.options import ConfigOpt, JsonOpt
from nftui.output import console, errors, print_json


def why(
    config: ConfigOpt = None,
    json: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100, help="How many decisions per node.")] = 10,
) -> None:
    """Show each node's latest HA decisions, one sentence each."""
    with errors(json):
        answers = []
        for agent in client.find_agents(config):
            try:
                answers.append(client.request(agent.socket, "why", timeout=10, limit=limit))
            except client.NfError as exc:
                answers.append({"node": agent.node, "error": exc.message, "decisions": []})
        if not any("error" not in a for a in answers):
            raise client.AgentUnreachable("no agent of the cluster answered",
                                          hint="start the agents (nf agent --config NODE.toml, or nf demo up)")
    if json:
        print_json({"nodes": answers})
        return
    for a in answers:
        if "error" in a:
            console.print(f"[bold]{a['node']}[/]: [red]{a['error']}[/]")
            continue
        console.print(f"[bold]{a['node']}[/] ({a['role']}, epoch {a['epoch']})")
        for d in a["decisions"]:
            when = dt.datetime.fromtimestamp(d["ts"]).strftime("%H:%M:%S.%f")[:-3]
            style = "yellow" if d["action"] != "none" else ""
            console.print(f"  {when}  [{style}]{d['sentence']}[/]" if style else f"  {when}  {d['sentence']}",
                          highlight=False)
