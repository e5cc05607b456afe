"""Replication over one link: the active's sender and the passive's receiver.

The sender streams journal records in batches (one frame, one receive-queue transaction, one
ack), keeps a bounded window of unacknowledged bytes, and before streaming brings a passive
with unknown or stale state level by block hashes (`engine.sync`). The receiver appends every
batch to its durable receive queue, acks *received*, applies in order in a worker thread and
acks *applied* once the applied position is committed.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.apply import Applier
from engine.blocks import DIGEST_SIZE
from engine.channel import Link
from engine.errors import FrameTooLarge, NfError, PathError, ProtocolError
from engine.flush import EarlyFlush, syncfs
from engine.held import Held
from engine.journaler import fill_hashes, shipped_entry, shipped_under
from engine.manifest import Entry, digests_from_hex, scan_tree, split_identity_dirs
from engine.paths import check_rel_path, has_ancestor_in, outermost, tree_of
from engine.protocol import Message
from engine.state import INSERT_RECVQ, JournalRecord, State, read_journal
from engine.sync import Difference, diff, lanes, repair_records

if TYPE_CHECKING:
    from engine.config import ClusterConfig, NodeConfig

log = logging.getLogger("nf.replication")

BATCH_RECORDS = 512
BATCH_BYTES = 4 << 20
WINDOW_BYTES = 64 << 20
MANIFEST_CHUNK = 2000
#: A `manifest_req` names at most this many paths, and this many bytes of them. A dirty-path
#: resync asked for one path per round trip before: 5,000 changed files took 20 s, twenty
#: times an initial sync of the same files.
MANIFEST_PATHS = 1000
MANIFEST_PATHS_BYTES = 256 << 10
#: While a passive lists (and hashes) its tree for a manifest request that asks for progress,
#: it says how far it has come this often, in seconds.
PROGRESS_INTERVAL = 0.5
#: What this node's protocol does beyond what every version does, listed in its hello so a
#: newer peer asks nothing of an older one that it would not understand.
FEATURES = ("manifest_paths", "manifest_split", "level_ack")
#: A sync goes over what changed while it read at most this many times (see `Sender.sync`).
SYNC_PASSES = 8

Record = tuple[str, dict[str, Any], bytes]


def pack_batch(records: list[tuple[int | None, str, dict[str, Any], bytes, float]]) -> tuple[dict[str, Any], list[bytes]]:
    """Header fields and payload parts (each record's data, in order) of a `recs` frame."""
    heads = []
    for seq, op, meta, data, ts in records:
        heads.append({"seq": seq, "op": op, "meta": meta, "len": len(data), "ts": ts})
    return {"records": heads}, [r[3] for r in records]


def unpack_batch(msg: Message) -> list[tuple[int | None, str, dict[str, Any], bytes, float]]:
    heads = msg.get("records", list)
    out = []
    pos = 0
    for i, h in enumerate(heads):
        if not isinstance(h, dict):
            raise ProtocolError(f"recs.records[{i}]: expected an object")
        seq, op, meta, n, ts = h.get("seq"), h.get("op"), h.get("meta"), h.get("len"), h.get("ts")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0):
            raise ProtocolError(f"recs.records[{i}].seq: expected a positive int or null")
        if not isinstance(op, str):
            raise ProtocolError(f"recs.records[{i}].op: expected a string")
        if not isinstance(meta, dict):
            raise ProtocolError(f"recs.records[{i}].meta: expected an object")
        if not isinstance(n, int) or n < 0 or pos + n > len(msg.payload):
            raise ProtocolError(f"recs.records[{i}].len: expected a length inside the payload")
        if not isinstance(ts, (int, float)):
            raise ProtocolError(f"recs.records[{i}].ts: expected a number")
        out.append((seq, op, meta, msg.payload[pos : pos + n], float(ts)))
        pos += n
    if pos != len(msg.payload):
        raise ProtocolError("recs: payload longer than its records")
    return out


Listing = tuple[list[Entry], list[Entry]]  # a passive's manifest: entries listed, directories kept aside


class ManifestWaiter:
    """Collects the chunks of manifests a peer sends back, by request id.

    A chunk marked `kept` holds directories the passive keeps only for its identity files
    (`engine.manifest.split_identity_dirs`); a passive sends them only when asked. An item
    `{"path": p, "more": hex}` carries more block hashes of the file entry before it
    (`manifest_payloads`). A "manifest_progress" message says how much the passive has listed
    so far, when the request asked for it.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, _Collecting] = {}

    def new(self, on_progress: Callable[[int, int, int], None] | None = None) -> tuple[int, asyncio.Future[Listing]]:
        """A request id and the future of its answer; `on_progress(id, files, bytes)` receives
        the passive's progress reports."""
        rid = next(self._ids)
        fut: asyncio.Future[Listing] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Collecting(fut, on_progress)
        return rid, fut

    def forget(self, rid: int) -> None:
        """Drop a request whose answer is no longer awaited."""
        self._pending.pop(rid, None)

    def on_message(self, msg: Message) -> None:
        rid = msg.get("id", int)
        c = self._pending.get(rid)
        if c is None:
            return
        if msg.type == "manifest_progress":
            files, nbytes = msg.get("files", int), msg.get("bytes", int)
            if files < 0 or nbytes < 0:
                raise ProtocolError(f"manifest_progress: expected counts of 0 or more, got {files} files, {nbytes} bytes")
            if c.on_progress is not None:
                c.on_progress(rid, files, nbytes)
            return
        if msg.type == "manifest":
            try:
                items = json.loads(bytes(msg.payload) or b"[]")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ProtocolError(f"manifest: payload is not JSON: {exc}") from None
            if not isinstance(items, list):
                raise ProtocolError("manifest: expected a JSON list of entries")
            c.add(c.kept if msg.get("kept", bool, optional=True) else c.listed, items)
            return
        del self._pending[rid]
        error = msg.get("error", str, optional=True)
        if c.fut.done():
            return
        if error:
            c.fut.set_exception(NfError(f"peer could not list its tree: {error}"))
        else:
            c.fut.set_result(c.done())

    def fail_all(self, exc: BaseException) -> None:
        for c in self._pending.values():
            if not c.fut.done():
                c.fut.set_exception(exc)
        self._pending.clear()


