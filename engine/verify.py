"""Verify: compare the active with every passive by block hashes, and optionally repair.

Verify first lets replication drain (the passive has applied everything journaled so far), so
what it reports are real differences rather than records still in flight. Repair ships only the
blocks that differ, through the same link and receive queue as replication, then compares again.

On a tree of terabytes the passive hashes for an hour, so a verify reports how far it has come
(`VerifyProgress`, in the active's status) and gives up on a passive that stops answering
rather than waiting on it for ever.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from engine.errors import NfError
from engine.journaler import shipped_totals

if TYPE_CHECKING:
    from engine.agent import Agent
    from engine.state import State

DRAIN_TIMEOUT = 120.0

#: A passive silent (no heartbeat) for this many failover timeouts, and at least
#: SILENCE_FLOOR seconds, is given up on: its part of the verify says so.
SILENCE_TIMEOUTS = 10
SILENCE_FLOOR = 5.0

T = TypeVar("T")


@dataclass
class VerifyProgress:
    """Where a running verify is: which passive, which step, and how much of its tree the
    passive has listed against what the active journaled."""

    repair: bool
    files: int = 0  # the active's, as journaled: what a level passive lists
    bytes: int = 0
    node: str = ""
    step: str = "draining"  # draining | listing | repairing | checking again
    started: float = field(default_factory=time.monotonic)
    _listed: dict[int, tuple[int, int]] = field(default_factory=dict)  # manifest request -> (files, bytes)

    def begin(self, node: str, step: str) -> None:
        self.node, self.step = node, step
        self._listed.clear()

    def listed(self, request: int, files: int, nbytes: int) -> None:
        self._listed[request] = (files, nbytes)

    def to_json(self) -> dict[str, Any]:
        files = sum(f for f, _ in self._listed.values())
        nbytes = sum(b for _, b in self._listed.values())
        return {"repair": self.repair, "node": self.node, "step": self.step,
                "listed_files": files, "listed_bytes": nbytes, "files": self.files, "bytes": self.bytes,
                "seconds": round(time.monotonic() - self.started, 1)}


async def run_verify(agent: "Agent", *, repair: bool) -> dict[str, Any]:
    progress = agent.verifying = VerifyProgress(repair)  # before any await: one verify at a time
    try:
        progress.files, progress.bytes = await asyncio.to_thread(_totals, agent.state)
        return await _verify(agent, progress)
    finally:
        agent.verifying = None


async def _verify(agent: "Agent", progress: VerifyProgress) -> dict[str, Any]:
    repair = progress.repair
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
            progress.begin(spec.id, "draining")
            await wait_applied(agent, spec.id, head)
            trees = [t.rel for t in agent.cluster.protected]
            progress.begin(spec.id, "listing")
            found = await while_answering(agent, spec.id, sender.compare(trees, on_progress=progress.listed))
            entry: dict[str, Any] = {"id": spec.id, "checked": True, "error": "",
                                     "differences": [d.to_json() for d in found]}
            if repair and found:
                progress.begin(spec.id, "repairing")
                await while_answering(agent, spec.id, sender.send_repairs(found))
                # The passive applies the repairs before it answers the next manifest request.
                progress.begin(spec.id, "checking again")
                left = await while_answering(agent, spec.id, sender.compare(trees, on_progress=progress.listed))
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
        "seconds": round(time.monotonic() - progress.started, 3),
    }
    level = "info" if result["equal"] else "warning"
    agent.event(level, "verify", f"verify{' --repair' if repair else ''}: {total} difference(s)"
                + (f", {remaining} left after repair" if repair else ""), differences=total)
    return result


async def while_answering(agent: "Agent", node: str, work: Awaitable[T]) -> T:
    """The result of `work`, unless `node` falls silent first (TimeoutError) or its link closes
    (ConnectionError): a passive that froze would otherwise hold the verify for ever."""
    bound = max(SILENCE_FLOOR, SILENCE_TIMEOUTS * agent.cluster.heartbeat.failover_timeout)
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return task.result()
            if node not in agent.senders:
                raise ConnectionError(f"channel to {node} closed")
            silent = agent.silent_for(node)
            if silent is not None and silent > bound:
                raise TimeoutError(f"{node} stopped answering (no heartbeat for {silent:.0f} s)")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _totals(state: "State") -> tuple[int, int]:
    db = state.connect()  # its own connection: this runs in a thread
    try:
        return shipped_totals(db)
    finally:
        db.close()


async def quiesce(agent: "Agent") -> int:
    """The journal head once every change made on disk before this call is journaled: what a
    passive must apply. (An empty coalescer said less: events still in the kernel's inotify queue,
    or in the capture thread's hands, were not counted.)"""
    try:
        return await asyncio.wait_for(agent.journaled_now(), DRAIN_TIMEOUT)
    except TimeoutError:  # capture stalled: what is journaled is what there is to drain
        return agent.state.journal_head()


async def wait_applied(agent: "Agent", node: str, head: int) -> None:
    """Until `node` has applied up to `head` and is not syncing. A passive whose sync will
    outlast the wait (a new node copying terabytes) is given up on at once, with how far its
    sync has come, rather than after keeping the operator waiting for nothing."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    progress = agent.progress[node]
    while progress.acked_applied < head or progress.syncing:
        sync = progress.sync.to_json() if progress.sync is not None else None
        left = deadline - time.monotonic()
        if sync is not None and (left < 0 or (sync["eta_seconds"] or 0) > left):
            eta = f", about {sync['eta_seconds']:.0f} s left" if sync["eta_seconds"] is not None else ""
            raise TimeoutError(f"{node} is in its {sync['reason']} ({sync['percent']:g} % done{eta}): "
                               "try again once nf status shows it level")
        if left < 0:
            raise TimeoutError(f"{node} did not apply up to {head} within {DRAIN_TIMEOUT:.0f} s")
        if node not in agent.senders:
            raise ConnectionError(f"channel to {node} closed")
        await asyncio.sleep(0.05)
