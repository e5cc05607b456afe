"""Capture: turn inotify events on the protected set into changes, and coalesce them.

The active node watches every wanted directory of every protected tree. `Watcher` reads the
kernel's events without blocking and hands out `Change`s in event order; `Coalescer` keeps
the changes pending until the next flush, one per path, in an order that is safe to replay.

Paths are posix strings relative to the node's root prefix: tree "/srv/data" is watched at
root/"srv/data" and a file in it is reported as "srv/data/a/b.txt".

"examine X" means: at flush time, look at X's current state and ship what differs. So an
examine may be duplicated or late without harm; what must never happen is a change that goes
unreported. Where the watcher cannot be sure (queue overflow, no watch left), it says
"rescan" for the subtree and the caller compares it in full.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

from inotify_simple import INotify, flags

from engine.errors import NfError
from engine.paths import is_within, open_parent_in, tree_of

if TYPE_CHECKING:
    from engine.config import ProtectedTree

__all__ = ["Change", "ChangeKind", "Coalescer", "Watcher", "WATCH_MASK", "STAGE_DIR"]

log = logging.getLogger(__name__)

ChangeKind = Literal["examine", "delete", "move", "rescan"]

#: Directory at the top of every tree where apply stages files; never reported.
STAGE_DIR = ".nf-stage"

#: What every watched directory is watched for.
WATCH_MASK = (
    flags.CREATE
    | flags.CLOSE_WRITE
    | flags.MODIFY
    | flags.ATTRIB
    | flags.DELETE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
    | flags.EXCL_UNLINK
)
#: A watch is added through /proc/self/fd/N for a directory opened with no symlink on the way:
#: there the magic link itself must be followed.
_BY_FD_MASK = WATCH_MASK & ~flags.DONT_FOLLOW
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Change:
    """One thing that happened to the protected set.

    kind "examine": look at `path` now and ship what differs (content, metadata, link target).
    kind "delete": `path` is gone (with everything under it when `is_dir`).
    kind "move": `path` was renamed to `dst`, replacing whatever was at `dst`.
    kind "rescan": events under directory `path` may have been lost; compare it in full.
    """

    kind: ChangeKind
    path: str
    dst: str | None = None
    is_dir: bool = False


class Watcher:
    """Recursive inotify watch over the protected trees of one node.

    Not thread-safe; meant to be read from the event loop via `loop.add_reader(w.fileno(), ...)`.
    `start()` and reads that find a new directory walk it with `os.scandir`, which for a big
    tree is slow: run `start()` off the loop.
    """

    def __init__(self, root: Path, trees: Sequence["ProtectedTree"]) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise NfError("capture needs /proc mounted: watches are added through /proc/self/fd")
        self._root = os.fspath(root)
        self._trees = tuple(trees)
        self._inotify = INotify(nonblocking=True)
        self._wd_to_dir: dict[int, str] = {}
        self._dir_to_wd: dict[str, int] = {}
        self._degraded = False

    def start(self) -> list[Change]:
        """Watch every wanted directory; return a rescan for each subtree that could not be.

        May be called again to re-walk (after an overflow, or to retry while degraded): watches
        that still match a directory are kept, stale ones are removed.
        """
        changes: list[Change] = []
        self._degraded = False
        old = self._wd_to_dir
        self._wd_to_dir, self._dir_to_wd = {}, {}
        for tree in self._trees:
            if self._add_watch(tree.rel, changes, required=True) is not None:
                self._scan(tree.rel, changes, emit=False)
        for wd in old.keys() - self._wd_to_dir.keys():
            self._rm_watch(wd)
        return changes

    def fileno(self) -> int:
        return self._inotify.fileno()

    def read(self) -> list[Change]:
        """Read whatever events are pending, without blocking; return the changes in order."""
        events = list(self._inotify.read(timeout=0))
        # A rename is a MOVED_FROM/MOVED_TO pair sharing a cookie, normally adjacent. Look
        # ahead in this batch for the MOVED_TO; one that is not in the batch counts as gone.
        moved_to = {ev.cookie: i for i, ev in enumerate(events) if ev.mask & flags.MOVED_TO}
        paired: set[int] = set()
        changes: list[Change] = []
        for i, ev in enumerate(events):
            if ev.mask & flags.Q_OVERFLOW:
                log.warning("inotify queue overflowed; rescanning the protected set")
                changes.extend(Change("rescan", t.rel, is_dir=True) for t in self._trees)
                changes.extend(self.start())
                continue
            if ev.mask & flags.IGNORED:
                self._forget(ev.wd)
                continue
            parent = self._wd_to_dir.get(ev.wd)
            if parent is None or i in paired:
                continue
            if not ev.name:
                self._self_event(ev.mask, parent, changes)
                continue
            path = _join(parent, ev.name)
            is_dir = bool(ev.mask & flags.ISDIR)
            if ev.mask & flags.MOVED_FROM:
                j = moved_to.get(ev.cookie)
                dst_parent = self._wd_to_dir.get(events[j].wd) if j is not None and j > i else None
                if dst_parent is None:
                    self._moved_out(path, is_dir, changes)
                else:
                    paired.add(j)
                    self._moved(path, _join(dst_parent, events[j].name), is_dir, changes)
            elif ev.mask & flags.MOVED_TO:
                self._moved_in(path, is_dir, changes)
            elif ev.mask & flags.DELETE:
                if self._wanted(path, is_dir):
                    changes.append(Change("delete", path, is_dir=is_dir))
            elif ev.mask & flags.CREATE:
                self._moved_in(path, is_dir, changes)
            elif ev.mask & (flags.MODIFY | flags.CLOSE_WRITE | flags.ATTRIB):
                if self._wanted(path, is_dir):
                    changes.append(Change("examine", path, is_dir=is_dir))
        return changes

    def close(self) -> None:
        if not self._inotify.closed:
            self._inotify.close()
        self._wd_to_dir.clear()
        self._dir_to_wd.clear()

    @property
    def degraded(self) -> bool:
        """True while some wanted directory is unwatched (watch limit hit, or a tree root
        missing or moved away). The subtree was reported as a rescan; a periodic rescan covers
        it, and `start()` retries the watches."""
        return self._degraded

    @property
    def watched(self) -> dict[str, int]:
        """Watched directory -> watch descriptor (a copy, for diagnostics and tests)."""
        return dict(self._dir_to_wd)

    # -- events ------------------------------------------------------------------------------

    def _self_event(self, mask: int, path: str, changes: list[Change]) -> None:
        """An event on a watched directory itself. Its parent reports the same thing, except
        for a tree root, whose parent is not watched, and for an unmount."""
        if mask & flags.UNMOUNT:
            # What was mounted here is gone with its watches; watch what lies beneath.
            changes.append(Change("rescan", path, is_dir=True))
            self._drop_watches(path, remove=False)
            if self._add_watch(path, changes) is not None:
                self._scan(path, changes, emit=False)
            return
        tree = self._tree_at(path)
        if tree is None:
            return
        if mask & flags.ATTRIB:
            changes.append(Change("examine", path, is_dir=True))
        elif mask & (flags.DELETE_SELF | flags.MOVE_SELF):
            log.warning("protected tree %s was removed or moved away; it is no longer watched", tree.path)
            self._drop_watches(path, remove=True)
            self._degraded = True
            changes.append(Change("rescan", path, is_dir=True))

    def _moved(self, src: str, dst: str, is_dir: bool, changes: list[Change]) -> None:
        """A rename inside the watched set; either side may be excluded."""
        src_wanted, dst_wanted = self._wanted(src, is_dir), self._wanted(dst, is_dir)
        if not dst_wanted:
            self._moved_out(src, is_dir, changes)
        elif not src_wanted:
            self._moved_in(dst, is_dir, changes)
        else:
            changes.append(Change("move", src, dst, is_dir))
            if is_dir:
                self._follow_dir_move(src, dst, changes)

    def _moved_out(self, path: str, is_dir: bool, changes: list[Change]) -> None:
        if self._wanted(path, is_dir):
            changes.append(Change("delete", path, is_dir=is_dir))
        if is_dir:
            # Its watches would report events from outside under the old path.
            self._drop_watches(path, remove=True)

    def _moved_in(self, path: str, is_dir: bool, changes: list[Change]) -> None:
        """Something appeared at `path` (created, or moved in from outside)."""
        if not self._wanted(path, is_dir):
            return
        changes.append(Change("examine", path, is_dir=is_dir))
        if is_dir:
            self._watch_new_dir(path, changes)

    def _follow_dir_move(self, src: str, dst: str, changes: list[Change]) -> None:
        """Carry the watches of a renamed directory over to its new path.

        Adding a watch on an inode that is already watched returns the existing descriptor,
        so re-adding `dst` tells whether the directory that moved is the one we watch at `src`.
        If it is not (it was never watched, or `src` was already re-created and watched in
        its place), `dst` is treated like a new directory and scanned.
        """
        src_wd = self._dir_to_wd.get(src)
        try:
            wd = self._watch(dst)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                # Gone again already; keep the best guess, later events correct it.
                self._rebase_watches(src, dst)
                return
            self._watch_failed(dst, exc, changes)
            return
        if wd == src_wd:
            self._rebase_watches(src, dst)
            # A directory made in it before the rename and read after it could not be watched
            # at its old path; watch it now, and examine what was made in it meanwhile.
            self._scan(dst, changes, emit=False, catch_up=True)
            return
        known = wd in self._wd_to_dir
        self._adopt(wd, dst)
        if not known:
            self._scan(dst, changes, emit=True)

    def _watch_new_dir(self, path: str, changes: list[Change]) -> None:
        """Watch a directory that just appeared, then scan it: files created in it before the
        watch existed are found by the scan (a file seen twice costs a duplicate examine).

        What stands at `path` by now may be another directory we watch already, renamed there
        after the one this event made went away: its own rename event follows, and taking it
        for the new one here would report what happened in it before the rename at its new path.
        """
        wd = self._try_watch(path, changes)
        if wd is None:
            return
        known = self._wd_to_dir.get(wd)
        if known is not None and known != path:
            return
        self._adopt(wd, path)
        self._scan(path, changes, emit=True)

    # -- watches -----------------------------------------------------------------------------

    def _scan(self, top: str, changes: list[Change], *, emit: bool, catch_up: bool = False) -> None:
        """Watch every wanted directory below the watched directory `top`; with `emit`, examine
        every entry on the way, and with `catch_up`, the entries of the directories this scan is
        the first to watch (made before their watch existed, under a parent that moved)."""
        stack = [(top, emit)]
        while stack:
            parent, emit_here = stack.pop()
            try:
                fd = self._open_dir(parent)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed or replaced meanwhile; its parent reports that
            except OSError as exc:
                self._watch_failed(parent, exc, changes)
                continue
            try:
                with os.scandir(fd) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            except OSError as exc:
                self._watch_failed(parent, exc, changes)
                continue
            finally:
                os.close(fd)
            for name, is_dir in entries:
                path = _join(parent, name)
                if not self._wanted(path, is_dir):
                    continue
                if emit_here:
                    changes.append(Change("examine", path, is_dir=is_dir))
                if is_dir:
                    watched = path in self._dir_to_wd
                    if self._add_watch(path, changes) is not None:
                        stack.append((path, emit or (catch_up and not watched)))

    def _add_watch(self, path: str, changes: list[Change], *, required: bool = False) -> int | None:
        """Watch directory `path`; None if it vanished or could not be watched (then a rescan
        of it is in `changes`). `required`: a missing directory is a failure too."""
        wd = self._try_watch(path, changes, required=required)
        if wd is not None:
            self._adopt(wd, path)
        return wd

    def _try_watch(self, path: str, changes: list[Change], *, required: bool = False) -> int | None:
        try:
            return self._watch(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not required:
                return None  # removed or replaced meanwhile; its parent reports that
            self._watch_failed(path, exc, changes)
            return None

    def _watch(self, path: str) -> int:
        """Watch the directory at `path`, reached with no symlink on the way.

        A path names a directory only while every component of it is one: a directory swapped
        for a symlink after the event or listing that named `path` would otherwise put the
        watch on whatever the symlink leads to, outside the tree, and report its changes under
        the tree's names. A tree root is the operator's path and is resolved as given.
        """
        fd = self._open_dir(path)
        try:
            return self._inotify.add_watch(f"/proc/self/fd/{fd}", _BY_FD_MASK)
        finally:
            os.close(fd)

    def _open_dir(self, path: str) -> int:
        """An fd of the directory `path`; FileNotFoundError if a symlink or a non-directory is there
        or on the way."""
        if self._tree_at(path) is not None:
            return os.open(self._abs(path), _DIR_FLAGS)
        parent, name = open_parent_in(Path(self._root), path, self._trees)
        try:
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FileNotFoundError(errno.ENOENT, "not a directory", path) from None
            raise
        finally:
            os.close(parent)

    def _adopt(self, wd: int, path: str) -> None:
        """Record that `wd` watches `path`. A descriptor already known under another path
        means that directory moved without us pairing the rename: carry its subtree over."""
        old = self._wd_to_dir.get(wd)
        if old == path:
            return
        if old is not None and self._dir_to_wd.get(old) == wd:
            self._rebase_watches(old, path)
            return
        stale = self._dir_to_wd.get(path)
        if stale is not None and self._wd_to_dir.get(stale) == path:
            del self._wd_to_dir[stale]
        self._wd_to_dir[wd] = path
        self._dir_to_wd[path] = wd

    def _watch_failed(self, path: str, exc: OSError, changes: list[Change]) -> None:
        if exc.errno == errno.ENOSPC:
            log.warning(
                "no inotify watch left for %s (fs.inotify.max_user_watches); "
                "it is covered by periodic rescans only",
                path,
            )
        else:
            log.warning("cannot watch %s: %s; it is covered by periodic rescans only", path, exc)
        self._degraded = True
        changes.append(Change("rescan", path, is_dir=True))

    def _rebase_watches(self, src: str, dst: str) -> None:
        """Rewrite the watched paths at and under `src` to sit under `dst`."""
        self._drop_watches(dst, remove=False)  # a rename replaces what was at dst
        moved = [(p, wd) for p, wd in self._dir_to_wd.items() if is_within(p, src)]
        for p, _ in moved:
            del self._dir_to_wd[p]
        for p, wd in moved:
            new = _rebase(p, src, dst)
            self._dir_to_wd[new] = wd
            self._wd_to_dir[wd] = new

    def _drop_watches(self, top: str, *, remove: bool) -> None:
        """Forget the watches at and under `top`; `remove` also asks the kernel to drop them."""
        for p in [p for p in self._dir_to_wd if is_within(p, top)]:
            wd = self._dir_to_wd.pop(p)
            if self._wd_to_dir.get(wd) == p:
                del self._wd_to_dir[wd]
                if remove:
                    self._rm_watch(wd)

    def _forget(self, wd: int) -> None:
        path = self._wd_to_dir.pop(wd, None)
        if path is not None and self._dir_to_wd.get(path) == wd:
            del self._dir_to_wd[path]

    def _rm_watch(self, wd: int) -> None:
        try:
            self._inotify.rm_watch(wd)
        except OSError:
            pass  # the kernel dropped it already (directory deleted)

    # -- filters -----------------------------------------------------------------------------

    def _wanted(self, path: str, is_dir: bool) -> bool:
        tree = tree_of(path, self._trees)
        if tree is None:
            return False
        inner = _inner(path, tree.rel)
        if not inner:
            return True
        if inner.partition("/")[0] == STAGE_DIR:
            return False
        return tree.wants(inner, is_dir)

    def _tree_at(self, path: str) -> "ProtectedTree | None":
        return next((t for t in self._trees if t.rel == path), None)

    def _abs(self, path: str) -> str:
        return os.path.join(self._root, path)


class Coalescer:
    """Pending changes coalesced per path, in an order that is safe to replay.

    Examines and rescans are kept at most once per path, in a trie so that "everything under
    X" costs the size of X's subtree, not of the whole queue. Deletes and moves are kept in
    order, never merged. Invariants: no examine sits at or under a pending rescan, no rescan
    under another, and a rescan comes after every change under it.
    """

    def __init__(self) -> None:
        self._items: dict[int, Change] = {}
        self._next_seq = 0
        self._trie = _Node("", None)

    def add(self, change: Change) -> None:
        if change.kind == "examine":
            self._add_examine(change)
        elif change.kind == "delete":
            self._discard(change.path)
            self._append(change)
            self._bump_covering(change.path)
        elif change.kind == "move":
            self._add_move(change)
        elif change.kind == "rescan":
            self._add_rescan(change)
        else:
            raise ValueError(f"unknown change kind {change.kind!r}")

    def put_back(self, changes: Sequence[Change]) -> None:
        """Queue `changes` as if they came before everything pending: what is pending is added
        again after them, so a later move carries them along and a later delete drops them."""
        if not changes:
            return
        pending = self.drain()
        for change in [*changes, *pending]:
            self.add(change)

    def drain(self) -> list[Change]:
        out = list(self._items.values())
        self._items.clear()
        self._trie = _Node("", None)
        return out

    def __len__(self) -> int:
        return len(self._items)

    def _add_examine(self, change: Change) -> None:
        cover = self._covering_rescan(change.path)
        if cover is not None:
            self._bump(cover)  # the rescan covers it, and must now run after what came before
            return
        node = self._node(change.path)
        if node.seq is not None:
            del self._items[node.seq]
        node.seq = self._append(change)

    def _add_move(self, change: Change) -> None:
        assert change.dst is not None, "a move needs a dst"
        carried = self._take(change.path)
        self._discard(change.dst)
        self._append(change)
        for old in carried:
            self.add(replace(old, path=_rebase(old.path, change.path, change.dst)))
        self._bump_covering(change.path)
        self._bump_covering(change.dst)

    def _add_rescan(self, change: Change) -> None:
        cover = self._covering_rescan(change.path)
        if cover is not None:
            self._bump(cover)
            return
        self._discard(change.path)
        self._node(change.path).seq = self._append(change)

    def _append(self, change: Change) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self._items[seq] = change
        return seq

    def _bump(self, node: _Node) -> None:
        """Move a pending change to the end of the queue."""
        assert node.seq is not None
        node.seq = self._append(self._items.pop(node.seq))

    def _bump_covering(self, path: str) -> None:
        cover = self._covering_rescan(path)
        if cover is not None:
            self._bump(cover)

    def _covering_rescan(self, path: str) -> _Node | None:
        """The node of a pending rescan at `path` or above it."""
        node: _Node | None = self._trie
        for part in _parts(path):
            if self._is_rescan(node):
                return node
            node = node.children.get(part)
            if node is None:
                return None
        return node if self._is_rescan(node) else None

    def _is_rescan(self, node: _Node) -> bool:
        return node.seq is not None and self._items[node.seq].kind == "rescan"

    def _node(self, path: str) -> _Node:
        node = self._trie
        for part in _parts(path):
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node(part, node)
            node = child
        return node

    def _take(self, path: str) -> list[Change]:
        """Remove the examines and rescans at and under `path`; return them in queue order."""
        node = self._trie
        for part in _parts(path):
            node = node.children.get(part)
            if node is None:
                return []
        seqs = sorted(n.seq for n in node.walk() if n.seq is not None)
        taken = [self._items.pop(seq) for seq in seqs]
        if node.parent is None:
            self._trie = _Node("", None)
        else:
            del node.parent.children[node.name]
            node.parent.prune()
        return taken

    def _discard(self, path: str) -> None:
        self._take(path)


# -- helpers ---------------------------------------------------------------------------------


class _Node:
    """A path component in the coalescer's trie; `seq` is the pending examine or rescan."""

    __slots__ = ("name", "parent", "children", "seq")

    def __init__(self, name: str, parent: _Node | None) -> None:
        self.name = name
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.seq: int | None = None

    def walk(self) -> Iterator[_Node]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def prune(self) -> None:
        """Remove this node and its ancestors while they hold nothing."""
        node = self
        while node.parent is not None and not node.children and node.seq is None:
            del node.parent.children[node.name]
            node = node.parent


def _parts(path: str) -> list[str]:
    return path.split("/") if path else []


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _inner(path: str, top: str) -> str:
    """`path` relative to `top`, which contains it ("" for top itself)."""
    if path == top:
        return ""
    return path[len(top) + 1 :] if top else path


def _rebase(path: str, src: str, dst: str) -> str:
    """`path`, at or under `src`, moved to sit at or under `dst`."""
    rest = _inner(path, src)
    return _join(dst, rest) if rest else dst
