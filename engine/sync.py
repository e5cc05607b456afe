"""Bring a passive level with the active by comparing block hashes.

Used for the initial sync of a passive with unknown or stale state, for the durable dirty-path
list of a passive whose send queue overflowed, and by verify (report, and with repair, fix).
Both sides describe a subtree as manifest entries; only what differs is shipped, and for a file
only the blocks whose hashes differ.
"""
from __future__ import annotations

import collections
import itertools
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.blocks import (DIGEST_SIZE, INLINE_BYTES, changed_blocks, hash_bytes, hash_file, new_digests, read_hashing,
                           read_shipped, read_whole, zero_digest)
from engine.manifest import Entry
from engine.paths import Beneath, outermost

if TYPE_CHECKING:
    from engine.config import ProtectedTree

Record = tuple[str, dict[str, Any], bytes]

_gids = itertools.count(1)

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # non-blocking: a FIFO never waits

#: Small new files travel together, whole, in one "files" record of at most this many: a line
#: of four values each in its header instead of a record each, for a fraction of the per-file
#: work on both ends of an initial sync of many small files.
GROUP_FILES = 64


class Difference(NamedTuple):
    """One path where a passive differs from the active (a tuple, like `Entry`: there is one
    per file of an initial sync)."""

    path: str
    kind: str  # missing | extra | type | content | mode | target | mtime | owner
    active: Entry | None
    passive: Entry | None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind}


def diff(active: dict[str, Entry], passive: dict[str, Entry], *, kept: Iterable[Entry] = ()) -> list[Difference]:
    """Differences in an order that is safe to repair: extras first, then the active's walk order.

    `kept` are directories the passive listed apart because they hold only its identity files
    (`engine.manifest.split_identity_dirs`). One counts only where the active has the path, so
    a mode or a file there is still a difference, and a directory the clone kept after the active
    removed it is none: repair could never remove it.
    """
    counted = {e.path: e for e in kept if e.path in active}
    if counted:
        passive = {**passive, **counted}
    out: list[Difference] = []
    extra = {p for p in passive if p not in active}
    out += [Difference(path, "extra", None, passive[path]) for path in outermost(extra)]
    for path, a in active.items():
        p = passive.get(path)
        kind = _compare(a, p)
        if kind:
            out.append(Difference(path, kind, a, p))
    return out


#: Files at least this large travel in their own lane during a repair (see `lanes`).
LARGE_FILE = 1 << 20


def lanes(differences: list[Difference]) -> tuple[list[Difference], list[Difference], list[Difference]]:
    """Split a repair list into what must go first and two lanes that may travel side by side.

    First: extras and everything that is not a file on the active (directories, symlinks), in
    order, so every parent exists before anything lands in it. Then the small files and the large
    ones, each in order: the large lane waits on the disk, the small one on the CPU and on many
    short reads, and shipped together each fills the other's gaps (a sync of 1 GiB in 8 files and
    20,000 small ones was the sum of the two).
    """
    first: list[Difference] = []
    small: list[Difference] = []
    large: list[Difference] = []
    for d in differences:
        a = d.active
        if a is None or a.kind != "file":
            first.append(d)
        elif a.size >= LARGE_FILE:
            large.append(d)
        else:
            small.append(d)
    return first, small, large


def repair_records(root: Path, differences: list[Difference], *, trees: Iterable["ProtectedTree"], block_size: int,
                   chunk: int, on_hashed: Callable[[Entry], None] | None = None,
                   grouped: bool = True) -> Iterator[Record]:
    """Records that turn the passive's version of each differing path into the active's.

    `on_hashed` receives the entry of every file hashed on the way (with its digests), so the
    caller can keep them. Files further down the list are announced to the kernel ahead of
    time: on a cold cache many small reads in flight beat one at a time. Small new files go
    `GROUP_FILES` (and at most `chunk` bytes) to a "files" record, or with `grouped` False (a
    passive of an older version, which does not know that op) one to a "file" record each. Files are opened with no symlink
    on the way (`engine.paths.Beneath`) in the protected `trees`.
    """
    beneath = Beneath(Path(root), trees)
    ahead = _Prefetch(beneath, differences)
    group: list[Record] = []  # small new files read, not yet yielded: a one-file "files" record each
    group_bytes = 0
    try:
        for i, d in enumerate(differences):
            ahead.advance(i)
            for record in _records(beneath, d, ahead.take(i), block_size, chunk, on_hashed):
                if record[0] == "files" and not grouped:
                    record = _one_file(record)
                if group and (record[0] != "files" or len(group) == GROUP_FILES
                              or group_bytes + len(record[2]) > chunk):
                    yield _joined(group)
                    group, group_bytes = [], 0
                if record[0] == "files":
                    group.append(record)
                    group_bytes += len(record[2])
                else:
                    yield record
        if group:
            yield _joined(group)
    finally:
        ahead.close()
        beneath.close()


