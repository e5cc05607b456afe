"""Turns captured changes into journal records on the active.

Runs in a worker thread with its own database connection: hashing and reading blocks must
never stall the event loop. Each change is journaled in one transaction, so a crash leaves
either the whole new version of a file in the journal or none of it. `shipped` remembers the
block hashes of the last journaled version of every path; only blocks whose hash differs from
it are read and shipped.

A change is read when it is journaled, which under load is after later changes to the same
paths have happened but before their events are read: an examine can find its path gone, or
already holding the next thing made there, and an ancestor replaced by a symlink. Paths are
opened with no symlink on the way, and what a rename brought is looked at again where it ends
up (`Journaled.again`), so the passive still ends with what the active holds.
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.blocks import INLINE_BYTES, changed_blocks, hash_bytes, hash_file, read_shipped, read_whole
from engine.capture import Change
from engine.manifest import Entry, same, scan_tree
from engine.paths import is_within, open_parent_in, outermost, tree_of
from engine.state import INSERT_JOURNAL

if TYPE_CHECKING:
    from engine.config import ProtectedTree, ReplicationSettings

Record = tuple[str, dict[str, Any], bytes]

GROUP_BYTES = 16 << 20

#: A walked entry replaces its row; a file's hashes survive only if it is the same version.
_REBASE = """
INSERT INTO shipped(path, kind, mode, size, mtime_ns, target, hashes, uid, gid) VALUES(?,?,?,?,?,?,NULL,?,?)
ON CONFLICT(path) DO UPDATE SET kind=excluded.kind, mode=excluded.mode, size=excluded.size,
    mtime_ns=excluded.mtime_ns, target=excluded.target, uid=excluded.uid, gid=excluded.gid,
    hashes=CASE WHEN shipped.kind = 'file' AND excluded.kind = 'file' AND shipped.size = excluded.size
                AND shipped.mtime_ns = excluded.mtime_ns THEN shipped.hashes END
