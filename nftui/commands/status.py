"""`nf status`: one line per node, from whichever agent of the cluster answers."""
from __future__ import annotations

import time
from typing import Any

from rich.live import Live
from rich.table import Table

from engine import client
from nftui.options import ConfigOpt, JsonOpt, WatchOpt
from nftui.output import console, errors, print_json


def status(config: ConfigOpt = None, json: JsonOpt = False, watch: WatchOpt = False) -> None:
    """Show every node: role, connection, queues, applied sequence and replication lag."""
    with errors(json):
        doc = client.ask_any(config, "status")
        if json and not watch:
            print_json(doc)
            return
        if json:
            while True:
                print_json(doc)
                time.sleep(1)
                doc = client.ask_any(config, "status")
        if not watch:
            console.print(render(doc))
            return
        with Live(render(doc), console=console, refresh_per_second=2) as live:
            try:
                while True:
                    time.sleep(1)
                    live.update(render(client.ask_any(config, "status")))
            except KeyboardInterrupt:
                pass


def render(doc: dict[str, Any]) -> Table:
    table = Table(title=f"cluster {doc['cluster']} · epoch {doc['epoch']} · answered by {doc['answered_by']}",
                  title_justify="left")
    for col in ("node", "role", "link", "send queue", "recv queue", "applied", "lag", "error"):
        table.add_column(col, justify="right" if col in ("applied", "lag") else "left", no_wrap=col != "error")
    for n in doc["nodes"]:
        role = n["role"]
        style = "bold green" if role == "active" else "cyan" if role == "passive" else "red"
        state = "[green]yes[/]" if n["connected"] else "[red]no[/]"
        if n.get("syncing"):
            state += " [yellow]syncing" + _progress(n.get("sync")) + "[/]"
        table.add_row(
            n["id"], f"[{style}]{role}[/]", state,
            _queue(n["send_queue_records"], n["send_queue_bytes"]),
            _queue(n["receive_queue_records"], n["receive_queue_bytes"]),
            str(n["applied_seq"]), f"{n['lag_seconds']:.2f} s", n.get("last_error") or "",
        )
    if doc.get("verify"):
        table.caption, table.caption_justify = _verifying(doc["verify"]), "left"
    return table


def _verifying(v: dict[str, Any]) -> str:
    """A running verify as "verify running 31 s: listing secondary, 1.2 GiB of 2.5 GiB hashed"."""
    hashed = (f", {_bytes(v['listed_bytes'])} of {_bytes(v['bytes'])} hashed"
              if v["step"] in ("listing", "checking again") else "")
    return f"verify{' --repair' if v['repair'] else ''} running {v['seconds']:.0f} s: {v['step']} {v['node']}{hashed}"


def _progress(sync: dict[str, Any] | None) -> str:
    """A sync's progress as " 42%, 1m05s left" (nothing while it has none)."""
    if not sync:
        return ""
    eta = sync.get("eta_seconds")
    if eta is None:
        return f" {sync['percent']:.0f}%"
    minutes, seconds = divmod(round(eta), 60)
    return f" {sync['percent']:.0f}%, {f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'} left"


def _queue(records: int, size: int) -> str:
    return f"{records}/{_bytes(size)}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