def _joined(group: list[Record]) -> Record:
    """One-file "files" records as one. The owners go in a list of their own: a passive of an
    older version reads only the four values of each file."""
    return ("files", {"files": [r[1]["files"][0] for r in group], "owners": [r[1]["owners"][0] for r in group]},
            b"".join(r[2] for r in group))


def _one_file(record: Record) -> Record:
    """A "files" record of one file as the "file" record that carried it before "files" existed."""
    [(path, size, mode, mtime_ns)] = record[1]["files"]
    return "file", {"path": path, "gid": None, "size": size, "mode": mode, "mtime_ns": mtime_ns, "fresh": True,
                    "owner": record[1]["owners"][0]}, record[2]


def _records(beneath: Beneath, d: Difference, fd: int | None, block_size: int, chunk: int,
             on_hashed: Callable[[Entry], None] | None) -> Iterator[Record]:
    """The records of one difference; `fd` is the active's file, already open (or None)."""
    if d.kind == "extra":
        yield "delete", {"path": d.path}, b""
        return
    a = d.active
    assert a is not None
    owner = {"owner": list(a.owner)} if a.owner is not None else {}
    if a.kind == "dir":
        yield "mkdir", {"path": a.path, "mode": a.mode, "mtime_ns": a.mtime_ns, **owner}, b""
    elif a.kind == "symlink":
        yield "symlink", {"path": a.path, "target": a.target, "mtime_ns": a.mtime_ns, **owner}, b""
    else:
        if fd is None:
            try:
                fd = beneath.open(a.path, _READ)
            except OSError:
                return  # vanished since the scan (or a symlink is on the way): the journal carries its delete
        yield from _file_records(fd, a, d.passive, block_size, chunk, on_hashed)


