"""One node's agent: a single asyncio loop hosting the channel, replication and the API.

Role and epoch live in the state database. Until the role state machine lands, a new cluster
starts with `primary` active at epoch 1. Blocking work (hashing, journaling, applying) runs in
worker threads so heartbeats and the API never wait behind a large file.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import select
import signal
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.alerts import Alerter
from engine.api import ApiServer
from engine.applications import Applications
from engine.apply import OPS
from engine.buffers import trim_idle
from engine.barrier import CaptureBarrier
from engine.capture import Change, Coalescer, Watcher
from engine.channel import Channel, Link
from engine.config import ClusterConfig, NodeConfig, load_cluster, load_node, local_trees
from engine.cozen.manager import Cozen
from engine.divergence import Divergence, keep_divergence, list_divergences, show_divergence
from engine.errors import ApiError, ConfigError, ProtocolError
from engine.ha import Decision, PeerView, Snapshot, decide
from engine.identity import probe, provider_for
from engine.journaler import Journaler
from engine.netprobe import parse_target, probe_all
from engine.plugins import Plugins
from engine.protocol import Codec, Message
from engine.replication import FEATURES, ManifestWaiter, PeerProgress, Receiver, Sender
from engine.single import hold_node_lock
from engine.state import State, journal_upkeep
from engine.tls import client_context, server_context
from engine.switchover import switchover
from engine.verify import VerifyProgress, run_verify

log = logging.getLogger("nf.agent")

MAINTENANCE_INTERVAL = 1.0


def _active_silent(s: Snapshot) -> bool:
    """Whether the last known active has been silent past the timeout (worth probing)."""
    active = next((p for p in s.peers if p.role == "active"), None)
    return active is not None and not (active.silent_for is not None and active.silent_for <= s.failover_timeout)


def find_cluster_config(node_toml: Path) -> Path:
    """cluster.toml beside node.toml, or in its parent directory (the layout nf init writes)."""
    for candidate in (node_toml.parent / "cluster.toml", node_toml.parent.parent / "cluster.toml"):
        if candidate.exists():
            return candidate
    raise ConfigError(str(node_toml), "cluster.toml", "a cluster.toml beside node.toml or in its parent directory")


class Agent:
    def __init__(self, cluster: ClusterConfig, node: NodeConfig, plugins: Plugins | None = None) -> None:
        plugins = plugins or Plugins.load()
        # This node's identity files (its own, and those its plugins name) are outside what it
        # ships, compares or accepts.
        node = replace(node, local_files=tuple(dict.fromkeys((*node.local_files, *plugins.identity_files(node.id)))))
        cluster = replace(cluster, protected=local_trees(cluster.protected, node.local_files))
        self.cluster = cluster
        self.node = node
        self.state = State(node.state_dir)
        self._init_role()
        self.stopping = asyncio.Event()
        self.progress: dict[str, PeerProgress] = {}
        self.views: dict[str, dict[str, Any]] = {}
        self.manifests: dict[str, ManifestWaiter] = {}
        self.senders: dict[str, Sender] = {}
        self.verifying: VerifyProgress | None = None  # while a verify runs
        self.journal_wake: set[asyncio.Event] = set()
        self.receiver: Receiver | None = None
        self.watcher: Watcher | None = None
        self.barrier: CaptureBarrier | None = None  # while capture runs
        self.coalescer = Coalescer()
        self.flush_needed = asyncio.Event()
        self._capture_stop = threading.Event()
        self.last_error = ""
        self.started = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._role_tasks: list[asyncio.Task[Any]] = []
        self.ha_wake = asyncio.Event()
        self.capture_ready = asyncio.Event()
        self._serve_task: asyncio.Task[None] | None = None
        self.starting = True
        self.intent: str | None = None
        self.decisions: list[dict[str, Any]] = []
        self._last_shape = ""
        self.probes = tuple(parse_target(t) for t in cluster.heartbeat.probes)
        self.public_ok: bool | None = None  # None until probed, and always without probes
        self.alerter = Alerter(cluster.alerts, cluster.name, node.id)
        self.apps = Applications(cluster.applications, cluster.name, node.id, self.event)
        self.identity = provider_for(cluster.public.provider, cluster.name, node.id, cluster.public.addresses)
        self.cozen = Cozen(cluster, node.id, set_hostname=cluster.public.provider == "linux")
        peers = {n.id: (n.channel_host, n.channel_port) for n in cluster.nodes if n.id != node.id}
        me = cluster.node(node.id)
        self.channel = Channel(
            node_id=node.id, peers=peers, listen=(me.channel_host, me.channel_port),
            server_ctx=server_context(node), client_ctx=client_context(node),
            codec_factory=self._codec, hello=self._hello, epoch=lambda: self.epoch,
            on_link=self._on_link, on_refused=self._on_refused,
        )
        self.api = ApiServer(node.socket, {
            "ping": self._api_ping, "status": self._api_status, "verify": self._api_verify,
            "events": self._api_events, "rescan": self._api_rescan, "why": self._api_why,
            "failover": self._api_failover, "switchover": self._api_switchover,
            "divergences": self._api_divergences, "divergence": self._api_divergence,
            "cozen": self._api_cozen, "cozen_apply": self._api_cozen_apply, "cozen_remove": self._api_cozen_remove,
        }, hangup_cancels=frozenset({"verify"}))

    # -- role -------------------------------------------------------------------------
    def _init_role(self) -> None:
        if self.state.get("role") is None:
            role = "active" if self.node.id == "primary" else "passive"
            self.state.put(role=role, epoch=1, node_id=self.node.id)
        if self.role == "active" and self.state.get("journal_id") is None:
            self.state.put(journal_id=uuid.uuid4().hex, needs_baseline=1)

    @property
    def role(self) -> str:
        return self.state.get("role") or "passive"

    @property
    def epoch(self) -> int:
        return self.state.get_int("epoch")

    # -- lifecycle --------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.event("info", "agent_started", f"agent {self.node.id} started as {self.role} at epoch {self.epoch}")
        for tree in self.cluster.protected:
            (self.node.root / tree.rel).mkdir(parents=True, exist_ok=True)
        await self.channel.start()  # first: a taken address ends the start before anything is served
        await self.api.start()  # answers status while capture starts on a large tree
        if self.role == "active":
            await self._check_before_acting()
        self.starting = False
        self._spawn(self._heartbeat_loop())  # before capture: a long start-up scan must not look like silence
        if self.probes:
            self._spawn(self._probe_loop())
        await self._enter_role()
        self._spawn(self._maintenance_loop())
        self._spawn(self._ha_loop())
        await self.stopping.wait()
        await self._shutdown()

    async def _shutdown(self) -> None:
        self.event("info", "agent_stopped", f"agent {self.node.id} stopping on request")
        await self.api.stop()
        await self.cozen.close()
        await self._leave_role()
        await self.channel.stop()
        await self.alerter.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- role changes -----------------------------------------------------------------
    async def _enter_role(self) -> None:
        if self.role == "passive":
            self.receiver = Receiver(self.state, self.cluster, self.node, self.event)
            self._spawn_role(self.receiver.apply_forever())
            self._spawn(self._present("passive"))
        else:
            await self._start_capture()
            self._serve_task = asyncio.ensure_future(self._serve())
            self._serve_task.add_done_callback(self._task_done)

    async def _serve(self) -> None:
        """Take the public identity (it may wait for a frozen old holder), then run the applications."""
        await self.identity.take(self.epoch)
        self._spawn(self._present("active"))  # the public names come back; the service does not wait for them
        await self.apps.start_all()
        await self.apps.monitor_forever(self._application_gave_up)

    async def _application_gave_up(self, app: Any, detail: str) -> None:
        if app.on_failure != "switchover":
            return
        passives = [n for n in self.senders if not self.progress[n].syncing]
        if not passives:
            self.event("error", "switchover_impossible", f"{app.name} failed but no level passive is connected")
            return
        target = max(passives, key=lambda n: self.progress[n].acked_applied)
        asyncio.ensure_future(switchover(self, target))  # it stops this very task, so it runs beside it

    async def _check_before_acting(self) -> None:
        """A node that was active learns the cluster's epoch before it serves again.

        After a crash or a long pause another node may have been promoted; taking the public
        identity first would make two actives. Wait until every peer has said hello, or one
        failover timeout, and step down at once if anyone is at a higher epoch.
        """
        deadline = time.monotonic() + self.cluster.heartbeat.failover_timeout
        peers = {n.id for n in self.cluster.nodes} - {self.node.id}
        while time.monotonic() < deadline and not peers <= set(self.views):
            await asyncio.sleep(0.05)
        highest = max((int(v.get("epoch") or 0) for v in self.views.values()), default=0)
        if highest > self.epoch:
            await self._keep_divergence(highest)
            self.state.put(role="passive", epoch=highest)
            self.event("warning", "role_changed", f"{self.node.id}: active -> passive at epoch {highest}: "
                       f"stepping down at start: a peer is at epoch {highest}, above ours", old="active",
                       new="passive", epoch=highest)
        for link in list(self.channel.links.values()):
            link.close()  # say hello again with the role this node now holds

    async def _leave_role(self) -> None:
        """Stop what the current role runs: the identity first, so it is released before anything else."""
        self.capture_ready.clear()
        if self._serve_task is not None:  # no monitor may restart what is being stopped
            self._serve_task.cancel()
            await asyncio.gather(self._serve_task, return_exceptions=True)
            self._serve_task = None
        await self.apps.stop_all()  # applications stop before the identity goes, as in a switchover
        await self.cozen.close()  # stop answering for the role's names; the next role presents its own
        await self.identity.release()
        if self.receiver is not None:
            async with self.receiver.apply_lock:  # never cut a batch in half
                tasks, self._role_tasks = self._role_tasks, []
                for task in tasks:
                    task.cancel()
            self.receiver = None
        tasks, self._role_tasks = self._role_tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.watcher is not None:
            self._capture_stop.set()
            await asyncio.to_thread(self._capture_thread.join)
            self.watcher.close()
            self.watcher = None
            if self.barrier is not None:
                self.barrier.close()
                self.barrier = None
            self._capture_stop = threading.Event()
            self.coalescer = Coalescer()

    async def _change_role(self, role: str, epoch: int, sentence: str) -> None:
        old = self.role
        await self._leave_role()
        if old == "active" and role == "passive":
            await self._keep_divergence(epoch)
        values: dict[str, object] = {"role": role, "epoch": epoch}
        if role == "active":
            # Where this term forks from the last one: the old active's records up to here are
            # on this timeline, any after it are not (what it keeps as a divergence if it returns).
            values.update(journal_id=uuid.uuid4().hex, needs_baseline=1,
                          forked_journal=self.state.get("source_journal_id") or "",
                          forked_seq=self.state.get_int("applied_seq"))
            with self.state.db:  # positions of an earlier term refer to another journal
                self.state.db.execute("BEGIN IMMEDIATE")
                self.state.db.execute("DELETE FROM peers")
                self.state.db.execute("DELETE FROM dirty")
        self.state.put(**values)
        self.progress.clear()
        self.event("warning", "role_changed", f"{self.node.id}: {old} -> {role} at epoch {epoch}: {sentence}",
                   old=old, new=role, epoch=epoch)
        for link in list(self.channel.links.values()):
            link.close()  # peers learn the new role and journal in a fresh hello
        await self._enter_role()

    async def _keep_divergence(self, epoch: int) -> None:
        """Before a stale active resyncs, copy aside what it wrote after the fork (never merged)."""
        journaler = getattr(self, "journaler", None)
        if journaler is not None:  # writes captured but not journaled yet (a frozen agent just woke) count too
            changes = [Change("rescan", tree.rel) for tree in self.cluster.protected]
            try:
                await asyncio.to_thread(journaler.process, changes)
            except (OSError, sqlite3.Error) as exc:
                log.warning("last rescan before keeping the divergence failed: %s", exc)
        with self.state.urgent_write():  # the latest acks, not only the last persisted ones
            self.state.db.executemany("UPDATE peers SET acked_applied=MAX(acked_applied, ?) WHERE node=?",
                                      [(p.acked_applied, node) for node, p in self.progress.items()])
        # The new active says exactly where it forked from our journal; acks persisted before a
        # crash may be older than what it had applied, and would keep writes it already has.
        mine = self.state.get("journal_id")
        fork = next((int(v["forked_seq"]) for v in self.views.values()
                     if v.get("role") == "active" and int(v.get("epoch") or 0) == epoch
                     and mine and v.get("forked_journal") == mine and isinstance(v.get("forked_seq"), int)), None)

        def keep() -> Divergence | None:
            db = self.state.connect()
            try:
                return keep_divergence(db, self.node.root, self.cluster.protected, self.node.state_dir, epoch,
                                       fork=fork)
            finally:
                db.close()

        try:
            kept = await asyncio.to_thread(keep)
        except (OSError, sqlite3.Error) as exc:
            self.event("error", "divergence_failed", f"could not keep the writes made after the fork: {exc}")
            return
        if kept is not None:
            self.event("warning", "divergence", f"kept {len(kept.paths)} path(s) written after the fork as "
                       f"divergence {kept.id} in {kept.directory}; see nf divergence show {kept.id}",
                       id=kept.id, paths=len(kept.paths))

    def _spawn_role(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_done)
        self._role_tasks.append(task)

    # -- the HA loop ------------------------------------------------------------------
    async def _ha_loop(self) -> None:
        interval = self.cluster.heartbeat.interval
        next_run = time.monotonic() + interval
        while True:
            delay = next_run - time.monotonic()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):  # never wait_for: see Applications._run
                        await self.ha_wake.wait()
                except TimeoutError:
                    pass
            self.ha_wake.clear()
            next_run = max(next_run + interval, time.monotonic())
            try:
                await self.run_cycle()
            except Exception as exc:  # the loop must outlive one bad cycle; say why
                log.exception("HA cycle failed")
                self.last_error = f"HA cycle: {exc}"

    async def run_cycle(self) -> str:
        snapshot = await self._snapshot()
        decision = decide(snapshot)
        self._record(decision)
        if decision.action == "promote":
            await self._change_role("active", decision.epoch, decision.sentence)
        elif decision.action in ("step_down", "demote"):
            await self._change_role("passive", decision.epoch, decision.sentence)
        elif decision.action == "adopt":
            self.state.put(epoch=decision.epoch)
        return decision.sentence

    async def _snapshot(self) -> Snapshot:
        now = time.time()
        peers = []
        for spec in self.cluster.nodes:
            if spec.id == self.node.id:
                continue
            v = self.views.get(spec.id, {})
            seen = self._heard_at(spec.id)
            peers.append(PeerView(spec.id, v.get("role"), int(v.get("epoch") or 0),
                                  None if seen is None else round(now - seen, 3),
                                  int(v.get("applied_seq") or 0), spec.id in self.channel.links))
        queue = self.state.recvq_stats()[0] if self.role == "passive" else 0
        snap = Snapshot(self.node.id, self.role, self.epoch, tuple(peers), self.cluster.heartbeat.failover_timeout,
                        queue_records=queue, applied_seq=self.state.get_int("applied_seq"),
                        intent=self.intent, level=self.state.get("source_journal_id") is not None,
                        public_ok=self.public_ok)
        if self.role == "passive" and not snap.intent and _active_silent(snap):
            answer = await probe(self.cluster.name, self.cluster.public.addresses)
            snap = replace(snap, active_answers=answer is not None and answer.node != self.node.id)
        self.intent = None
        return snap

    def _record(self, decision: Decision) -> None:
        shape = "".join(c for c in decision.sentence if not c.isdigit() and c != ".")
        if shape != self._last_shape or decision.action != "none":
            self._last_shape = shape
            self.event("info" if decision.action == "none" else "warning", "decision", decision.sentence,
                       action=decision.action)
        self.decisions.append({"ts": time.time(), "action": decision.action, "sentence": decision.sentence})
        del self.decisions[:-100]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("task failed: %r", exc, exc_info=exc)
            self.last_error = f"{type(exc).__name__}: {exc}"

    # -- capture (active) -------------------------------------------------------------
    async def _start_capture(self) -> None:
        self.watcher = Watcher(self.node.root, self.cluster.protected)
        startup = await asyncio.to_thread(self.watcher.start)
        self.journaler = Journaler(self.state.connect(), self.node.root, self.cluster.protected,
                                   self.cluster.replication, between_groups=self.state.let_urgent_writes_pass)
        # Changes made while the agent was down: a rescan against what was shipped.
        self._on_changes(startup)  # subtrees that could not be watched
        if self.state.get_int("needs_baseline"):
            n = await asyncio.to_thread(self.journaler.baseline)
            self.state.put(needs_baseline=0)
            self.event("info", "baseline", f"new journal {self.state.get('journal_id')}: {n} entries recorded "
                       "as shipped; passives are brought level by block hashes")
        else:
            for tree in self.cluster.protected:
                self.coalescer.add(Change("rescan", tree.rel))
            self.flush_needed.set()
        self.barrier = CaptureBarrier()
        self._capture_thread = threading.Thread(target=self._capture, args=(asyncio.get_running_loop(), self.barrier),
                                                name="capture", daemon=True)
        self._capture_thread.start()
        self._spawn_role(self._flush_loop())
        self._spawn_role(self._rescan_loop())
        self.capture_ready.set()

    def _capture(self, loop: asyncio.AbstractEventLoop, barrier: CaptureBarrier) -> None:
        """Read inotify in its own thread: scanning a new directory tree must not stall the loop."""
        assert self.watcher is not None
        fd = self.watcher.fileno()
        while not self._capture_stop.is_set():
            ready, _, _ = select.select([fd, barrier.wake_fd], [], [], 0.2)
            pokes = barrier.pokes  # the read below begins after every wait counted here
            if barrier.wake_fd in ready:
                barrier.woken()
            changes: list[Change] = []
            if ready:  # also when only woken: the read drains whatever is pending now
                try:
                    changes = self.watcher.read()
                except OSError as exc:
                    self.last_error = f"inotify read: {exc}"
                    changes = [Change("rescan", t.rel) for t in self.cluster.protected]
            try:
                if changes:
                    loop.call_soon_threadsafe(self._on_changes, changes)
                loop.call_soon_threadsafe(barrier.captured, pokes)  # after the changes, in order
            except RuntimeError:  # the loop is gone: the agent is stopping
                return

    def _on_changes(self, changes: list[Change]) -> None:
        for change in changes:
            if change.kind == "rescan":
                self.event("warning", "rescan", f"rescan of {change.path}: inotify lost events or watches")
            self.coalescer.add(change)
        if changes:
            self.flush_needed.set()

    async def journaled_now(self) -> int:
        """The journal head once every change made on disk before this call is journaled."""
        barrier = self.barrier
        if barrier is not None:
            await barrier.wait(lambda: not len(self.coalescer) and not barrier.flushing)
        return self.state.journal_head()

    async def _flush_loop(self) -> None:
        delay = self.cluster.replication.coalesce_ms / 1000
        while True:
            await self.flush_needed.wait()
            if delay:
                await asyncio.sleep(delay)
            self.flush_needed.clear()
            changes = self.coalescer.drain()
            if not changes:
                continue
            barrier = self.barrier
            try:
                if barrier is not None:
                    barrier.round_started()
                done = await asyncio.to_thread(self.journaler.process, changes)
            except Exception as exc:
                log.exception("journaling failed")
                self.last_error = f"journal: {exc}"
                for t in self.cluster.protected:
                    self.coalescer.add(Change("rescan", t.rel))
                self.flush_needed.set()
                await asyncio.sleep(1)
                continue
            finally:
                if barrier is not None:
                    barrier.round_done()
            if done.again:  # before what was captured while this batch was journaled
                self.coalescer.put_back(done.again)
                self.flush_needed.set()
            if done.records:
                for ev in self.journal_wake:
                    ev.set()

    async def _rescan_loop(self) -> None:
        interval = self.cluster.replication.rescan_interval
        next_run = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_run - time.monotonic()))
            next_run += interval
            for t in self.cluster.protected:
                self.coalescer.add(Change("rescan", t.rel))
            self.flush_needed.set()

    # -- channel ----------------------------------------------------------------------
    def _codec(self) -> Codec:
        r = self.cluster.replication
        return Codec(max_frame=r.max_frame_bytes, compression=r.compression, level=r.compression_level)

    def _hello(self) -> dict[str, Any]:
        role = "starting" if self.starting else self.role
        # "ops": the records this node applies, so a newer active sends none it would refuse;
        # "features": what else of the protocol it knows (engine.replication.FEATURES).
        fields: dict[str, Any] = {"node": self.node.id, "role": role, "cluster": self.cluster.name, "ops": list(OPS),
                                  "features": list(FEATURES)}
        if self.role == "active":
            fields["journal_id"] = self.state.get("journal_id")
            fields["journal_seq"] = self.state.journal_head()
            fields.update(self._fork_fields())
        else:
            fields["journal_id"] = self.state.get("source_journal_id")
            fields["applied_seq"] = self.state.get_int("applied_seq")
            fields["received_seq"] = self.receiver.received_seq if self.receiver else fields["applied_seq"]
        return fields

    def _on_refused(self, addr: str, reason: str) -> None:
        self.event("warning", "peer_refused", f"refused channel peer {addr}: {reason}")

    async def _on_link(self, link: Link) -> None:
        if link.hello.get("cluster") != self.cluster.name:
            self.event("warning", "peer_refused", f"refused {link.node}: cluster {link.hello.get('cluster')!r}")
            return
        if link.sent_hello.get("role") != self._hello()["role"]:
            return  # made while our role changed: the peer has our old role; closing makes it dial again
        self.event("info", "peer_connected", f"channel to {link.node} up ({link.hello.get('role')})")
        self.views[link.node] = {"role": link.hello.get("role"), "epoch": link.hello.get("epoch"), "seen": time.time(),
                                 **{k: link.hello[k] for k in ("forked_journal", "forked_seq") if k in link.hello}}
        peer_epoch = link.hello.get("epoch") or 0
        if peer_epoch > self.epoch:
            if self.role == "passive":  # learn the fencing token at once, before any message is judged
                self.state.put(epoch=peer_epoch)
                self.event("info", "epoch_adopted", f"adopted epoch {peer_epoch} from {link.node}")
            else:
                self.ha_wake.set()  # an active that meets a higher epoch steps down this cycle
        waiter = self.manifests[link.node] = ManifestWaiter()
        sender_task: asyncio.Task[None] | None = None
        if self.role == "active" and not self.starting and link.hello.get("role") == "passive":
            progress = self.progress.setdefault(link.node, self._load_progress(link.node))
            wake = asyncio.Event()
            self.journal_wake.add(wake)
            sender = Sender(link, self.state, self.cluster, self.node, progress, self.state.get("journal_id") or "",
                            lambda: wake, waiter, self.event, self.journaled_now)
            self.senders[link.node] = sender
            sender_task = asyncio.ensure_future(self._run_sender(sender))
            sender_task.add_done_callback(lambda t: self._sender_done(link, t))
        if self.receiver is not None and link.hello.get("role") == "active":
            self.receiver.link = link
        try:
            while True:
                msg = await link.recv()
                await self._dispatch(link, msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ProtocolError as exc:
            self.event("warning", "protocol_error", f"closed channel to {link.node}: {exc}")
        finally:
            self.event("info", "peer_disconnected", f"channel to {link.node} down")
            waiter.fail_all(ConnectionError(f"channel to {link.node} closed"))
            if sender_task is not None:
                sender_task.cancel()
                self.senders.pop(link.node, None)
                self.journal_wake.discard(wake)
            if self.receiver is not None and self.receiver.link is link:
                self.receiver.link = None

    async def _run_sender(self, sender: Sender) -> None:
        await self.capture_ready.wait()  # sync against a recorded baseline, not a half-built one
        await sender.run()

    def _sender_done(self, link: Link, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, (ConnectionError, OSError)):
            log.error("sender to %s failed: %r", link.node, exc, exc_info=exc)
            self.last_error = f"sender to {link.node}: {exc}"
        link.close()

    async def _dispatch(self, link: Link, msg: Message) -> None:
        if msg.epoch < self.epoch:
            raise ProtocolError(f"{msg.type} from {link.node} carries epoch {msg.epoch}, below ours ({self.epoch})")
        t = msg.type
        if t == "hb":
            self.views[link.node] = dict(msg.fields, epoch=msg.epoch, seen=time.time())
        elif t == "recs":
            if self.receiver is None or link.hello.get("role") != "active":
                raise ProtocolError(f"recs from {link.node}, which is not the active")
            await self.receiver.on_recs(msg, link)
        elif t == "ack":
            p = self.progress.get(link.node)
            if p is not None:
                p.acked_received = max(p.acked_received, msg.get("received", int))
                p.acked_applied = max(p.acked_applied, msg.get("applied", int))
                p.source = msg.get("source", str, optional=True)
                p.level = msg.get("level", str, optional=True)
                p.ack_event.set()
        elif t == "manifest_req":
            if self.receiver is None:
                raise ProtocolError("manifest_req sent to the active")
            self.receiver.on_manifest_req(link, msg)
        elif t == "handover":
            if self.role != "passive" or link.hello.get("role") != "active":
                raise ProtocolError(f"handover from {link.node}, which is not our active")
            self.intent = f"switchover from {link.node}"
            self.ha_wake.set()
        elif t in ("manifest", "manifest_progress", "manifest_end"):
            self.manifests[link.node].on_message(msg)
        else:
            raise ProtocolError(f"unknown message type {t!r}")

    def _load_progress(self, node: str) -> PeerProgress:
        row = self.state.db.execute(
            "SELECT acked_received, acked_applied, journal_id FROM peers WHERE node=?", (node,)
        ).fetchone()
        (dirty,) = self.state.db.execute("SELECT COUNT(*) FROM dirty WHERE node=?", (node,)).fetchone()
        if row is None:
            return PeerProgress(node, dirty_paths=dirty)
        return PeerProgress(node, row[0], row[1], row[2], dirty_paths=dirty)

    # -- loops ------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        interval = self.cluster.heartbeat.interval
        next_run = time.monotonic()
        fields: dict[str, Any] = {}
        failed = ""
        while True:
            try:
                fields = self._heartbeat_fields()
                failed = ""
            except Exception as exc:
                # Silence would read as a dead node (a passive takes over from a silent active):
                # the last fields go out again, and the error is said once.
                if str(exc) != failed:
                    log.exception("heartbeat fields failed; sending the last ones")
                    failed = str(exc)
                    self.last_error = f"heartbeat: {type(exc).__name__}: {exc}"
            for link in list(self.channel.links.values()):
                try:
                    link.send_now("hb", fields)  # ahead of bulk data, and never waiting for room
                except Exception:  # a transport torn down under us: the link's reader ends it
                    link.close()
            next_run += interval
            delay = next_run - time.monotonic()
            if delay < 0:
                log.warning("heartbeat loop late by %.3f s", -delay)
                next_run = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    async def _probe_loop(self) -> None:
        """Probe the public network every heartbeat interval; losses and recoveries are events."""
        interval = self.cluster.heartbeat.interval
        timeout = min(1.0, self.cluster.heartbeat.failover_timeout / 3)
        while True:
            started = time.monotonic()
            answers = await probe_all(self.probes, timeout)
            ok = any(answers.values())
            if ok != self.public_ok:
                silent = ", ".join(str(t) for t, up in answers.items() if not up) or "none"
                if ok:
                    self.event("info", "public_network_up", f"public network answers (silent: {silent})")
                else:
                    self.event("warning", "public_network_down", f"no public network probe answers ({silent})")
                self.public_ok = ok
                self.ha_wake.set()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _fork_fields(self) -> dict[str, Any]:
        return {"forked_journal": self.state.get("forked_journal") or "", "forked_seq": self.state.get_int("forked_seq")}

    def _heartbeat_fields(self) -> dict[str, Any]:
        me = self._self_view()
        return {k: v for k, v in me.items() if k not in ("id", "connected", "epoch")}

    async def _maintenance_loop(self) -> None:
        """Give back idle bulk buffers; on the active, also persist peer progress, truncate the
        journal, and spill overflowing send queues."""
        db = self.state.connect()  # the upkeep's own, used only in its worker thread
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            trim_idle()
            if self.role != "active":
                continue
            try:
                await self._maintain_journal(db)
            except Exception as exc:  # keep the loop alive; say what went wrong
                log.exception("journal maintenance failed")
                self.last_error = f"journal maintenance: {exc}"

    async def _maintain_journal(self, db: sqlite3.Connection) -> None:
        passives = [n.id for n in self.cluster.nodes if n.id != self.node.id]
        progress = {node: self.progress.setdefault(node, self._load_progress(node)) for node in passives}
        acked = {node: (p.acked_received, p.acked_applied) for node, p in progress.items()}
        limit = self.cluster.replication.send_queue_max_bytes
        # Its writes wait for the journaler's groups, which hold the write lock back to back:
        # in the loop's thread that wait stalled heartbeats past the failover timeout.
        spilled = await asyncio.to_thread(journal_upkeep, db, self.state.get("journal_id"), acked, limit)
        for node, (head, added, listed) in spilled.items():
            p = progress[node]
            p.acked_applied, p.acked_received = max(p.acked_applied, head), max(p.acked_received, head)
            p.dirty_paths = listed
            self.event("warning", "send_queue_overflow",
                       f"send queue to {node} passed {limit} bytes: {added} path(s) kept as a dirty list "
                       f"for a delta resync ({listed} in all)")
            link = self.channel.links.get(node)
            if link is not None:
                link.close()

    # -- status -----------------------------------------------------------------------
    def _self_view(self) -> dict[str, Any]:
        view: dict[str, Any] = {"id": self.node.id, "role": self.role, "epoch": self.epoch, "connected": True,
                                "last_error": self.last_error, "links": sorted(self.channel.links),
                                "presented": self.cozen.presentation(self.role).hostname}
        if self.role == "active":
            view["journal_seq"] = self.state.journal_head()
            view.update(self._fork_fields())
            view["applied_seq"] = view["journal_seq"]
            view["receive_queue_records"] = view["receive_queue_bytes"] = 0
            now = time.time()
            peers = {}
            for node, p in self.progress.items():
                n, size, oldest = self.state.journal_backlog(p.acked_received)
                _, _, oldest_unapplied = self.state.journal_backlog(p.acked_applied)
                peers[node] = {
                    "send_queue_records": n, "send_queue_bytes": size,
                    "lag_seconds": round(max(0.0, now - oldest_unapplied), 3) if oldest_unapplied else 0.0,
                    "acked_applied": p.acked_applied, "syncing": p.syncing,
                    "sync": p.sync.to_json() if p.sync is not None else None,
                    "dirty_paths": p.dirty_paths,
                }
            view["peers"] = peers
        else:
            n, size, _ = self.state.recvq_stats()
            view["applied_seq"] = self.state.get_int("applied_seq")
            view["receive_queue_records"], view["receive_queue_bytes"] = n, size
            if self.receiver is not None and self.receiver.last_error:
                view["last_error"] = view["last_error"] or self.receiver.last_error
        return view

    def status(self) -> dict[str, Any]:
        me = self._self_view()
        views: dict[str, dict[str, Any]] = {self.node.id: me}
        now = time.time()
        for node_id, v in self.views.items():
            views[node_id] = dict(v, id=node_id)
        active = next((v for v in views.values() if v.get("role") == "active"), None)
        active_peers = (active or {}).get("peers", {})
        nodes = []
        for spec in self.cluster.nodes:
            v = views.get(spec.id, {})
            fresh = spec.id == self.node.id or spec.id in self.channel.links
            linked_from_active = active is not None and spec.id in active.get("links", [])
            entry: dict[str, Any] = {
                "id": spec.id,
                "role": v.get("role", "unknown") if (fresh or linked_from_active) else "unknown",
                "connected": spec.id == self.node.id or fresh or linked_from_active,
                "channel": f"{spec.channel_host}:{spec.channel_port}",
                "management": spec.management,
                "epoch": v.get("epoch"),
                "send_queue_records": 0, "send_queue_bytes": 0,
                "receive_queue_records": v.get("receive_queue_records", 0),
                "receive_queue_bytes": v.get("receive_queue_bytes", 0),
                "applied_seq": v.get("applied_seq", 0),
                "lag_seconds": 0.0,
                "last_error": v.get("last_error", ""),
                "heartbeat_age": None if spec.id == self.node.id or (heard := self._heard_at(spec.id)) is None
                else round(now - heard, 3),
                "presented_name": v.get("presented"),
            }
            if spec.id in active_peers:
                ap = active_peers[spec.id]
                entry.update({k: ap[k] for k in ("send_queue_records", "send_queue_bytes", "lag_seconds")})
                entry["syncing"] = ap.get("syncing", False)
                entry["sync"] = ap.get("sync")
                entry["dirty_paths"] = ap.get("dirty_paths", 0)
            nodes.append(entry)
        return {"cluster": self.cluster.name, "answered_by": self.node.id, "role": self.role,
                "epoch": self.epoch, "public_ok": self.public_ok, "nodes": nodes,
                "verify": self.verifying.to_json() if self.verifying is not None else None}

    def silent_for(self, node: str) -> float | None:
        """Seconds since `node` was last heard from (None: never)."""
        heard = self._heard_at(node)
        return None if heard is None else time.time() - heard

    def _heard_at(self, node: str) -> float | None:
        """When `node` was last heard from: its last heartbeat handled here, or any frame of it
        that arrived since (a heartbeat can still wait behind records being queued)."""
        seen = self.views.get(node, {}).get("seen")
        link = self.channel.links.get(node)
        if seen is None or link is None:
            return seen
        return max(seen, link.stream.last_arrival)

    def event(self, level: str, kind: str, message: str, **data: object) -> None:
        getattr(log, "warning" if level == "warning" else "error" if level == "error" else "info")(message)
        try:
            self.state.event(level, kind, message, **data)
        except Exception:  # the event log must never take the agent down
            log.exception("could not store event")
        self.alerter.submit(level, kind, message)

    async def _present(self, role: str) -> dict[str, Any]:
        """Present the names of `role` (cozen while passive, public while active); say what failed."""
        states = await self.cozen.apply(role)
        for name, st in states.items():
            if st.error:
                self.event("warning", "cozen_failed", f"{name}: presenting {self.cozen.presentation(role).hostname} "
                           f"as {role} failed: {st.error}")
            elif st.changed:
                self.event("info", "cozen_presented", f"{name}: {st.detail}")
        return self.cozen.status()

    # -- API handlers -----------------------------------------------------------------
    async def _api_ping(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.node.id, "pid": os.getpid(), "role": self.role}

    async def _api_status(self, _req: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _api_events(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        limit = req.get("limit", 50)
        if not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise ApiError("limit: expected an integer 1..10000", field="limit")
        return self.state.events(limit)

    async def _api_cozen(self, _req: dict[str, Any]) -> dict[str, Any]:
        return self.cozen.status()

    async def _api_cozen_apply(self, _req: dict[str, Any]) -> dict[str, Any]:
        return await self._present(self.role)

    async def _api_cozen_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        node = req.get("node")
        if not isinstance(node, str) or node not in {n.id for n in self.cluster.nodes}:
            raise ApiError(f"node: expected a node of this cluster, got {node!r}", field="node")
        if node == self.node.id or self.views.get(node, {}).get("role") == "active":
            raise ApiError(f"node: {node} is this node or the active; remove a passive that has left the cluster",
                           field="node", hint="nf status shows the roles")
        states = await self.cozen.remove(node)
        self.event("warning", "cozen_removed", f"cozen names of {node} removed by the operator")
        return {"node": node, "providers": {k: v.to_json() for k, v in states.items()}}

    async def _api_divergences(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.node.id, "divergences": list_divergences(self.state.db, self.node.state_dir)}

    async def _api_divergence(self, req: dict[str, Any]) -> dict[str, Any]:
        div_id = req.get("id")
        if not isinstance(div_id, int) or isinstance(div_id, bool) or div_id < 1:
            raise ApiError("id: expected a divergence id (a positive integer)", field="id")
        return dict(show_divergence(self.state.db, self.node.state_dir, div_id), node=self.node.id)

    async def _api_why(self, req: dict[str, Any]) -> dict[str, Any]:
        limit = req.get("limit", 20)
        if not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ApiError("limit: expected an integer 1..100", field="limit")
        return {"node": self.node.id, "role": self.role, "epoch": self.epoch, "decisions": self.decisions[-limit:]}

    async def _api_failover(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("force") is not True:
            raise ApiError("force: a forced failover must say force=true", field="force",
                           hint="nf failover --force --to NODE, once you have decided the active is gone")
        if self.role == "active":
            return {"node": self.node.id, "outcome": "already active", "epoch": self.epoch}
        self.intent = "failover"
        self.ha_wake.set()
        deadline = time.monotonic() + 30
        while self.role != "active" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.event("warning", "operator_failover", f"forced failover to {self.node.id} requested by the operator")
        return {"node": self.node.id, "outcome": "promoted" if self.role == "active" else "scheduled",
                "epoch": self.epoch}

    async def _api_switchover(self, req: dict[str, Any]) -> dict[str, Any]:
        """Planned role change: drain, release, hand over; nothing written before it is lost."""
        if self.role != "active":
            raise ApiError("switchover runs on the active node", hint="nf status shows which node is active")
        target = req.get("to")
        passives = [n for n in self.senders if not self.progress[n].syncing]
        if target is None:
            if not passives:
                raise ApiError("no connected, level passive to switch over to", hint="nf status")
            target = max(passives, key=lambda n: self.progress[n].acked_applied)
        if not isinstance(target, str) or target not in {n.id for n in self.cluster.nodes} - {self.node.id}:
            raise ApiError(f"to: expected a passive node of this cluster, got {target!r}", field="to")
        if target not in passives:
            raise ApiError(f"to: {target} is not connected and level", field="to", hint="nf status")
        return await switchover(self, target)

    async def _api_rescan(self, _req: dict[str, Any]) -> dict[str, Any]:
        if self.role != "active":
            raise ApiError("rescan runs on the active node", hint="run it against the active (nf status)")
        for t in self.cluster.protected:
            self.coalescer.add(Change("rescan", t.rel))
        self.flush_needed.set()
        return {"scheduled": True}

    async def _api_verify(self, req: dict[str, Any]) -> dict[str, Any]:
        repair = req.get("repair", False)
        if not isinstance(repair, bool):
            raise ApiError("repair: expected true or false", field="repair")
        if self.role != "active":
            raise ApiError("verify runs on the active node", hint="run it against the active (nf status)")
        if self.verifying is not None:
            v = self.verifying.to_json()
            raise ApiError(f"a verify is already running (for {v['seconds']:.0f} s, now {v['step']} {v['node']})",
                           hint="wait for it to end; nf status shows how far it has come")
        return await run_verify(self, repair=repair)


def run_agent(node_toml: Path) -> int:
    """Entry point of `nf agent`: load configs, run until SIGTERM. Returns the exit code."""
    node_toml = Path(node_toml)
    cluster = load_cluster(find_cluster_config(node_toml))
    node = load_node(node_toml, cluster)
    keep_freed_memory()
    hand_over_sooner()
    lock = hold_node_lock(node.id, node.state_dir)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {node.id} %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(Agent(cluster, node).run())
    finally:
        os.close(lock)
    return 0


def hand_over_sooner() -> None:
    """Make a thread holding the GIL hand it over after 1 ms instead of 5 ms when another waits.

    The channel's TLS threads release the GIL for every record (16 KiB) and must take it back
    before the next; behind an applying or reading thread running Python, each wait could last
    a whole switch interval. With 1 ms an initial sync of 1 GiB and 20,000 files was faster in
    each of four paired runs (about 4 %), at no cost in CPU.
    """
    sys.setswitchinterval(0.001)


def keep_freed_memory() -> None:
    """Keep freed frame buffers in the heap for the next frame (glibc), rather than giving them
    back to the kernel and faulting fresh zeroed pages in again.

    A sync allocates and frees megabyte buffers thousands of times (file chunks, frames); with
    glibc's adaptive limits a third of a GiB of them was faulted in again per sync of 1 GiB. The
    heap keeps at most 64 MiB free at its top, about the send window.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides
