"""Manifests: what a protected tree holds, one Entry per path, for sync, verify and rescans.

A walk never follows a symlink: it lists a symlink as an entry with its target, and opens
every directory and file below the tree's root relative to its parent's fd with O_NOFOLLOW.
Files that vanish while the tree is walked are left out (writers race the walk; capture
reports what changed). Entries come in walk order, a directory before what it holds, names
sorted, so records made from them in that order create parents first.
"""
from __future__ import annotations

import collections
import errno
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.blocks import DIGEST_SIZE, hash_file
from engine.errors import PathError, ProtocolError
from engine.paths import STAGE_NAME, check_rel_path, local_files_below, local_matcher, open_dir, open_parent

if TYPE_CHECKING:
    from engine.config import ProtectedTree

__all__ = ["Entry", "KINDS", "digests_from_hex", "scan_tree", "same", "split_identity_dirs"]

def digests_from_hex(raw: object, field: str) -> bytes:
    """Block digests sent by a peer in hex; a ProtocolError naming `field` if they are not."""
    if not isinstance(raw, str) or len(raw) % (2 * DIGEST_SIZE):
        raise ProtocolError(f"{field}: expected hex digits in groups of {2 * DIGEST_SIZE}")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise ProtocolError(f"{field}: expected hex digits") from None


