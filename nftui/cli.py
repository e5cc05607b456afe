"""The `nf` command: wires one sub-app per noun; the commands live in nftui.commands."""
from __future__ import annotations

import typer

from nftui.commands import agent, cozen, demo, divergence, failover, init, status, switchover, verify, why

app = typer.Typer(
    name="nf",
    help="nf: clone-based high availability for Linux servers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(agent.agent)
app.command()(init.init)
app.command()(status.status)
app.command()(verify.verify)
app.command()(why.why)
app.command()(failover.failover)
app.command()(switchover.switchover)
app.add_typer(demo.app, name="demo")
app.add_typer(divergence.app, name="divergence")
app.add_typer(cozen.app, name="cozen")


def main() -> None:
    app()