def _file_records(fd: int, a: Entry, p: Entry | None, block_size: int, chunk: int,
                  on_hashed: Callable[[Entry], None] | None) -> Iterator[Record]:
    """The records of a file of the active's (`fd`, closed here) that the passive lacks or differs."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        mode = stat.S_IMODE(st.st_mode)
        fresh = p is None or p.kind != "file" or p.hashes is None
        if fresh and st.st_size <= INLINE_BYTES:
            # Small and new: the whole content at once, grouped with the next ones (`GROUP_FILES`).
            data = read_whole(fd, st.st_size)
            if (os.fstat(fd).st_mtime_ns, len(data)) == (st.st_mtime_ns, st.st_size) and on_hashed is not None:
                on_hashed(Entry(a.path, "file", mode, st.st_size, st.st_mtime_ns, None, hash_bytes(data, block_size),
                                st.st_uid, st.st_gid))
            yield "files", {"files": [[a.path, len(data), mode, st.st_mtime_ns]],
                            "owners": [[st.st_uid, st.st_gid]]}, data
            return
        gid = -next(_gids)
        if fresh:
            # One pass: every block is read to be shipped anyway, so it is hashed on the way.
            digests = new_digests(st.st_size, block_size)
            zero = zero_digest(block_size)
            for pos, buf in read_hashing(fd, block_size, digests, chunk, size=st.st_size):
                for offset, data in _nonzero_runs(pos, buf, digests, block_size, zero):
                    # The blocks' digests travel along: the passive keeps them instead of hashing
                    # the data again (a third of its GIL-held time in a sync of large files).
                    first = offset // block_size
                    run = digests[first * DIGEST_SIZE : (first - (-len(data) // block_size)) * DIGEST_SIZE]
                    yield "data", {"path": a.path, "gid": gid, "offset": offset, "fresh": True,
                                   "digests": run.hex()}, data
            hashes = bytes(digests)
        else:
            # The scan that found this difference hashed the file; hash again only if it changed since.
            known = (a.hashes if a.hashes is not None and (st.st_size, st.st_mtime_ns) == (a.size, a.mtime_ns)
                     else hash_file(fd, block_size, st.st_size))
            blocks = changed_blocks(p.hashes, known)  # type: ignore[union-attr]
            shipped = bytearray(known)
            for offset, data in read_shipped(fd, blocks, shipped, block_size, st.st_size, chunk):
                yield "data", {"path": a.path, "gid": gid, "offset": offset, "fresh": False}, data
            hashes = bytes(shipped)
        end = os.fstat(fd)
        if on_hashed is not None and (end.st_size, end.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            on_hashed(Entry(a.path, "file", mode, st.st_size, st.st_mtime_ns, None, hashes, st.st_uid, st.st_gid))
        yield "file", {"path": a.path, "gid": gid, "size": st.st_size, "mode": mode,
                       "mtime_ns": st.st_mtime_ns, "fresh": fresh, "owner": [st.st_uid, st.st_gid]}, b""
    finally:
        os.close(fd)


def _nonzero_runs(pos: int, buf: bytes, digests: bytearray, block_size: int,
                  zero: bytes) -> Iterator[tuple[int, memoryview]]:
    """(offset, data) of the runs of blocks in `buf` that are not all zeros: a fresh file is
    created sparse on the passive, so zero blocks need not travel."""
    view = memoryview(buf)
    first = pos // block_size
    start = None
    n = -(-len(buf) // block_size)
    if digests.find(zero, first * DIGEST_SIZE, (first + n) * DIGEST_SIZE) < 0:
        yield pos, view  # no zero block at all (the usual case): one run, without a loop
        return
    for k in range(n + 1):
        is_zero = k == n or digests[(first + k) * DIGEST_SIZE : (first + k + 1) * DIGEST_SIZE] == zero
        if not is_zero and start is None:
            start = k
        elif is_zero and start is not None:
            yield pos + start * block_size, view[start * block_size : k * block_size]
            start = None


class _Prefetch:
    """Asks the kernel to start reading the next small files of a repair list (WILLNEED), and
    keeps them open until they are read (one open each, not two).

    Large files are left out: they are read chunk by chunk, directly where not cached
    (`engine.direct`), and announcing them would pull their start through the page cache.
    """

    FILES = 64
    BYTES = 32 << 20

    def __init__(self, beneath: Beneath, differences: list[Difference]) -> None:
        self.beneath = beneath
        self.differences = differences
        self.next = 0  # the first difference not announced yet
        self.announced: collections.deque[tuple[int, int]] = collections.deque()  # (index, bytes)
        self.pending = 0
        self.fds: dict[int, int] = {}  # index -> the file, open

    def advance(self, current: int) -> None:
        while self.announced and self.announced[0][0] < current:
            self.pending -= self.announced.popleft()[1]
        while (self.next < len(self.differences) and self.next - current < self.FILES
               and self.pending < self.BYTES):
            d, size = self.differences[self.next], 0
            a = d.active
            if d.kind != "extra" and a is not None and a.kind == "file" and 0 < a.size < LARGE_FILE:
                size = a.size
                self._announce(self.next, a.path, size)
            self.announced.append((self.next, size))
            self.pending += size
            self.next += 1

    def take(self, index: int) -> int | None:
        """The open file of difference `index`, if it was announced; the caller closes it."""
        return self.fds.pop(index, None)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _announce(self, index: int, path: str, size: int) -> None:
        try:
            fd = self.beneath.open(path, _READ)
        except OSError:
            return  # vanished: its reader finds out
        self.fds[index] = fd
        try:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


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
    if a.owner is not None and p.owner is not None and a.owner != p.owner:
        return "owner"
    return ""