@dataclass
class _Collecting:
    """One manifest as it arrives."""

    fut: asyncio.Future[Listing]
    on_progress: Callable[[int, int, int], None] | None = None
    listed: list[Entry] = field(default_factory=list)
    kept: list[Entry] = field(default_factory=list)
    more: dict[int, list[bytes]] = field(default_factory=dict)  # index in listed -> later hashes

    def add(self, into: list[Entry], items: list[Any]) -> None:
        for item in items:
            if isinstance(item, dict) and "more" in item:
                last = into[-1] if into is self.listed and into else None
                if last is None or last.hashes is None or item.get("path") != last.path:
                    raise ProtocolError("manifest.more: expected right after the file entry of the same path")
                self.more.setdefault(len(into) - 1, []).append(digests_from_hex(item["more"], "manifest.more"))
            else:
                into.append(Entry.from_json(item))

    def done(self) -> Listing:
        for i, parts in self.more.items():
            e = self.listed[i]
            self.listed[i] = e._replace(hashes=b"".join([e.hashes or b"", *parts]))
        return self.listed, self.kept


def manifest_payloads(entries: list[Entry], budget: int, *, split: bool) -> Iterator[bytes]:
    """Manifest entries as JSON lists of at most `budget` bytes and MANIFEST_CHUNK entries.

    A file's block hashes take 1/256 of its size in hex (8 KiB blocks): a file of some GiB
    passes a frame on its own. Its entry then carries the first part of them, and the rest
    follows in items `{"path": p, "more": hex}`; with `split` False (an active that does not
    list `manifest_split`) such an entry is an NfError naming the file.
    """
    items: list[str] = []
    size = 0
    for e in entries:
        d = e.to_json()
        text = json.dumps(d)
        pieces = [text]
        if len(text) > budget // 2 and e.hashes is not None:
            if not split:
                raise NfError(f"{e.path}: its block hashes take {len(text)} bytes, more than a manifest message "
                              f"({budget}); upgrade the active's nf, which reads them in parts")
            step = budget // 4 // (2 * DIGEST_SIZE) * (2 * DIGEST_SIZE)
            hexes = d["hashes"]
            pieces = [json.dumps({**d, "hashes": hexes[:step]})]
            pieces += [json.dumps({"path": e.path, "more": hexes[i : i + step]}) for i in range(step, len(hexes), step)]
        for piece in pieces:
            if items and (size + len(piece) + 1 > budget or len(items) >= MANIFEST_CHUNK):
                yield ("[" + ",".join(items) + "]").encode()
                items, size = [], 0
            items.append(piece)
            size += len(piece) + 1
    if items:
        yield ("[" + ",".join(items) + "]").encode()


@dataclass
class PeerProgress:
    """What the active knows of one passive, kept in memory and persisted on ack."""

    node: str
    acked_received: int = 0
    acked_applied: int = 0
    journal_id: str | None = None
    source: str | None = None  # the journal the passive last applied a level record of
    level: str | None = None  # the `sync` token of the last level record the passive applied
    dirty_paths: int = 0  # in its dirty list: counted when it changes, not on every status
    sync: "SyncProgress | None" = None  # while a sync or resync runs
    ack_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def syncing(self) -> bool:
        return self.sync is not None


#: The kinds of difference whose repair ships file data: the file's size bounds how much.
_DATA_KINDS = frozenset({"missing", "type", "content"})


@dataclass
class SyncProgress:
    """How far a sync or a dirty-path resync of one passive has come, and when it should end:
    after an outage the operator waits on it, and status says how long (DESIGN.md).

    The paths go in groups (`manifest_groups`); each group's share of the work is the file data
    shipped against the sizes of the files its differences name, an upper bound for a delta,
    so a group of deltas finishes early rather than late.
    """

    reason: str
    paths: int
    started: float = field(default_factory=time.monotonic)
    done_paths: int = 0   # of groups compared and shipped
    group_paths: int = 0  # in the group being shipped
    group_bytes: int = 0  # of the files its differences name
    group_sent: int = 0   # of file data shipped for it so far
    sent: int = 0         # of file data shipped in all

    def start_group(self, paths: int, differences: list[Difference]) -> None:
        self.group_paths, self.group_sent = paths, 0
        self.group_bytes = sum(d.active.size for d in differences if d.kind in _DATA_KINDS and d.active is not None)

    def shipped(self, nbytes: int) -> None:
        self.group_sent += nbytes
        self.sent += nbytes

    def end_group(self) -> None:
        self.done_paths += self.group_paths
        self.group_paths = self.group_bytes = self.group_sent = 0

    def fraction(self) -> float:
        share = min(1.0, self.group_sent / self.group_bytes) if self.group_bytes else 0.0
        return min(1.0, (self.done_paths + self.group_paths * share) / self.paths) if self.paths else 1.0

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        done = self.fraction()
        elapsed = (time.monotonic() if now is None else now) - self.started
        return {"reason": self.reason, "paths": self.paths, "paths_done": self.done_paths,
                "bytes_sent": self.sent, "percent": round(100 * done, 1),
                "eta_seconds": round(elapsed * (1 - done) / done, 1) if done > 0 else None}


