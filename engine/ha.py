"""The role state machine: each cycle decides on one frozen snapshot and says why.

`decide` is pure: it takes a `Snapshot` (what this node knows right now: its role and epoch,
what it last heard from each peer, probe results) and returns a `Decision` whose `sentence`
is logged, stored as an event and shown by `nf why`. The agent carries out the action; tests
build snapshots and assert sentences. Checks run in the order DESIGN.md gives, and the first
that fails ends the cycle, so the sentence always names the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerView:
    """What this node last heard from one peer."""

    id: str
    role: str | None = None
    epoch: int = 0
    silent_for: float | None = None  # seconds since its last message; None: never heard
    applied_seq: int = 0
    connected: bool = False


@dataclass(frozen=True)
class Snapshot:
    node: str
    role: str
    epoch: int
    peers: tuple[PeerView, ...]
    failover_timeout: float
    queue_records: int = 0  # receive queue not yet applied
    applied_seq: int = 0
    active_answers: bool | None = None  # the last active's public/management address, probed from here
    public_ok: bool | None = None  # the public network probes (gateway, DNS); None: none configured
    intent: str | None = None  # "failover" (nf failover --force) or "switchover from NODE"
    level: bool = True  # this passive has been level with an active at least once

    def peer(self, node: str) -> PeerView | None:
        return next((p for p in self.peers if p.id == node), None)


@dataclass(frozen=True)
class Decision:
    action: str  # "none" | "promote" | "demote" | "step_down" | "adopt" (a higher epoch, as passive)
    sentence: str
    epoch: int = 0  # the epoch to adopt when the action changes role
    facts: dict[str, object] = field(default_factory=dict)


def decide(s: Snapshot) -> Decision:
    """One HA cycle's decision for this node."""
    higher = max(s.peers, key=lambda p: p.epoch, default=None)
    if s.role == "active":
        return _as_active(s, higher)
    return _as_passive(s)


def _as_active(s: Snapshot, higher: PeerView | None) -> Decision:
    if higher is not None and higher.epoch > s.epoch:
        return Decision("step_down", f"stepping down: {higher.id} is at epoch {higher.epoch}, above ours ({s.epoch})",
                        epoch=higher.epoch)
    heard = [p for p in s.peers if _alive(p, s.failover_timeout)]
    if not heard and s.public_ok is False:
        return Decision("demote", "demoting myself: every peer silent and the public network unreachable "
                        "(self-isolation)", epoch=s.epoch)
    if not heard:
        return Decision("none", "holding active: peers silent but the public network answers")
    names = ", ".join(p.id for p in heard)
    return Decision("none", f"holding active at epoch {s.epoch}: heard from {names}")


def _as_passive(s: Snapshot) -> Decision:
    if s.intent:
        epoch = max([s.epoch, *(p.epoch for p in s.peers)]) + 1
        why = "forced by the operator (nf failover --force)" if s.intent == "failover" else s.intent
        return Decision("promote", f"promoted {s.node}: {why}, epoch {epoch}", epoch=epoch)
    actives = [p for p in s.peers if p.role == "active"]
    active = max(actives, key=lambda p: (p.epoch, _alive(p, s.failover_timeout)), default=None)
    if active is None:
        return Decision("none", "waiting: no active node known yet")
    if _alive(active, s.failover_timeout):
        if active.epoch > s.epoch:
            return Decision("adopt", f"following {active.id} at epoch {active.epoch} (adopted; was {s.epoch})",
                            epoch=active.epoch)
        return Decision("none", f"following {active.id} at epoch {active.epoch}")
    silent = "never heard" if active.silent_for is None else f"silent for {active.silent_for:.1f} s"
    if not s.level:
        return Decision("none", f"not promoting: {active.id} {silent}, but this node was never level with "
                        "an active (its initial sync has not finished), so it holds no copy to serve")
    if s.queue_records:
        return Decision("none", f"not promoting: {active.id} {silent}, but {s.queue_records} received "
                        "record(s) are not applied yet")
    if s.active_answers:
        return Decision("none", f"not promoting: {active.id} {silent} on the channel, but its address still "
                        "answers (split-brain avoidance)")
    others = [p for p in s.peers if p.id != active.id]
    total = len(s.peers) + 1
    if total >= 3:
        reachable = 1 + sum(1 for p in s.peers if _alive(p, s.failover_timeout))
        if reachable * 2 <= total:
            return Decision("none", f"not promoting: {active.id} {silent}, but only {reachable} of {total} nodes "
                            "reachable (no majority)")
        better = [p for p in others if _alive(p, s.failover_timeout) and p.role == "passive"
                  and (p.applied_seq, _rank(p.id)) > (s.applied_seq, _rank(s.node))]
        if better:
            b = max(better, key=lambda p: p.applied_seq)
            return Decision("none", f"deferring to {b.id}: {active.id} {silent}, and {b.id} has applied "
                            f"{b.applied_seq} against our {s.applied_seq}")
    new_epoch = max([s.epoch, *(p.epoch for p in s.peers)]) + 1
    probe = "address unreachable" if s.active_answers is False else "address not probed"
    return Decision("promote", f"promoted {s.node}: {active.id} {silent}, {probe}, queue applied "
                    f"(applied {s.applied_seq}), epoch {new_epoch}", epoch=new_epoch)


def _alive(p: PeerView, timeout: float) -> bool:
    """Heard within the timeout. A dropped link alone is no failure: only silence past the timeout is."""
    return p.silent_for is not None and p.silent_for <= timeout


def _rank(node: str) -> int:
    """Ties go to the node listed first: primary, then secondary, then tertiary."""
    return {"primary": 2, "secondary": 1, "tertiary": 0}.get(node, 0)
