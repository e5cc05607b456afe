"""`nf failover --force --to NODE`: promote a node now, for operators who have decided."""
from __future__ import annotations

from typing import Annotated

import typer

from engine import client
from engine.errors import NfError
from nftui.options import ConfigOpt, JsonOpt
from nftui.output import console, errors, print_json


def failover(
    to: Annotated[str, typer.Option("--to", help="The node to promote.")],
    force: Annotated[bool, typer.Option("--force", help="Required: skip the automatic checks.")] = False,
    config: ConfigOpt = None,
    json: JsonOpt = False,
) -> None:
    """Promote NODE at a new epoch without waiting for the failover checks."""
    with errors(json):
        if not force:
            raise NfError("a manual failover skips the split-brain checks; say --force to confirm",
                          hint="nf why shows why the cluster has not failed over on its own")
        agent = next((a for a in client.find_agents(config) if a.node == to), None)
        if agent is None:
            raise NfError(f"--to {to!r}: no agent of that node found beside the cluster config")
        doc = client.request(agent.socket, "failover", timeout=60, force=True)
    if json:
        print_json(doc)
    else:
        console.print(f"{doc['node']}: {doc['outcome']} (epoch {doc['epoch']})")
