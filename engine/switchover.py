"""Planned switchover: drain, release, hand over. Nothing journaled before it is lost.

Steps, each an event: stop applications (none are configured yet), journal every captured change
and wait until the target has applied the journal head, stop capture and release the public
identity, journal whatever was written in between with a last rescan and drain that too, then
tell the target to take over (`handover`) and follow it as a passive. The unavailability
reported is the time from the release until the target answers on the public identity.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from engine.capture import Change
from engine.errors import NfError
from engine.identity import probe
from engine.verify import quiesce, wait_applied

if TYPE_CHECKING:
    from engine.agent import Agent

TAKEOVER_TIMEOUT = 30.0


async def switchover(agent: "Agent", target: str) -> dict[str, Any]:
    t0 = time.monotonic()
    source = agent.node.id
    agent.event("warning", "switchover", f"switchover {source} -> {target} started: stopping applications")
    if agent._serve_task is not None:  # the monitor must not restart what is being stopped
        agent._serve_task.cancel()
    await agent.apps.stop_all()  # no writes after this point come from the protected applications
    head = await quiesce(agent)
    await wait_applied(agent, target, head)

    released = time.monotonic()
    await agent._leave_role()  # capture stopped, identity released
    last = (await asyncio.to_thread(agent.journaler.process,
                                    [Change("rescan", tree.rel) for tree in agent.cluster.protected])).records
    for ev in agent.journal_wake:
        ev.set()
    head = agent.state.journal_head()
    await wait_applied(agent, target, head)

    link = agent.channel.links.get(target)
    if link is None:
        raise NfError(f"the channel to {target} closed during the switchover",
                      hint=f"{source} released the public identity; nf failover --force --to {target} finishes it")
    agent.state.put(role="passive")
    await link.send("handover", {"head": head})
    for other in list(agent.channel.links.values()):
        other.close()
    await agent._enter_role()

    taken = None
    deadline = time.monotonic() + TAKEOVER_TIMEOUT
    while time.monotonic() < deadline:
        answer = await probe(agent.cluster.name, agent.cluster.public.addresses)
        if answer is not None and answer.node == target:
            taken = time.monotonic()
            break
        await asyncio.sleep(0.01)
    result = {
        "from": source, "to": target, "drained_seq": head, "records_after_release": last,
        "lost_records": 0, "took_over": taken is not None,
        "unavailable_seconds": round(taken - released, 3) if taken else None,
        "seconds": round(time.monotonic() - t0, 3),
    }
    agent.event("warning", "switchover",
                f"switchover {source} -> {target}: " + (f"service unavailable {result['unavailable_seconds']} s, "
                                                          "nothing lost" if taken else "target did not take over"),
                **{k: v for k, v in result.items() if k in ("unavailable_seconds", "drained_seq")})
    return result
