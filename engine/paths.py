"""Paths that arrive over the channel or an API, checked and resolved without symlink escapes.

A record names its file by a posix path relative to the node's root prefix, such as
"srv/data/dir/file.txt". `check_rel_path` refuses anything that is not a plain, normalised
path inside the protected set. `open_parent` then walks to the file's parent directory one
component at a time, from a directory fd and with O_NOFOLLOW, so that a symlink in a passive's
tree (which may point anywhere, /etc included) is never followed by a replicated write.

The active reads its own tree the same way (`open_parent_in`, and `Beneath` for a repair): a
path it journals or ships may lead through a symlink by the time it reads it, and reading
through that would ship what the symlink points at, outside the tree, under the tree's name.

The configured tree path itself (`trusted`, e.g. "srv/data") is the operator's choice and is
opened as the kernel resolves it, so a protected tree may sit under a symlinked prefix; the
channel can never create or replace a symlink there, because the tree root is not a path a
symlink or rename record may name.
"""
from __future__ import annotations

import errno
import fnmatch
import functools
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import PathError

if TYPE_CHECKING:
    from engine.config import ProtectedTree

__all__ = ["STAGE_NAME", "Beneath", "check_rel_path", "tree_of", "open_parent", "open_parent_in", "is_within",
           "makedirs_parent", "open_dir", "local_matcher", "local_files_below"]

#: Directory at the top of every protected tree where apply stages files.
STAGE_NAME = ".nf-stage"

MAX_PATH = 4096
MAX_NAME = 255
_ODD_PARTS = frozenset(("", ".", ".."))

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR_FLAGS | os.O_NOFOLLOW


def check_rel_path(p: object, trees: Iterable["ProtectedTree"], *, allow_tree_root: bool = False,
                   stage_name: str = STAGE_NAME) -> str:
    """Return `p` when it is a safe path inside one of `trees`; raise PathError naming why not.

    Safe means: a non-empty str without NUL, relative, with no empty, "." or ".." component,
    equal to its normalised form, strictly under a tree's `rel` (or equal to it when
    `allow_tree_root`, for directory operations), and not inside that tree's stage directory.
    Include/exclude filters are not applied here: they decide what the active ships, not what
    is safe to write.
    """
    if not isinstance(p, str):
        raise PathError(p, f"expected a string, got {type(p).__name__}")
    if not p:
        raise PathError(p, "empty path")
    if "\x00" in p:
        raise PathError(p, "NUL byte")
    if p.startswith("/"):
        raise PathError(p, "absolute path")
    # A character encodes to at most 4 bytes: short strings skip the encoding (hot on passives).
    if len(p) * 4 > MAX_PATH and len(os.fsencode(p)) > MAX_PATH:
        raise PathError(p, f"longer than {MAX_PATH} bytes")
    parts = p.split("/")
    # Without empty, "." or ".." components a relative path is its own normal form; the common
    # case is checked with set and length operations instead of a loop (every record's path).
    if not _ODD_PARTS.isdisjoint(parts) or len(max(parts, key=len)) * 4 > MAX_NAME:
        for part in parts:
            if part == "..":
                raise PathError(p, "'..' component")
            if part == ".":
                raise PathError(p, "'.' component")
            if part == "":
                raise PathError(p, "empty component")
            if len(part) * 4 > MAX_NAME and len(os.fsencode(part)) > MAX_NAME:
                raise PathError(p, f"component longer than {MAX_NAME} bytes")
        if posixpath.normpath(p) != p:
            raise PathError(p, "not normalised")
    tree = tree_of(p, trees)
    if tree is None:
        raise PathError(p, "outside the protected set")
    if p == tree.rel:
        if not allow_tree_root:
            raise PathError(p, "is a protected tree's root, not a path inside it")
        return p
    if p[len(tree.rel) + 1 :].partition("/")[0] == stage_name:
        raise PathError(p, "inside the stage directory")
    return p


def has_ancestor_in(path: str, pool: set[str]) -> bool:
    """Whether a strict ancestor of `path` is in `pool` (so acting on the ancestor covers it)."""
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        if path in pool:
            return True
    return False


def outermost(paths: set[str]) -> list[str]:
    """The paths none of whose ancestors is among them, sorted: acting on these covers all."""
    return sorted(p for p in paths if not has_ancestor_in(p, paths))


def tree_of(rel: str, trees: Iterable["ProtectedTree"]) -> "ProtectedTree | None":
    """The deepest tree that holds `rel` (or is it), or None."""
    best = None
    for tree in trees:
        if (rel == tree.rel or rel.startswith(tree.rel + "/")) and (best is None or len(tree.rel) > len(best.rel)):
            best = tree
    return best


def local_matcher(local_files: Iterable[str]) -> "re.Pattern[str]":
    """One regex for a node's identity files (absolute globs), matched against relative paths
    such as "etc/machine-id"; it matches nothing when there are none. Kept once made: a
    passive asks for it for every path of a manifest request."""
    return _local_matcher(tuple(local_files))


@functools.lru_cache(maxsize=16)
def _local_matcher(local_files: tuple[str, ...]) -> "re.Pattern[str]":
    return re.compile("|".join(fnmatch.translate(f.lstrip("/")) for f in local_files) or "(?!)")


