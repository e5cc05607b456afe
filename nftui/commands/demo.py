"""`nf demo`: a local cluster of real agents on loopback, for trying nf and for tests."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from nftui import demo as demo_cluster
from nftui.commands.status import render
from nftui.options import JsonOpt, WorkdirOpt
from nftui.output import console, errors, print_json

app = typer.Typer(help="Run a local demo cluster on loopback addresses.", no_args_is_help=True)


@app.command()
def up(
    workdir: WorkdirOpt = Path("demo"),
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=2, max=3, help="2 or 3 nodes.")] = 2,
    json: JsonOpt = False,
) -> None:
    """Create (if new) and start the demo cluster; return once every node is connected."""
    with errors(json):
        workdir = workdir.resolve()
        if not (workdir / "cluster.toml").exists():
            workdir.mkdir(parents=True, exist_ok=True)
            demo_cluster.create(workdir, nodes)
        for node in demo_cluster.node_ids(workdir):
            demo_cluster.start(workdir, node)
        if json:
            doc = demo_cluster.wait_connected(workdir)
        else:
            with console.status("starting agents and connecting the channel…"):
                doc = demo_cluster.wait_connected(workdir)
    if json:
        print_json(doc)
        return
    console.print(render(doc))
    primary = workdir / "primary" / "srv" / "data"
    console.print(f"Write files under [bold]{primary}[/] and watch them replicate:")
    console.print(f"  nf status --config {workdir / 'cluster.toml'} --watch")
    console.print(f"Stop it with: nf demo down --workdir {workdir}")


@app.command()
def down(workdir: WorkdirOpt = Path("demo")) -> None:
    """Stop every agent of the demo cluster (SIGTERM, clean shutdown)."""
    with errors(False):
        stopped = [n for n in demo_cluster.node_ids(workdir) if demo_cluster.stop(workdir, n)]
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def kill(node: Annotated[str, typer.Argument(help="primary, secondary or tertiary")],
         workdir: WorkdirOpt = Path("demo")) -> None:
    """Kill one agent with SIGKILL, as a crash would."""
    with errors(False):
        if not demo_cluster.stop(workdir, node, signal.SIGKILL):
            console.print(f"{node} was not running")
            raise typer.Exit(1)
    console.print(f"killed {node}; start it again with: nf demo start --workdir {workdir} {node}")


@app.command()
def start(node: Annotated[str, typer.Argument(help="primary, secondary or tertiary")],
          workdir: WorkdirOpt = Path("demo")) -> None:
    """Start one agent of the demo cluster again."""
    with errors(False):
        pid = demo_cluster.start(workdir, node)
    console.print(f"{node} running (pid {pid})")
