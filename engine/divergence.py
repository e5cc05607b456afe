"""Divergences: what a stale active wrote after the cluster moved on, kept aside, never merged.

When an active steps down because another node was promoted (it crashed or froze, or it cut
itself off), every path it journaled after the last record the others are known to have applied
is a write the new active never saw. The resync that follows would overwrite those paths, so
first their current content is copied under the state directory and listed, for an operator to
look at (`nf divergence list/show`) and merge by hand if they matter. Nothing is merged back
automatically: two writers' versions of a file have no safe automatic merge.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from engine.errors import NfError, PathError
from engine.paths import open_parent, tree_of

if TYPE_CHECKING:
    from engine.config import ProtectedTree

__all__ = ["Divergence", "keep_divergence", "list_divergences", "show_divergence"]


@dataclass(frozen=True)
class Divergence:
    id: int
    ts: float
    epoch: int        # the epoch that superseded this node's term
    fork_seq: int     # the last record of this node's journal known to be applied elsewhere
    directory: Path   # where the copies are
    paths: list[dict[str, Any]]  # {"path", "kind": file|symlink|dir|missing, "size"?, "target"?}

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts, "epoch": self.epoch, "fork_seq": self.fork_seq,
                "paths": len(self.paths), "directory": str(self.directory)}


def keep_divergence(db: sqlite3.Connection, root: Path, trees: Iterable["ProtectedTree"], state_dir: Path,
                    epoch: int, fork: int | None = None) -> Divergence | None:
    """Copy aside every path journaled after the fork; None when there is nothing to keep.

    The fork is what the new active reports it had applied of our journal when it was promoted;
    without that, the highest position any peer acknowledged as applied (records past it may be
    missing on the new active). Paths spilled to a dirty list (their records were dropped while
    a peer was away) count as well.
    """
    if fork is None:
        fork = db.execute("SELECT COALESCE(MAX(acked_applied), 0) FROM peers").fetchone()[0]
    paths: set[str] = set()
    for (meta,) in db.execute("SELECT meta FROM journal WHERE seq > ?", (fork,)):
        m = json.loads(meta)
        paths.update(p for p in (m.get("path"), m.get("dst")) if isinstance(p, str))
    paths.update(row[0] for row in db.execute("SELECT path FROM dirty"))
    if not paths:
        return None
    ts = time.time()
    cur = db.execute("INSERT INTO divergences(ts, epoch, fork_seq, paths) VALUES(?,?,?,?)", (ts, epoch, fork, "[]"))
    div_id = int(cur.lastrowid or 0)
    directory = state_dir / "divergences" / str(div_id)
    trees = tuple(trees)
    entries = [_keep(root, p, trees, directory) for p in sorted(paths)]
    db.execute("UPDATE divergences SET paths=? WHERE id=?", (json.dumps(entries), div_id))
    return Divergence(div_id, ts, epoch, fork, directory, entries)


def list_divergences(db: sqlite3.Connection, state_dir: Path) -> list[dict[str, Any]]:
    rows = db.execute("SELECT id, ts, epoch, fork_seq, paths FROM divergences ORDER BY id").fetchall()
    return [_from_row(r, state_dir).summary() for r in rows]


def show_divergence(db: sqlite3.Connection, state_dir: Path, div_id: int) -> dict[str, Any]:
    row = db.execute("SELECT id, ts, epoch, fork_seq, paths FROM divergences WHERE id=?", (div_id,)).fetchone()
    if row is None:
        raise NfError(f"no divergence {div_id} on this node", hint="nf divergence list shows what is kept")
    d = _from_row(row, state_dir)
    return dict(d.summary(), paths=d.paths)


def _from_row(row: tuple[Any, ...], state_dir: Path) -> Divergence:
    div_id, ts, epoch, fork, paths = row
    return Divergence(div_id, ts, epoch, fork, state_dir / "divergences" / str(div_id), json.loads(paths))


def _keep(root: Path, path: str, trees: tuple["ProtectedTree", ...], directory: Path) -> dict[str, Any]:
    """Copy one path's current version and describe it.

    The path is walked from its tree without following a symlink in any component, as apply
    does: a symlinked directory in the replica must not make us copy a file from outside it.
    """
    tree = tree_of(path, trees)
    try:
        parent, name = open_parent(root, path, trusted=tree.rel if tree else "")
    except FileNotFoundError:
        return {"path": path, "kind": "missing"}
    except PathError:
        return {"path": path, "kind": "other", "note": "below a symlink: not followed"}
    try:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return {"path": path, "kind": "missing"}
        if stat.S_ISLNK(st.st_mode):
            return {"path": path, "kind": "symlink", "target": os.readlink(name, dir_fd=parent)}
        if stat.S_ISDIR(st.st_mode):
            return {"path": path, "kind": "dir"}
        if not stat.S_ISREG(st.st_mode):
            return {"path": path, "kind": "other"}
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)
    dst = directory / path
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with os.fdopen(fd, "rb") as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        st = os.fstat(src.fileno())
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return {"path": path, "kind": "file", "size": st.st_size, "copy": str(dst)}