def local_files_below(parent: int, name: str, path: str, local: "re.Pattern[str]") -> list[str]:
    """What `local` matches below directory `name` in `parent` (the tree's `path`), relative to
    it; a match that is a directory is not looked into. Never follows a symlink; [] when `name`
    is missing or not a directory."""
    try:
        fd = os.open(name, _NOFOLLOW_DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return []
        raise
    found: list[str] = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                child = f"{path}/{entry.name}"
                if local.match(child):
                    found.append(entry.name)
                elif entry.is_dir(follow_symlinks=False):
                    found += [f"{entry.name}/{rel}" for rel in local_files_below(fd, entry.name, child, local)]
    finally:
        os.close(fd)
    return found


def open_parent(root: Path, rel: str, *, trusted: str = "") -> tuple[int, str]:
    """An O_DIRECTORY|O_NOFOLLOW fd of `rel`'s parent under `root`, and the final name.

    Every component below `trusted` (a prefix of `rel`, normally the tree's `rel`) is opened
    relative to the one before with O_NOFOLLOW. Raises PathError("symlink escape") when one
    is a symlink, FileNotFoundError when one is missing or not a directory (so the path
    cannot exist). The caller closes the fd. `rel` must have passed `check_rel_path`.
    """
    return _walk(root, rel, trusted, create=False)


def open_parent_in(root: Path, rel: str, trees: Iterable["ProtectedTree"]) -> tuple[int, str]:
    """`open_parent` from the root of `rel`'s tree, for the active's reads of its own tree: there a
    path with a symlink on the way names nothing in the tree, so it is FileNotFoundError, as a
    path that vanished is."""
    tree = tree_of(rel, trees)
    try:
        return open_parent(root, rel, trusted=tree.rel if tree else "")
    except PathError:
        raise FileNotFoundError(errno.ENOENT, "a symlink on the way", rel) from None


def is_within(path: str, top: str) -> bool:
    """`path` is `top` or lies under it."""
    return path == top or path.startswith(top + "/")


def makedirs_parent(root: Path, rel: str, *, trusted: str = "") -> tuple[int, str]:
    """Like `open_parent`, creating missing parents (mode 0755) on the way.

    A parent that exists but is not a directory raises PathError: the record is out of order
    with the tree it is applied to, and verify repairs what it meant.
    """
    return _walk(root, rel, trusted, create=True)


def open_dir(root: Path, rel: str, *, create: bool = False) -> int:
    """An fd of the directory `root/rel`, following symlinks (for configured paths only)."""
    full = os.path.join(root, rel) if rel else os.fspath(root)
    try:
        return os.open(full, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
    os.makedirs(full, 0o755, exist_ok=True)
    return os.open(full, _DIR_FLAGS)


class Beneath:
    """Opens files of the protected trees under `root` with no symlink anywhere on the way.

    For the active's reads of its own tree in a sync or repair. A path with a symlink on the way
    names nothing in the tree, so it is FileNotFoundError, as a path that vanished is. The last
    parent directory stays open until `close` or until another one is needed: a repair list
    names its files directory by directory, and opening each parent once rather than per file
    saves most of the walk. (A directory that moves meanwhile is the journal's to correct, as
    for any file that changes after the scan.)
    """

    def __init__(self, root: Path, trees: Iterable["ProtectedTree"]) -> None:
        self.root = root
        self.trees = tuple(trees)
        self._dir: str | None = None
        self._fd = -1

    def open(self, rel: str, flags: int) -> int:
        """`os.open` of `rel` with O_NOFOLLOW added; the caller closes the fd."""
        head, _, name = rel.rpartition("/")
        if head != self._dir:
            self.close()
            self._fd, _ = open_parent_in(self.root, rel, self.trees)
            self._dir = head
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._dir, self._fd = None, -1


# -- private ---------------------------------------------------------------------------------

def _walk(root: Path, rel: str, trusted: str, *, create: bool) -> tuple[int, str]:
    parts = rel.split("/")
    name = parts.pop()
    if trusted and (rel == trusted or rel.startswith(trusted + "/")):
        depth = min(trusted.count("/") + 1, len(parts))
    else:
        depth = 0
    fd = open_dir(root, "/".join(parts[:depth]), create=create)
    try:
        for part in parts[depth:]:
            nxt = _open_child_dir(fd, part, rel, create=create)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _open_child_dir(fd: int, name: str, rel: str, *, create: bool) -> int:
    for _ in range(3):  # a concurrent mkdir/rmdir may race us; settle in a few tries
        try:
            return os.open(name, _NOFOLLOW_DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            if not create:
                raise FileNotFoundError(errno.ENOENT, "no such directory", rel) from None
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            continue
        if stat.S_ISLNK(st.st_mode):
            raise PathError(rel, "symlink escape")
        if not stat.S_ISDIR(st.st_mode):
            if create:
                raise PathError(rel, f"parent {name!r} is not a directory")
            raise FileNotFoundError(errno.ENOENT, "a parent is not a directory", rel)
    raise FileNotFoundError(errno.ENOENT, "directory kept changing while opened", rel)