KINDS = ("file", "dir", "symlink")
MAX_ID = (1 << 32) - 2  # the largest uid or gid (2**32 - 1 means "unchanged" to chown)

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class Entry(NamedTuple):
    """One path of a tree as a node sees it.

    A named tuple rather than a frozen dataclass: a manifest holds one per path (100,000 and
    more), and a tuple is made in a third of the time and half the memory.
    """

    path: str          # relative to the root prefix, e.g. "srv/data/a"
    kind: str          # "file" | "dir" | "symlink"
    mode: int          # permission bits (stat.S_IMODE)
    size: int = 0
    mtime_ns: int = 0
    target: str | None = None    # symlink target, verbatim
    hashes: bytes | None = None  # block digests of a file, when asked for
    uid: int = -1                # numeric owner (clones share their user ids); -1: not known
    gid: int = -1

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "mode": self.mode, "size": self.size,
            "mtime_ns": self.mtime_ns, "target": self.target,
            "hashes": None if self.hashes is None else self.hashes.hex(), "uid": self.uid, "gid": self.gid,
        }

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid), or None where a node of an older version did not say."""
        return (self.uid, self.gid) if self.uid >= 0 and self.gid >= 0 else None

    @classmethod
    def from_json(cls, d: object) -> "Entry":
        """An Entry from a peer's manifest; raises ProtocolError naming the bad field.

        The path is checked for shape only; a caller that acts on it checks it against the
        protected set with `check_rel_path`.
        """
        if not isinstance(d, dict):
            raise ProtocolError(f"entry: expected an object, got {type(d).__name__}")
        path = d.get("path")
        if not isinstance(path, str) or not path:
            raise ProtocolError("entry.path: expected a non-empty string")
        kind = d.get("kind")
        if kind not in KINDS:
            raise ProtocolError(f"entry.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        mode = _int(d, "mode", 0, 0o7777)
        size = _int(d, "size", 0, None, default=0)
        mtime_ns = _int(d, "mtime_ns", None, None, default=0)
        target = d.get("target")
        if kind == "symlink":
            if not isinstance(target, str) or not target or "\x00" in target:
                raise ProtocolError("entry.target: expected a non-empty string for a symlink")
        elif target is not None:
            raise ProtocolError(f"entry.target: expected null for a {kind}")
        raw = d.get("hashes")
        hashes = None if raw is None else digests_from_hex(raw, "entry.hashes")
        uid = _int(d, "uid", -1, MAX_ID, default=-1)
        gid = _int(d, "gid", -1, MAX_ID, default=-1)
        return cls(path, kind, mode, size, mtime_ns, target, hashes, uid, gid)


def scan_tree(root: Path, tree: "ProtectedTree", *, block_size: int, with_hashes: bool | Callable[[str], bool],
              reuse: Callable[[str], Entry | None] | None = None, only: str | None = None) -> Iterator[Entry]:
    """Entries of `root/tree.rel` (or of its subtree `only`, relative to the tree), filtered by
    `tree.wants`, the tree's root included; excluded directories are skipped whole.

    With `with_hashes` (True, or a predicate of the path), files carry block digests;
    `reuse(path)` may offer a known Entry whose
    hashes are taken instead of hashing when kind, size and mtime_ns match. A tree or subtree
    that does not exist, or whose path passes through a symlink, yields nothing.
    """
    walk = _Walk(tree, block_size, with_hashes, reuse)
    if only is None:
        try:
            fd = open_dir(root, tree.rel)
        except OSError as exc:
            if exc.errno in _VANISHED:
                return
            raise
        st = os.fstat(fd)
        yield Entry(tree.rel, "dir", stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, None, None, st.st_uid, st.st_gid)
        yield from walk.below(fd, "")
        return
    full = check_rel_path(f"{tree.rel}/{only}", [tree])
    parts = only.split("/")
    if any(not tree.wants("/".join(parts[:k]), True) for k in range(1, len(parts))):
        return
    try:
        parent, name = open_parent(root, full, trusted=tree.rel)
    except (FileNotFoundError, NotADirectoryError, PathError):
        return
    try:
        entry, fd = walk.entry(parent, name, only)
    finally:
        os.close(parent)
    if entry is None:
        return
    yield entry
    if fd is not None:
        yield from walk.below(fd, only)


def split_identity_dirs(root: Path, tree_rel: str, entries: list[Entry],
                        local_files: Sequence[str]) -> tuple[list[Entry], list[Entry]]:
    """`entries` (in walk order) split into those listed and the directories kept aside
    because they hold nothing listed but this node's identity files.

    Identity files never replicate, and a directory the active removes stays on a clone that
    keeps its own identity files in it (`engine.apply`). Listed, it would be a difference on
    every verify that repair could never remove; kept aside, it counts only where the other end
    has the path too (`engine.sync.diff`), so an empty directory there is no difference either.
    """
    if not local_files:
        return entries, []
    local = local_matcher(local_files)
    children = collections.Counter(posixpath.dirname(e.path) for e in entries)
    aside: set[str] = set()
    for e in reversed(entries):  # children before their parents
        if e.kind == "dir" and e.path != tree_rel and not children[e.path] and _holds_identity(root, tree_rel, e.path, local):
            aside.add(e.path)
            children[posixpath.dirname(e.path)] -= 1
    if not aside:
        return entries, []
    return [e for e in entries if e.path not in aside], [e for e in entries if e.path in aside]


def _holds_identity(root: Path, tree_rel: str, path: str, local: "re.Pattern[str]") -> bool:
    try:
        parent, name = open_parent(root, path, trusted=tree_rel)
    except (FileNotFoundError, PathError):
        return False
    try:
        return bool(local_files_below(parent, name, path, local))
    finally:
        os.close(parent)


def same(a: Entry, b: Entry, *, mtime: bool = True) -> bool:
    """True when two entries describe the same content and attributes.

    Compares kind, mode, size, target and, when both carry them, hashes and owner; with `mtime`, also
    mtime_ns of files and symlinks (never of directories: it moves with their children).
    """
    if a.kind != b.kind or a.mode != b.mode or a.size != b.size or a.target != b.target:
        return False
    if a.hashes is not None and b.hashes is not None and a.hashes != b.hashes:
        return False
    if a.owner is not None and b.owner is not None and a.owner != b.owner:
        return False
    if mtime and a.kind != "dir" and a.mtime_ns != b.mtime_ns:
        return False
    return True


# -- private ---------------------------------------------------------------------------------

class _Walk:
    def __init__(self, tree: "ProtectedTree", block_size: int, with_hashes: bool | Callable[[str], bool],
                 reuse: Callable[[str], Entry | None] | None) -> None:
        self.tree = tree
        self.block_size = block_size
        self.with_hashes = with_hashes
        self.reuse = reuse

    def below(self, fd: int, inner: str) -> Iterator[Entry]:
        """Entries under the open directory `fd` (tree-relative `inner`), depth first; closes fd.

        An explicit stack keeps deep trees clear of the recursion limit; only the fds of the
        directories on the current path are open.
        """
        stack: list[tuple[int, str, Iterator[str]]] = [(fd, inner, iter(self._names(fd, inner)))]
        try:
            while stack:
                dfd, dinner, names = stack[-1]
                name = next(names, None)
                if name is None:
                    os.close(dfd)
                    stack.pop()
                    continue
                child = f"{dinner}/{name}" if dinner else name
                entry, cfd = self.entry(dfd, name, child)
                if entry is None:
                    continue
                yield entry
                if cfd is not None:
                    stack.append((cfd, child, iter(self._names(cfd, child))))
        finally:
            for dfd, _, _ in stack:
                os.close(dfd)

    def entry(self, dfd: int, name: str, inner: str) -> tuple[Entry | None, int | None]:
        """The Entry of `name` in `dfd` if it is wanted, and for a directory its open fd."""
        path = f"{self.tree.rel}/{inner}"
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None, None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if not self.tree.wants(inner, True):
                return None, None
            try:
                fd = os.open(name, _NOFOLLOW_DIR, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in _VANISHED:
                    return None, None
                raise
            st = os.fstat(fd)
            return Entry(path, "dir", stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, None, None, st.st_uid, st.st_gid), fd
        if not self.tree.wants(inner, False):
            return None, None
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(name, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in _VANISHED + (errno.EINVAL,):
                    return None, None
                raise
            return Entry(path, "symlink", stat.S_IMODE(mode), 0, st.st_mtime_ns, target, None, st.st_uid, st.st_gid), None
        if stat.S_ISREG(mode):
            return self._file(dfd, name, path, st), None
        return None, None  # fifos, sockets, devices do not replicate

    def _file(self, dfd: int, name: str, path: str, st: os.stat_result) -> Entry | None:
        if not (self.with_hashes(path) if callable(self.with_hashes) else self.with_hashes):
            return Entry(path, "file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, None, None,
                         st.st_uid, st.st_gid)
        known = self.reuse(path) if self.reuse is not None else None
        if (known is not None and known.kind == "file" and known.hashes is not None
                and known.size == st.st_size and known.mtime_ns == st.st_mtime_ns):
            return Entry(path, "file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, None, known.hashes,
                         st.st_uid, st.st_gid)
        try:
            fd = os.open(name, _NOFOLLOW_FILE, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in _VANISHED:
                return None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None  # replaced by something else since the lstat
            hashes = hash_file(fd, self.block_size, st.st_size)
        finally:
            os.close(fd)
        return Entry(path, "file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, None, hashes,
                     st.st_uid, st.st_gid)

    def _names(self, fd: int, inner: str) -> list[str]:
        try:
            names = os.listdir(fd)
        except FileNotFoundError:
            return []  # removed while we walked it
        if not inner:
            names = [n for n in names if n != STAGE_NAME]
        return sorted(names)


def _int(d: dict[str, Any], field: str, low: int | None, high: int | None, *, default: int | None = None) -> int:
    value = d.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"entry.{field}: expected an integer, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise ProtocolError(f"entry.{field}: expected an integer in {bounds}, got {value}")
    return value
