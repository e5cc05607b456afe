"""Bring a passive level with the active by comparing block hashes.

Used for the initial sync of a passive with unknown or stale state, for the durable dirty-path
list of a passive whose send queue overflowed, and by verify (report, and with repair, fix).
Both sides describe a subtree as manifest entries; only what differs is shipped, and for a file
only the blocks whose hashes differ.
"""
from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.blocks import changed_blocks, hash_file, read_ranges
from engine.manifest import Entry
from engine.paths import has_ancestor_in

Record = tuple[str, dict[str, Any], bytes]

_gids = itertools.count(1)


@dataclass(frozen=True)
class Difference:
    """One path where a passive differs from the active."""

    path: str
    kind: str  # missing | extra | type | content | mode | target | mtime
    active: Entry | None
    passive: Entry | None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind}


def diff(active: dict[str, Entry], passive: dict[str, Entry]) -> list[Difference]:
    """Differences in an order that is safe to repair: extras first, then the active's walk order."""
    out: list[Difference] = []
    extra = {p for p in passive if p not in active}
    for path in sorted(extra):
        if not has_ancestor_in(path, extra):
            out.append(Difference(path, "extra", None, passive[path]))
    for path, a in active.items():
        p = passive.get(path)
        kind = _compare(a, p)
        if kind:
            out.append(Difference(path, kind, a, p))
    return out


def repair_records(root: Path, differences: list[Difference], *, block_size: int, chunk: int) -> Iterator[Record]:
    """Records that turn the passive's version of each differing path into the active's."""
    for d in differences:
        if d.kind == "extra":
            yield "delete", {"path": d.path}, b""
            continue
        a = d.active
        assert a is not None
        if a.kind == "dir":
            yield "mkdir", {"path": a.path, "mode": a.mode, "mtime_ns": a.mtime_ns}, b""
        elif a.kind == "symlink":
            yield "symlink", {"path": a.path, "target": a.target, "mtime_ns": a.mtime_ns}, b""
        else:
            yield from _file_records(root, a, d.passive, block_size, chunk)


def _file_records(root: Path, a: Entry, p: Entry | None, block_size: int, chunk: int) -> Iterator[Record]:
    try:
        fd = os.open(root / a.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return  # vanished since the scan: the journal carries its delete
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        # The scan that found this difference hashed the file; hash again only if it changed since.
        same_version = a.hashes is not None and (st.st_size, st.st_mtime_ns) == (a.size, a.mtime_ns)
        hashes = a.hashes if same_version else hash_file(fd, block_size)
        fresh = p is None or p.kind != "file" or p.hashes is None
        blocks = changed_blocks(None if fresh else p.hashes, hashes)  # type: ignore[union-attr]
        gid = -next(_gids) if blocks else None
        for offset, data in read_ranges(fd, blocks, block_size, st.st_size, chunk):
            yield "data", {"path": a.path, "gid": gid, "offset": offset, "fresh": fresh}, data
        yield "file", {"path": a.path, "gid": gid, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
                       "mtime_ns": st.st_mtime_ns, "fresh": fresh}, b""
    finally:
        os.close(fd)


def _compare(a: Entry, p: Entry | None) -> str:
    if p is None:
        return "missing"
    if a.kind != p.kind:
        return "type"
    if a.kind == "file" and (a.size != p.size or a.hashes != p.hashes):
        return "content"
    if a.kind == "symlink" and a.target != p.target:
        return "target"
    if a.kind != "symlink" and a.mode != p.mode:
        return "mode"
    if a.kind != "dir" and a.mtime_ns != p.mtime_ns:
        return "mtime"
    return ""
