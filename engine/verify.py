"""Verify: compare the active with every passive by block hashes, and optionally repair.

Verify first lets replication drain (the passive has applied everything journaled so far), so
what it reports are real differences rather than records still in flight. Repair ships only the
blocks that differ, through the same link and receive queue as replication, then compares again.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from engine.errors import NfError

if TYPE_CHECKING:
    from engine.agent import Agent

DRAIN_TIMEOUT = 120.0


async def run_verify(agent: "Agent", *, repair: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    head = await quiesce(agent)
    nodes: list[dict[str, Any]] = []
    for spec in agent.cluster.nodes:
        if spec.id == agent.node.id:
            continue
        sender = agent.senders.get(spec.id)
        if sender is None:
            nodes.append({"id": spec.id, "checked": False, "error": "not connected", "differences": []})
            continue
        try:
            await wait_applied(agent, spec.id, head)
            trees = [t.rel for t in agent.cluster.protected]
            found = await sender.compare(trees)
            entry: dict[str, Any] = {"id": spec.id, "checked": True, "error": "",
                                     "differences": [d.to_json() for d in found]}
            if repair and found:
                await sender.send_repairs(found)
                # The passive applies the repairs before it answers the next manifest request.
                left = await sender.compare(trees)
                entry["repaired"] = len(found) - len(left)
                entry["remaining"] = [d.to_json() for d in left]
            nodes.append(entry)
        except (NfError, ConnectionError, TimeoutError) as exc:
            nodes.append({"id": spec.id, "checked": False, "error": str(exc) or type(exc).__name__,
                          "differences": []})
    total = sum(len(n["differences"]) for n in nodes)
    remaining = sum(len(n.get("remaining", n["differences"])) for n in nodes)
    result = {
        "journal_seq": head, "repair": repair, "nodes": nodes, "differences": total,
        "remaining": remaining if repair else total,
        "equal": all(n["checked"] for n in nodes) and (remaining if repair else total) == 0,
        "seconds": round(time.monotonic() - t0, 3),
    }
    level = "info" if result["equal"] else "warning"
    agent.event(level, "verify", f"verify{' --repair' if repair else ''}: {total} difference(s)"
                + (f", {remaining} left after repair" if repair else ""), differences=total)
    return result


async def quiesce(agent: "Agent") -> int:
    """Wait until captured changes are journaled; return the journal head to drain to."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while len(agent.coalescer) or agent.flush_needed.is_set():
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return agent.state.journal_head()


async def wait_applied(agent: "Agent", node: str, head: int) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    progress = agent.progress[node]
    while progress.acked_applied < head or progress.syncing:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node} did not apply up to {head} within {DRAIN_TIMEOUT:.0f} s")
        if node not in agent.senders:
            raise ConnectionError(f"channel to {node} closed")
        await asyncio.sleep(0.05)