class Sender:
    """The active's side of one link to a passive."""

    def __init__(self, link: Link, state: State, cluster: "ClusterConfig", node: "NodeConfig",
                 progress: PeerProgress, journal_id: str, wake: Callable[[], asyncio.Event],
                 manifests: ManifestWaiter, on_event: Callable[..., None],
                 settled: Callable[[], Awaitable[int]]) -> None:
        self.link = link
        self.state = state
        self.cluster = cluster
        self.node = node
        self.progress = progress
        self.journal_id = journal_id
        self.wake = wake
        self.manifests = manifests
        self.on_event = on_event
        self.settled = settled  # the journal head once every change made before the call is in it
        self.db = state.connect()
        self.settings = cluster.replication
        self.chunk = self.settings.chunk_bytes
        # A batch is cut once its data reaches this; its last record adds at most a chunk.
        self.batch_bytes = min(BATCH_BYTES, self.settings.max_frame_bytes - self.chunk)
        self.inflight: list[tuple[int, int]] = []

    async def run(self) -> None:
        hello = self.link.hello
        applied = hello.get("received_seq", hello.get("applied_seq", 0))
        source = hello.get("journal_id")
        p = self.progress
        start = self._start_position(applied if isinstance(applied, int) else 0, source)
        rows = self.db.execute("SELECT rowid, path FROM dirty WHERE node=?", (p.node,)).fetchall()
        dirty = {path for _, path in rows}
        # Only the entries read here are done with once the resync ends: the link this replaced
        # may spill again meanwhile, and its entries (new rowids: the spill replaces) must stay.
        read_upto = max((rowid for rowid, _ in rows), default=0)
        if start is None or dirty:
            head = self.state.journal_head()
            if start is None:
                await self.sync([t.rel for t in self.cluster.protected], head, reason="initial sync")
            else:
                # What was journaled after the spill is in no dirty list and is not streamed
                # either (streaming resumes at `head`): it is resynced with the rest.
                dirty |= self.state.journal_paths_after(start, upto=head)
                paths = outermost(dirty)
                await self.sync(paths, head, reason="dirty-path resync")
            p.dirty_paths = await asyncio.to_thread(_done_with_dirty, self.db, p.node, read_upto)
            start = head
        await self.stream(start)

    def _start_position(self, applied: int, source: str | None) -> int | None:
        """Where streaming can resume, or None when the passive needs a sync first."""
        if source != self.journal_id:
            return None
        lowest = self.db.execute("SELECT MIN(seq) FROM journal").fetchone()[0]
        head = self.state.journal_head()
        if applied > head:
            return None
        # Records after `applied` are gone (spilled to the dirty list and truncated), also when
        # the journal holds none at all: streaming from there would send nothing, for ever.
        if applied < head and (lowest is None or applied < lowest - 1):
            has_dirty = self.db.execute("SELECT 1 FROM dirty WHERE node=? LIMIT 1", (self.progress.node,)).fetchone()
            if not has_dirty:
                return None
            return max(applied, self.progress.acked_applied)
        return applied

    async def stream(self, cursor: int) -> None:
        wake = self.wake()
        while not self.link.closed:
            wake.clear()
            batch = await self._read_journal(cursor)
            if not batch:
                await wake.wait()
                continue
            await self._send([(r.seq, r.op, r.meta, r.data, r.ts) for r in batch])
            cursor = batch[-1].seq or cursor

    async def sync(self, paths: list[str], head: int, *, reason: str) -> list[Difference]:
        """Bring the passive level for these subtrees (none the ancestor of another), then mark
        it level at a journal head.

        The sync reads the active's tree as it is when read, and the journal lags behind the
        tree: a record after `head` may describe a change the sync already shipped. Replayed on
        top of it, a rename moved what was made at its source since (a rotated directory held
        the new files' content, a renamed file went missing). So after each pass, once the
        journal holds every change made before the pass ended, the records since `head` that
        touch none of the paths synced go to the passive as they are, and the paths of those
        that do are synced again, read after every change those records describe. The passes
        end when no record touched them; after SYNC_PASSES, the journal replays the last window.
        """
        p = self.progress
        p.source = None
        # The passive has long said `source` equals our journal (since its last sync) and says
        # so on every ack, also on acks of what it queued before this level: a token says
        # which level it applied. A passive without `level_ack` sends none, and its `source`
        # stands in (as before).
        token = secrets.token_hex(8)
        tokens = "level_ack" in (self.link.hello.get("features") or ())

        def level() -> bool:
            return p.level == token if tokens else p.source == self.journal_id

        self.on_event("info", "sync_started", f"{reason} of {p.node}: {len(paths)} path(s), journal at {head}")
        t0 = time.monotonic()
        total: list[Difference] = []
        hashed: list[Entry] = []
        keeping: asyncio.Future[None] | None = None
        passes = 0
        try:
            while paths:
                passes += 1
                p.sync = SyncProgress(reason, len(paths))
                for group in self._groups(paths):
                    differences = await self._compare(group, trust_journal=passes == 1)
                    total.extend(differences)
                    p.sync.start_group(len(group), differences)
                    hashed.extend(await self.ship_repairs(differences))
                    p.sync.end_group()
                if passes == SYNC_PASSES:
                    break
                settled = await self.settled()
                paths = await self._send_window(head, settled, paths)
                head = settled
            await self._send([(None, "level", {"journal_id": self.journal_id, "head": head, "sync": token}, b"",
                               time.time())])
            # The hashes read on the way are kept while the passive finishes applying, and the
            # passive counts as level once it has, whether or not they are written yet: for
            # 20,000 files that write took 0.16-0.24 s, longer than the passive's last apply.
            keeping = asyncio.ensure_future(asyncio.to_thread(_keep_hashes, self.db, hashed))
            while not level() and not self.link.closed:  # level once it is *applied*
                p.ack_event.clear()
                await p.ack_event.wait()
            if not level():
                # Not done: its caller must keep the dirty list, which the frames still queued
                # when the link closed may never have repaired.
                raise ConnectionResetError(f"channel to {p.node} closed before it was level")
        finally:
            p.sync = None
            if keeping is not None:
                await keeping  # streaming, which uses the same connection, starts after
        self.on_event("info", "sync_done", f"{reason} of {p.node} sent {len(total)} difference(s) in "
                      f"{time.monotonic() - t0:.1f} s ({passes} pass(es)), level at journal {head}")
        return total

    async def _send_window(self, after: int, upto: int, synced: list[str]) -> list[str]:
        """Send the journal records in (after, upto] that touch none of the `synced` subtrees,
        as sync records (the passive is not level yet); return the subtrees (none the ancestor
        of another) that the others name."""
        touches = _Touching(synced)  # and what a record held back touched: what follows builds on it
        again: set[str] = set()
        cursor = after
        while cursor < upto and not self.link.closed:
            batch = [r for r in await self._read_journal(cursor) if r.seq <= upto]
            if not batch:  # truncated empty by a spill, which closes the link: no level record may follow
                raise ConnectionResetError(f"journal records after {cursor} were spilled during the sync")
            out = []
            for r in batch:
                named = [r.meta["path"], r.meta["dst"]] if r.meta.get("dst") else [r.meta["path"]]
                if any(touches(x) for x in named):
                    again.update(named)
                    for x in named:
                        touches.add(x)
                else:
                    out.append((None, r.op, r.meta, r.data, r.ts))
            if out:
                await self._send(out)
            cursor = batch[-1].seq
        return outermost(again)

    async def _read_journal(self, cursor: int) -> list[JournalRecord]:
        """The next batch of records after `cursor`. A spill moves a passive's backlog to its
        dirty list, truncates the journal past it and then closes its link; a read in between
        finds a hole, and the records after it would only be refused as a sequence gap."""
        batch = await asyncio.to_thread(read_journal, self.db, cursor, BATCH_RECORDS, self.batch_bytes)
        if batch and batch[0].seq != cursor + 1:
            raise ConnectionResetError(f"journal records after {cursor} were spilled")
        return batch

    async def compare(self, paths: list[str],
                      on_progress: Callable[[int, int, int], None] | None = None) -> list[Difference]:
        """Differences between the active and this passive under these paths (none the
        ancestor of another); `on_progress(request, files, bytes)` hears how far the passive's
        listing of each group of paths has come."""
        out: list[Difference] = []
        for group in self._groups(paths):
            out.extend(await self._compare(group, on_progress=on_progress))
        return out

    def _groups(self, paths: list[str]) -> Iterator[list[str]]:
        return manifest_groups(paths, batched="manifest_paths" in (self.link.hello.get("features") or ()))

    async def _compare(self, paths: list[str], *, trust_journal: bool = False,
                       on_progress: Callable[[int, int, int], None] | None = None) -> list[Difference]:
        """One round trip: the passive's manifest comes first, then the active hashes only the
        files the passive also holds (a file the passive lacks is shipped whole and hashed on
        the way). With `trust_journal` (a sync, not verify) and a passive that holds nothing
        below the paths, the active's side is what it journaled rather than a walk of its tree.
        """
        # One path goes as "path", which a passive of every version reads; one of an older
        # version ignores "progress".
        where: dict[str, Any] = {"path": paths[0]} if len(paths) == 1 else {"paths": paths}
        progress = {"progress": True} if on_progress is not None else {}
        rid, fut = self.manifests.new(on_progress)
        shipped: asyncio.Future[dict[str, Entry]] | None = None
        try:
            # Inside the try: a request that never left is forgotten too, or the link's end
            # fails its answer with no one left to read it.
            await self.link.send("manifest_req", {"id": rid, **where, "kept": True, **progress})
            # Read while the passive answers (0.1 s for 20,000 files); unused if it is not empty.
            if trust_journal:
                shipped = asyncio.ensure_future(asyncio.to_thread(_shipped_manifest, self.state, self.cluster, paths))
            listed, kept = await fut
            theirs = {e.path: e for e in listed}
            if shipped is not None and set(theirs) <= set(paths):
                # An empty passive needs everything: what was journaled (shipped) names it without
                # another walk of the tree, and the journal after `head` carries what changes meanwhile.
                return diff(await shipped, theirs, kept=kept)
        finally:
            self.manifests.forget(rid)  # answered, or no longer awaited (a verify gave up on the passive)
            if shipped is not None:
                await asyncio.gather(shipped, return_exceptions=True)  # never left running unseen
        mine = await asyncio.to_thread(_scan, self.node.root, self.cluster, paths, self.settings.block_size,
                                       self.state, theirs)
        return diff(mine, theirs, kept=kept)

    async def send_repairs(self, differences: list[Difference]) -> None:
        """Ship the repairs and keep the block hashes of every file read for them."""
        hashed = await self.ship_repairs(differences)
        await asyncio.to_thread(_keep_hashes, self.db, hashed)

    async def ship_repairs(self, differences: list[Difference]) -> list[Entry]:
        """Ship the repairs; returns the entries (with block hashes) of the files read for them.

        Directories and the like go first; then small and large files travel in two lanes at
        once (`engine.sync.lanes`), each read one batch ahead in its own thread.
        """
        hashed: collections.deque[Entry] = collections.deque()  # appended to by the reading threads
        first, small, large = lanes(differences)
        await self._ship_lane(first, hashed)
        both = [asyncio.ensure_future(self._ship_lane(lane, hashed)) for lane in (small, large)]
        try:
            await asyncio.gather(*both)  # the first failure is raised as it is, not in a group
        finally:
            for task in both:
                task.cancel()
            await asyncio.gather(*both, return_exceptions=True)
        return list(hashed)  # every reading thread is done: both lanes were awaited

    async def _ship_lane(self, differences: list[Difference], hashed: collections.deque[Entry]) -> None:
        if not differences:
            return
        gen = repair_records(self.node.root, differences, trees=self.cluster.protected,
                             block_size=self.settings.block_size, chunk=self.chunk,
                             on_hashed=hashed.append, grouped="files" in (self.link.hello.get("ops") or ()))
        reading = asyncio.ensure_future(asyncio.to_thread(_take, gen, self.batch_bytes))
        try:
            while True:
                batch = await reading
                if not batch:
                    break
                reading = asyncio.ensure_future(asyncio.to_thread(_take, gen, self.batch_bytes))  # read meanwhile
                now = time.time()
                await self._send([(None, op, meta, data, now) for op, meta, data in batch])
                if self.progress.sync is not None:
                    self.progress.sync.shipped(sum(len(data) for _, _, data in batch))
        finally:
            if not reading.done():
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)

    async def _send(self, records: list[tuple[int | None, str, dict[str, Any], bytes, float]]) -> None:
        fields, parts = pack_batch(records)
        size = sum(len(p) for p in parts)
        last = max((r[0] for r in records if r[0] is not None), default=None)
        # What was acked since the last send counts first: a passive that has acked everything
        # sends no further ack to wait for (streaming stopped for good with 600 MB to send).
        self._trim_inflight()
        while self.inflight and sum(n for _, n in self.inflight) > WINDOW_BYTES and not self.link.closed:
            self.progress.ack_event.clear()
            await self.progress.ack_event.wait()
            self._trim_inflight()
        if last is not None:
            fields["last"] = last
        try:
            await self.link.send("recs", fields, parts)
        except FrameTooLarge:
            # Headers too large: hundreds of records with paths of thousands of characters
            # (one record always fits). Halves, each its own frame.
            if len(records) < 2:
                raise
            await self._send(records[: len(records) // 2])
            await self._send(records[len(records) // 2 :])
            return
        if last is not None:
            self.inflight.append((last, size))

    def _trim_inflight(self) -> None:
        received = self.progress.acked_received
        self.inflight = [(s, n) for s, n in self.inflight if s > received]


class Receiver:
    """The passive's side: durable receive queue, ordered apply, acks."""

    def __init__(self, state: State, cluster: "ClusterConfig", node: "NodeConfig",
                 on_event: Callable[..., None]) -> None:
        self.state = state
        self.cluster = cluster
        self.node = node
        self.on_event = on_event
        self.db = state.connect()
        self.apply_db = state.connect()
        self.held = Held(self.apply_db)
        self.applier = Applier(node.root, cluster.protected, held=self.held, block_size=cluster.replication.block_size,
                               local_files=node.local_files)
        self.applier.discard_stages()
        self.queued = asyncio.Event()
        self.applied_event = asyncio.Event()
        self.apply_lock = asyncio.Lock()
        # One batch at a time, whichever link it came on: a link the active replaced (it closes
        # one to spill a backlog) may still be queuing its last batch while the new one brings
        # the next, and both ran on the one database connection.
        self.recv_lock = asyncio.Lock()
        self.early_flush = EarlyFlush(node.root)
        self.received_seq = state.get_int("received_seq", state.get_int("applied_seq"))
        self.link: Link | None = None
        self.last_error = ""
        self._pos = 0
        self._done_seq = state.get_int("applied_seq")
        self._done_id = 0
        self._level: str | None = None  # the `sync` token of the last level record applied
        self._answering: set[asyncio.Task[None]] = set()

    @property
    def journal_id(self) -> str | None:
        return self.state.get("source_journal_id")

    async def on_recs(self, msg: Message, link: Link) -> None:
        """Queue a batch durably, dropping records already held and refusing a sequence gap.

        A batch from a link the active has replaced is dropped: the active closed it (to spill
        a backlog) with frames still on their way, and its successor starts from what this
        passive's hello said it held. Queued after the new link's sync records, an old link's
        records put back an older version of what the sync had just brought level."""
        async with self.recv_lock:
            if link is self.link:
                await self._on_recs(msg)

    async def _on_recs(self, msg: Message) -> None:
        fresh = []
        expected = self.received_seq + 1
        for record in unpack_batch(msg):
            seq, op, meta = record[0], record[1], record[2]
            if op == "level":
                head = meta.get("head")
                if not isinstance(head, int) or isinstance(head, bool) or head < 0:
                    raise ProtocolError("level.head: expected a non-negative int")
                if not isinstance(meta.get("sync", ""), str):
                    raise ProtocolError("level.sync: expected a string")
                expected = head + 1
            elif seq is not None:
                if seq < expected:
                    continue  # resent after a reconnect: already in the receive queue
                if seq > expected:
                    raise ProtocolError(f"sequence gap: expected record {expected}, got {seq}; "
                                        "reconnecting resumes from the last record held")
                expected += 1
            fresh.append(record)
        if fresh and all(r[0] is None and r[1] != "level" for r in fresh) and not self._queue_busy():
            # Sync records need no durable queue: until the `level` record is applied the
            # passive is not level, and a crash makes the active sync it again.
            async with self.apply_lock:
                await asyncio.to_thread(self._apply_direct, fresh)
            return
        await asyncio.to_thread(_enqueue, self.db, fresh, expected - 1)
        self.received_seq = expected - 1
        self.queued.set()
        await self._ack()

    async def _ack(self) -> None:
        if self.link is not None and not self.link.closed:
            try:
                level = {"level": self._level} if self._level is not None else {}
                await self.link.send("ack", {"received": self.received_seq, "applied": self._done_seq,
                                             "source": self.journal_id, **level})
            except (ConnectionError, OSError):
                pass

    def on_manifest_req(self, link: Link, msg: Message) -> None:
        """Answer a manifest request in the background; a malformed one is refused here."""
        rid = msg.get("id", int)
        paths = msg.get("paths", list, optional=True)
        if paths is None:
            paths = [msg.get("path", str)]
        elif not 0 < len(paths) <= MANIFEST_PATHS or not all(isinstance(p, str) for p in paths):
            raise ProtocolError(f"manifest_req.paths: expected a list of 1 to {MANIFEST_PATHS} path strings")
        with_kept = bool(msg.get("kept", bool, optional=True))  # an active of an older version drops them
        progress = bool(msg.get("progress", bool, optional=True))
        task = asyncio.ensure_future(self._send_manifest(link, rid, paths, with_kept, progress))
        self._answering.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._answered)

    def _answered(self, task: "asyncio.Task[None]") -> None:
        self._answering.discard(task)
        exc = None if task.cancelled() else task.exception()
        # A link closed meanwhile (the active spilled this passive's backlog) ends its answer;
        # the active asks again on the next one.
        if exc is not None and not isinstance(exc, (ConnectionError, OSError)):
            log.error("answering a manifest request failed: %r", exc, exc_info=exc)
            self.last_error = f"manifest: {exc}"

    async def _send_manifest(self, link: Link, rid: int, paths: list[str], with_kept: bool, progress: bool) -> None:
        """List and hash the paths in a thread; with `progress`, say every PROGRESS_INTERVAL how
        far that has come (the operator of a verify of terabytes waits on it)."""
        await self.drained()
        split = "manifest_split" in (link.hello.get("features") or ())
        listed = Listed()
        work = asyncio.ensure_future(asyncio.to_thread(self._manifest_messages, paths, with_kept, split, listed))
        try:
            while progress and not work.done():
                await asyncio.wait({work}, timeout=PROGRESS_INTERVAL)
                if not work.done():
                    await link.send("manifest_progress", {"id": rid, "files": listed.files, "bytes": listed.bytes})
            messages = await work
        except (NfError, OSError) as exc:
            await link.send("manifest_end", {"id": rid, "error": str(exc)})
            return
        for kept, payload in messages:
            await link.send("manifest", {"id": rid, "kept": True} if kept else {"id": rid}, payload)
        await link.send("manifest_end", {"id": rid})

    def _manifest_messages(self, paths: list[str], with_kept: bool, split: bool,
                           counted: "Listed") -> list[tuple[bool, bytes]]:
        """The payloads of the answer, each marked whether it holds kept directories."""
        listed, kept = self._listing(paths, counted)
        budget = self.cluster.replication.max_frame_bytes // 2
        out = [(False, p) for p in manifest_payloads(listed, budget, split=split)]
        if with_kept:
            out += [(True, p) for p in manifest_payloads(kept, budget, split=split)]
        return out

    def _listing(self, paths: list[str], counted: "Listed") -> Listing:
        listed: list[Entry] = []
        kept: list[Entry] = []
        for path in paths:
            entries = manifest(self.node.root, self.cluster, path, self.cluster.replication.block_size, counted=counted)
            mine, theirs = split_identity_dirs(self.node.root, tree_of(path, self.cluster.protected).rel, entries,
                                               self.node.local_files)
            listed += mine
            kept += theirs
        return listed, kept

    async def drained(self) -> None:
        """Until every queued record has been applied, or belongs to the unit being applied, whose
        end has not arrived: a group of data records cut off where the active spilled this
        passive's backlog ends the queue for good, and the resync that asked this ships its file
        again (its `level` record then drops the part). Waiting for that end waited for ever."""
        while self.state.db.execute("SELECT 1 FROM recvq WHERE id > ? LIMIT 1", (self._pos,)).fetchone():
            self.applied_event.clear()
            await self.applied_event.wait()

    def _queue_busy(self) -> bool:
        return self.state.db.execute("SELECT 1 FROM recvq LIMIT 1").fetchone() is not None

    def _apply_direct(self, records: list[tuple[int | None, str, dict[str, Any], bytes, float]]) -> None:
        try:
            for _seq, op, meta, data, _ts in records:
                try:
                    self.applier.apply(op, meta, data, replayable=False)
                except (PathError, ProtocolError) as exc:
                    self._refused(op, None, exc)
                except OSError as exc:  # verify finds what a failed sync record left behind
                    self.last_error = f"sync {op} {_subject(meta)}: {exc}"
                    log.error("%s", self.last_error)
        finally:
            self.applier.end_batch()
            self.held.flush()
            self.early_flush.kick()

    def _refused(self, op: str, seq: int | None, exc: Exception) -> None:
        self.last_error = str(exc)
        log.warning("refused record %s %s: %s", op, seq, exc)
        self.state_event("warning", "record_refused", f"refused record {op} {seq}: {exc}")

    async def apply_forever(self) -> None:
        self._pos = 0
        while True:
            self.queued.clear()
            async with self.apply_lock:
                progressed = await asyncio.to_thread(self._apply_batch)
            if progressed:
                self.applied_event.set()
                await self._ack()
                continue
            await self.queued.wait()

    def _apply_batch(self) -> bool:
        """Apply queued records for up to ~100 ms, then commit the applied position once (and
        before any record that a replay from the last commit must not see coming: see
        `Applier.needs_commit_before`)."""
        rows = self.apply_db.execute(
            "SELECT id, seq, op, meta, data FROM recvq WHERE id > ? ORDER BY id LIMIT 2000", (self._pos,)
        ).fetchall()
        if not rows:
            return False
        deadline = time.monotonic() + 0.1
        done_id, done_seq, level = self._done_id, self._done_seq, None  # level: (journal_id, sync) applied
        for rid, seq, op, meta_json, data in rows:
            meta = json.loads(meta_json)
            if done_id != self._done_id and self.applier.needs_commit_before(op, meta):
                self._commit(done_id, done_seq, level)
                level = None
            self._pos = rid
            try:
                if op == "level":
                    done_seq, level, complete = int(meta["head"]), (str(meta["journal_id"]), meta.get("sync")), True
                    self.applier.discard_stages()  # a unit cut off before it (see `drained`) never ends
                else:
                    complete = self.applier.apply(op, meta, bytes(data))
            except (PathError, ProtocolError) as exc:
                self._refused(op, seq, exc)
                complete = True
            except OSError as exc:
                self.last_error = f"apply {op} {_subject(meta)}: {exc}"
                log.error("%s", self.last_error)
                self._pos = done_id
                self.applier.discard_stages()
                time.sleep(0.2)
                break
            if complete:
                done_id = rid
                if seq is not None:
                    done_seq = seq
            if time.monotonic() > deadline:
                break
        self.applier.end_batch()
        if done_id != self._done_id:
            self._commit(done_id, done_seq, level)
        return True  # progress, a unit still in progress, or a retry after an I/O error

    def _commit(self, done_id: int, done_seq: int, level: tuple[str, str | None] | None) -> None:
        """Make what was applied durable, then record it applied: a crash replays only after it."""
        syncfs(self.node.root)
        db = self.apply_db
        db.execute("BEGIN IMMEDIATE")
        self.held.flush()
        db.execute("DELETE FROM recvq WHERE id <= ?", (done_id,))
        values = [("applied_seq", str(done_seq))]
        if level is not None:
            values.append(("source_journal_id", level[0]))
        db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", values)
        db.execute("COMMIT")
        self.applier.committed()
        self._done_id, self._done_seq = done_id, done_seq
        if level is not None:
            self._level = level[1]

    def state_event(self, level: str, kind: str, message: str) -> None:
        try:
            self.state.event(level, kind, message)
        except sqlite3.Error:
            pass


def _subject(meta: dict[str, Any]) -> str:
    """What a record is about, for an error message: its path, or the paths a "files" record carries."""
    files = meta.get("files")
    if isinstance(files, list) and files:
        first = files[0][0] if isinstance(files[0], list) and files[0] else "?"
        return f"{first} (and {len(files) - 1} more)" if len(files) > 1 else str(first)
    return str(meta.get("path"))


def _enqueue(db: sqlite3.Connection, records: list[tuple[int | None, str, dict[str, Any], bytes, float]],
             received: int) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(INSERT_RECVQ, [(seq, op, json.dumps(meta), data, len(data) + 64, ts)
                                      for seq, op, meta, data, ts in records])
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('received_seq', ?)", (str(received),))
    except BaseException:
        db.execute("ROLLBACK")  # a transaction left open made every later batch fail
        raise
    db.execute("COMMIT")


def manifest_groups(paths: list[str], *, batched: bool) -> Iterator[list[str]]:
    """`paths` in the groups that one `manifest_req` may name; one path each for a passive
    that does not list `manifest_paths` among its features (`batched` False)."""
    if not batched:
        yield from ([p] for p in paths)
        return
    group: list[str] = []
    size = 0
    for path in paths:
        n = len(json.dumps(path)) + 1
        if group and (len(group) >= MANIFEST_PATHS or size + n > MANIFEST_PATHS_BYTES):
            yield group
            group, size = [], 0
        group.append(path)
        size += n
    if group:
        yield group


def _take(gen: Iterator[Record], max_bytes: int) -> list[Record]:
    """The next batch: up to BATCH_RECORDS records (a "files" record counts each file it
    carries, which keeps the frame's header small) or about `max_bytes` of data."""
    out: list[Record] = []
    total = count = 0
    for rec in gen:
        out.append(rec)
        total += len(rec[2])
        count += len(rec[1]["files"]) if rec[0] == "files" else 1
        if count >= BATCH_RECORDS or total >= max_bytes:
            break
    return out


@dataclass
class Listed:
    """The files (and their bytes) a manifest has listed so far: counted by the listing thread,
    read by the loop."""

    files: int = 0
    bytes: int = 0

    def count(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        for e in entries:
            if e.kind == "file":
                self.files += 1
                self.bytes += e.size
            yield e


def manifest(root: Path, cluster: "ClusterConfig", path: str, block_size: int,
             reuse: Callable[[str], Entry | None] | None = None,
             with_hashes: bool | Callable[[str], bool] = True, counted: Listed | None = None) -> list[Entry]:
    """Entries of one subtree with block hashes, as verify and sync compare them; `reuse`
    skips re-hashing unchanged files, `counted` counts the files as they are listed."""
    check_rel_path(path, cluster.protected, allow_tree_root=True)
    tree = tree_of(path, cluster.protected)
    if tree is None:
        raise PathError(path, "outside the protected set")
    only = None if path == tree.rel else path[len(tree.rel) + 1 :]
    entries = scan_tree(root, tree, block_size=block_size, with_hashes=with_hashes, reuse=reuse, only=only)
    return list(counted.count(entries) if counted is not None else entries)


def _scan(root: Path, cluster: "ClusterConfig", paths: Iterable[str], block_size: int,
          state: State, theirs: dict[str, Entry]) -> dict[str, Entry]:
    """The active's manifest of subtrees, hashing only files the passive holds too, and reusing
    shipped hashes where size and mtime match; hashes it had to compute are kept as shipped."""
    db = state.connect()  # its own connection: verify may scan while the sender streams
    try:
        def held(p: str) -> bool:
            e = theirs.get(p)
            return e is not None and e.kind == "file"

        reused: set[str] = set()

        def known(p: str) -> Entry | None:
            e = shipped_entry(db, p)
            if e is not None and e.hashes is not None:
                reused.add(p)
            return e

        mine = {e.path: e for path in paths
                for e in manifest(root, cluster, path, block_size, reuse=known, with_hashes=held)}
        _keep_hashes(db, [e for e in mine.values() if e.hashes is not None and e.path not in reused])
        return mine
    finally:
        db.close()


def _shipped_manifest(state: State, cluster: "ClusterConfig", paths: Iterable[str]) -> dict[str, Entry]:
    """The active's manifest of subtrees as journaled, parents first."""
    db = state.connect()
    try:
        out: dict[str, Entry] = {}
        for path in paths:
            check_rel_path(path, cluster.protected, allow_tree_root=True)
            out.update(shipped_under(db, path))
        return out
    finally:
        db.close()


class _Touching:
    """Paths, and whether another is one of them, below one, or above one (a rename or delete
    of it moves or removes them)."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.under: set[str] = set()
        self.above: set[str] = set()
        for path in paths:
            self.add(path)

    def add(self, path: str) -> None:
        self.under.add(path)
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            self.above.add(path)

    def __call__(self, path: str) -> bool:
        return path in self.under or path in self.above or has_ancestor_in(path, self.under)


def _done_with_dirty(db: sqlite3.Connection, node: str, upto: int) -> int:
    """Drop the dirty entries of `node` up to rowid `upto`; the number left."""
    db.execute("DELETE FROM dirty WHERE node=? AND rowid <= ?", (node, upto))
    return int(db.execute("SELECT COUNT(*) FROM dirty WHERE node=?", (node,)).fetchone()[0])


def _keep_hashes(db: sqlite3.Connection, entries: list[Entry]) -> None:
    if entries:
        db.execute("BEGIN IMMEDIATE")
        fill_hashes(db, entries)
        db.execute("COMMIT")