"""
GROUP_SECONDS = 0.2  # a group never holds the database's write lock for longer
#: Stale paths wait for their delete or move event, which a watched directory always sends; past
#: this many (events lost where nothing watches), they give way to a rescan of the trees.
STALE_MAX = 10_000


@dataclass
class Journaled:
    """What one `Journaler.process` did."""

    records: int
    #: Changes to queue again in front of whatever is pending (`Coalescer.put_back`): what a
    #: rename brought before it was examined, to be looked at where it ends up.
    again: list[Change]


class Journaler:
    """Appends records for changes; used only from one worker thread at a time."""

    def __init__(self, db: sqlite3.Connection, root: Path, trees: Sequence["ProtectedTree"],
                 settings: "ReplicationSettings", *, between_groups: Callable[[], None] = lambda: None) -> None:
        self.db = db
        self.between_groups = between_groups  # with no transaction open (`State.let_urgent_writes_pass`)
        self.root = root
        self.trees = tuple(trees)
        self.block_size = settings.block_size
        self.chunk = settings.chunk_bytes
        self._count, self._pending_bytes, self._opened = 0, 0, 0.0
        self._lock = threading.Lock()  # the flush loop and a switchover's last rescan never overlap
        # Paths whose examine found nothing: what was there moved or went before it was read,
        # with its latest content unshipped. The delete or move event follows (see `_moved`).
        self._stale: set[str] = set()
        # Other names of a hard-linked file changed in place: inotify reports only the name it
        # was changed through, and the others hold the same changed content.
        self._linked: list[str] = []

    def process(self, changes: Iterable[Change]) -> Journaled:
        """Journal every change; returns how many records were appended, and what to look at
        again.

        Changes are committed in groups (one fsync per group rather than per file), and a
        group never ends inside one change, so the journal holds whole versions only.
        """
        with self._lock:
            return self._process(changes)

    def _process(self, changes: Iterable[Change]) -> Journaled:
        stale = set(self._stale)
        again: list[Change] = []
        self._begin()
        try:
            for change in changes:
                if change.kind == "examine":
                    self._examine_with_links(change.path)
                elif change.kind == "delete":
                    if not self._behind_non_dir(change.path):
                        self._append(self._delete(change.path))
                    self._stale = {p for p in self._stale if not is_within(p, change.path)}
                    again = [c for c in again if not is_within(c.path, change.path)]
                elif change.kind == "move":
                    assert change.dst is not None
                    again = self._moved(change.path, change.dst, again)
                elif change.kind == "rescan":
                    self.rescan(change.path)
            if len(self._stale) > STALE_MAX:
                self._stale.clear()
                again += [Change("rescan", t.rel, is_dir=True) for t in self.trees]
        except BaseException:
            self.db.execute("ROLLBACK")
            self._stale, self._linked = stale, []
            raise
        self.db.execute("COMMIT")
        count, self._count = self._count, 0
        return Journaled(count, again)

    def _examine_with_links(self, path: str) -> int:
        count = self._append(self._examine(path))
        seen = {path}
        while self._linked:
            other = self._linked.pop()
            if other not in seen:
                seen.add(other)
                count += self._append(self._examine(other))
        return count

    def _follow_links(self, path: str, old: Entry | None, st: os.stat_result) -> None:
        """A file with other names changed: queue the names last shipped as the same version
        (`_examine_with_links` examines them next)."""
        if st.st_nlink > 1 and old is not None and old.kind == "file":
            self._linked += self._other_names(path, old, st)

    def _other_names(self, path: str, old: Entry, st: os.stat_result) -> list[str]:
        """The other paths of the inode `st` that were shipped as the same version as `path`."""
        out = []
        for (other,) in self.db.execute("SELECT path FROM shipped WHERE kind = 'file' AND size = ? AND mtime_ns = ? "
                                        "AND path <> ?", (old.size, old.mtime_ns, path)):
            ost = self._lstat(other)
            if ost is not None and (ost.st_dev, ost.st_ino) == (st.st_dev, st.st_ino):
                out.append(other)
        return out

    def _lstat(self, path: str) -> os.stat_result | None:
        """The entry at `path` in the tree, reached with no symlink on the way; None if there is none."""
        try:
            parent, name = open_parent_in(self.root, path, self.trees)
        except FileNotFoundError:
            return None
        try:
            return os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(parent)

    def _moved(self, src: str, dst: str, again: list[Change]) -> list[Change]:
        """Journal a rename; return `again` carried along, plus what to look at again where the
        rename put it.

        The journaler reads a path when it gets to its examine, which may be after the path
        was renamed (its move event not read yet): the examine then finds nothing, or already
        the next thing made at that path, and the rename record carries the wrong version or,
        for a source never shipped, nothing (the passive's rename finds no source and keeps
        what `dst` held). So what the rename brought is looked at again where it ends up:
        queued in front of what is pending, later renames carry it along, as renames later in
        this batch do here.
        """
        old = self._shipped(src)
        blocked = self._behind_non_dir(src) or self._behind_non_dir(dst)
        replaced = {p for p in self._stale if is_within(p, dst) and not is_within(p, src)}
        moved = {p for p in self._stale if is_within(p, src)}
        self._stale -= replaced | moved
        again = [replace(c, path=dst + c.path[len(src):]) if is_within(c.path, src) else c
                 for c in again if is_within(c.path, src) or not is_within(c.path, dst)]
        again += [Change("examine", dst + p[len(src):]) for p in sorted(moved)]
        if blocked:  # the passive holds neither path: the rescan below ships what is there
            forget_shipped(self.db, src)
            forget_shipped(self.db, dst)
        else:
            self._append(self._move(src, dst))
        look = Change("rescan", dst, is_dir=True) if old is None or blocked else self._look_again(old, dst)
        if look is not None:
            again.append(look)
        return again

    def _look_again(self, old: Entry, dst: str) -> Change | None:
        """What to look at again at `dst` if what is there now is not the `old` version the
        rename record carried there.

        A directory is looked at again whole (a walk that hashes only what differs from what
        was shipped): what was read below its old name may already have been what was made
        there after the rename, and the rename record then carried that (log rotation of a
        directory: the new files' content ended up in the rotated one on the passive)."""
        st = self._lstat(dst)
        if st is None:
            return Change("examine", dst)  # moved on or gone: its event carries or drops this
        if stat.S_ISDIR(st.st_mode):
            return Change("rescan", dst, is_dir=True)
        kind = "file" if stat.S_ISREG(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else None
        if kind != old.kind or st.st_mtime_ns != old.mtime_ns or (kind == "file" and st.st_size != old.size):
            return Change("examine", dst)
        return None

    def baseline(self) -> int:
        """Record the current trees as shipped without journaling them.

        Used when this node starts a new journal (first start, or promotion): every passive
        must then be brought level by block hashes anyway, so journaling the whole data set
        as well would only write it twice. Only metadata is recorded, which takes a directory
        walk rather than a read of every byte: block hashes are filled in later by whatever
        reads the file anyway (the sync that ships it, a rescan), see `fill_hashes`. Until
        then a changed file is shipped whole, except where the table already holds hashes for
        the same size and mtime: a promoted passive kept them for what it applied (`engine.held`).
        """
        # Short transactions: the agent's loop and its upkeep write to the same database.
        db = self.db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS baseline_seen(path TEXT PRIMARY KEY)")
        db.execute("DELETE FROM baseline_seen")
        n = 0
        db.execute("BEGIN IMMEDIATE")
        opened = time.monotonic()
        try:
            for tree in self.trees:
                for e in scan_tree(self.root, tree, block_size=self.block_size, with_hashes=False):
                    db.execute(_REBASE, (e.path, e.kind, e.mode, e.size, e.mtime_ns, e.target, e.uid, e.gid))
                    db.execute("INSERT OR IGNORE INTO baseline_seen(path) VALUES(?)", (e.path,))
                    n += 1
                    if n % 256 == 0 and time.monotonic() - opened > GROUP_SECONDS:
                        db.execute("COMMIT")
                        self.between_groups()
                        db.execute("BEGIN IMMEDIATE")
                        opened = time.monotonic()
            db.execute("DELETE FROM shipped WHERE path NOT IN (SELECT path FROM baseline_seen)")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        db.execute("DELETE FROM baseline_seen")
        return n

    def rescan(self, path: str) -> int:
        """Compare a subtree with what was shipped and journal every difference.

        What is gone goes first, as in a repair: a directory now replaced by a file or a
        symlink still holds it on the passive, and a delete after the replacement would name
        a path through that symlink, which the passive refuses.
        """
        tree = tree_of(path, self.trees)
        if tree is None:
            return 0
        known = shipped_under(self.db, path)
        only = None if path == tree.rel else path[len(tree.rel) + 1 :]
        seen: set[str] = set()
        changed: list[str] = []
        for entry in scan_tree(self.root, tree, block_size=self.block_size, with_hashes=True,
                               reuse=known.get, only=only):
            seen.add(entry.path)
            old = known.get(entry.path)
            if old is not None and same(old, entry):
                if old.kind == "file" and old.hashes is None:
                    fill_hashes(self.db, [entry])
                continue
            changed.append(entry.path)
        gone = {p for p in known if p not in seen}
        count = 0
        for p in outermost(gone):
            count += self._append(self._delete(p))
        for p in changed:
            count += self._examine_with_links(p)
        return count

    # -- per change -------------------------------------------------------------------
    def _examine(self, path: str) -> Iterator[Record]:
        try:
            # No symlink on the way: one put in since the event would lead outside the tree.
            parent, name = open_parent_in(self.root, path, self.trees)
        except FileNotFoundError:
            self._stale.add(path)  # a delete or move event follows
            return
        try:
            yield from self._examine_at(path, parent, name)
        finally:
            os.close(parent)

    def _examine_at(self, path: str, parent: int, name: str) -> Iterator[Record]:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            self._stale.add(path)  # a delete or move event follows
            return
        old = self._shipped(path)
        mode = stat.S_IMODE(st.st_mode)
        owner = (st.st_uid, st.st_gid)
        if stat.S_ISDIR(st.st_mode):
            if old is None or old.kind != "dir" or old.mode != mode or old.owner != owner:
                self._ship(Entry(path, "dir", mode, 0, st.st_mtime_ns, None, None, *owner))
                yield "mkdir", {"path": path, "mode": mode, "mtime_ns": st.st_mtime_ns, "owner": list(owner)}, b""
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=parent)
            except OSError:
                self._stale.add(path)  # replaced meanwhile; its event follows
                return
            if (old is None or old.kind != "symlink" or old.target != target or old.mtime_ns != st.st_mtime_ns
                    or old.owner != owner):
                self._ship(Entry(path, "symlink", mode, 0, st.st_mtime_ns, target, None, *owner))
                yield "symlink", {"path": path, "target": target, "mtime_ns": st.st_mtime_ns,
                                  "owner": list(owner)}, b""
        elif stat.S_ISREG(st.st_mode):
            yield from self._examine_file(path, parent, name, old)

    def _examine_file(self, path: str, parent: int, name: str, old: Entry | None) -> Iterator[Record]:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except OSError:
            self._stale.add(path)  # replaced meanwhile; its event follows
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._stale.add(path)
                return
            mode = stat.S_IMODE(st.st_mode)
            fresh = old is None or old.kind != "file" or old.hashes is None  # no hashes: ship it whole
            if fresh and st.st_size <= INLINE_BYTES:  # whole, in one record
                data = read_whole(fd, st.st_size)
                self._follow_links(path, old, st)
                self._ship(Entry(path, "file", mode, len(data), st.st_mtime_ns, None, hash_bytes(data, self.block_size),
                                 st.st_uid, st.st_gid))
                yield "file", {"path": path, "gid": None, "size": len(data), "mode": mode,
                               "mtime_ns": st.st_mtime_ns, "fresh": True, "owner": [st.st_uid, st.st_gid]}, data
                return
            hashes = hash_file(fd, self.block_size, st.st_size)
            blocks = changed_blocks(None if fresh else old.hashes, hashes)  # type: ignore[union-attr]
            entry = Entry(path, "file", mode, st.st_size, st.st_mtime_ns, None, hashes, st.st_uid, st.st_gid)
            if not fresh and not blocks and same(old, entry):  # type: ignore[arg-type]
                return
            self._follow_links(path, old, st)
            gid = self._next_seq() if blocks else None
            shipped = bytearray(hashes)  # the digests of what the passive gets, as it is read
            for offset, data in read_shipped(fd, blocks, shipped, self.block_size, st.st_size, self.chunk):
                yield "data", {"path": path, "gid": gid, "offset": offset, "fresh": fresh}, data
            self._ship(entry._replace(hashes=bytes(shipped)))
            yield "file", {"path": path, "gid": gid, "size": st.st_size, "mode": mode,
                           "mtime_ns": st.st_mtime_ns, "fresh": fresh, "owner": [st.st_uid, st.st_gid]}, b""
        finally:
            os.close(fd)

    def _delete(self, path: str) -> Iterator[Record]:
        forget_shipped(self.db, path)
        yield "delete", {"path": path}, b""

    def _move(self, src: str, dst: str) -> Iterator[Record]:
        move_shipped(self.db, src, dst)
        yield "rename", {"path": src, "dst": dst}, b""

    # -- storage ----------------------------------------------------------------------
    def _begin(self) -> None:
        self.between_groups()
        self.db.execute("BEGIN IMMEDIATE")
        self._count, self._pending_bytes, self._opened = 0, 0, time.monotonic()

    def _append(self, records: Iterator[Record]) -> int:
        """Append one change's records; commit the group first if it has grown large."""
        if self._pending_bytes > GROUP_BYTES or time.monotonic() - self._opened > GROUP_SECONDS:
            self.db.execute("COMMIT")
            self.between_groups()
            self._begin_keep_count()
        n = 0
        now = time.time()
        for op, meta, data in records:
            self.db.execute(INSERT_JOURNAL, (op, json.dumps(meta, separators=(",", ":")), data, len(data) + 64, now))
            n += 1
            self._pending_bytes += len(data) + 64
        self._count += n
        return n

    def _begin_keep_count(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self._pending_bytes, self._opened = 0, time.monotonic()

    def _next_seq(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='journal'").fetchone()
        return (int(row[0]) if row else 0) + 1

    def _ship(self, e: Entry) -> None:
        if e.kind != "dir":  # it replaces a directory, if one was there, with all below it
            forget_shipped(self.db, e.path)
        put_shipped(self.db, e)

    def _behind_non_dir(self, path: str) -> bool:
        """Whether a directory above `path` was last shipped as something else: an examine read
        late shipped what replaced it before the events of what happened below it first, and the
        passive, which then holds no such path, would refuse to reach it through a symlink.

        Only the nearest shipped ancestor needs a look: nothing shipped lies below a shipped
        non-directory (`_ship` and `_moved` keep it so), so above a shipped directory all are.
        Usually that is the parent: one query."""
        head = path.rpartition("/")[0]
        while "/" in head:
            e = self._shipped(head)
            if e is not None:
                return e.kind != "dir"
            head = head.rpartition("/")[0]
        return False

    def _shipped(self, path: str) -> Entry | None:
        return shipped_entry(self.db, path)


def shipped_entry(db: sqlite3.Connection, path: str) -> Entry | None:
    """The last journaled version of `path`, as the active recorded it."""
    row = db.execute(
        f"SELECT {_COLUMNS} FROM shipped WHERE path = ?", (path,)
    ).fetchone()
    return _entry(row) if row else None


def put_shipped(db: sqlite3.Connection, *entries: Entry) -> None:
    db.executemany(
        f"INSERT OR REPLACE INTO shipped({_COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?)", entries,
    )


def forget_shipped(db: sqlite3.Connection, path: str) -> None:
    """`path` and everything below it."""
    db.execute(f"DELETE FROM shipped WHERE {_UNDER}", _under(path))


def move_shipped(db: sqlite3.Connection, src: str, dst: str) -> None:
    """`src` and everything below it now live at `dst`, replacing what was there."""
    forget_shipped(db, dst)
    db.execute("UPDATE shipped SET path = ? WHERE path = ?", (dst, src))
    db.execute("UPDATE shipped SET path = ? || substr(path, ?) WHERE path >= ? AND path < ?",
               (dst, len(src) + 1, *_under(src)[1:]))


def shipped_under(db: sqlite3.Connection, path: str) -> dict[str, Entry]:
    """The last journaled version of `path` and of everything below it, parents before children
    (in the primary key's order, which costs nothing: a path sorts before its own extensions)."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM shipped WHERE {_UNDER} ORDER BY path",
        _under(path),
    )
    return {row[0]: _entry(row) for row in rows}


def shipped_totals(db: sqlite3.Connection) -> tuple[int, int]:
    """The number of files journaled and their bytes: what a level passive holds."""
    files, nbytes = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM shipped WHERE kind='file'").fetchone()
    return int(files), int(nbytes)


def fill_hashes(db: sqlite3.Connection, entries: Iterable[Entry]) -> None:
    """Record block hashes read by the way for shipped files that have none yet.

    Only where the shipped row still describes the version that was hashed (same size and
    mtime) and has no hashes: a newer journaled version keeps its own.
    """
    rows = [(e.hashes, e.path, e.size, e.mtime_ns) for e in entries if e.hashes is not None]
    if rows:
        db.executemany("UPDATE shipped SET hashes=? WHERE path=? AND kind='file' AND size=? AND mtime_ns=? "
                       "AND hashes IS NULL", rows)


_COLUMNS = "path, kind, mode, size, mtime_ns, target, hashes, uid, gid"  # an Entry's fields, in order


def _entry(row: tuple[Any, ...]) -> Entry:
    path, kind, mode, size, mtime_ns, target, hashes, uid, gid = row
    return Entry(path, kind, mode, size, mtime_ns, target, bytes(hashes) if hashes is not None else None, uid, gid)


#: `path` and everything below it, as a range of the primary key (LIKE would scan the table):
#: the paths below "a/b" are those from "a/b/" up to, not including, "a/b0" ("0" follows "/").
_UNDER = "(path = ? OR (path >= ? AND path < ?))"


def _under(path: str) -> tuple[str, str, str]:
    return path, path + "/", path + "0"
