"""Block hashes of the files a passive applied, kept for the day it is promoted.

A node that is promoted starts a new journal whose baseline records metadata only
(`Journaler.baseline`); a file without block hashes is shipped whole the first time it changes,
so without these a failover would turn every later edit of a large file into a full copy. A
passive therefore keeps, in the same `shipped` table an active uses, the hashes of each file
version it commits: digests of the blocks it was sent (hashing bytes already in memory costs a
fraction of reading them back), the hashes it held for blocks that did not change, zero digests
for holes, and a fresh read of the rare block it cannot derive (a short last block whose length
changed). The baseline keeps a row's hashes where the file's size and mtime still match.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.blocks import DIGEST_SIZE, hash_bytes, zero_digest
from engine.journaler import forget_shipped, move_shipped, put_shipped, shipped_entry
from engine.manifest import Entry

#: A staged file whose hashes would need more blocks read back than this is left without
#: hashes (its first change after a promotion ships it whole, as before).
MAX_READ_BACK = 16


@dataclass
class StagedDigests:
    """Digests of the runs of blocks one staged file was sent: a few Python operations per
    record, whatever its size (the hashing itself is xxh3 in C)."""

    block_size: int
    runs: list[tuple[int, bytes, int]] = field(default_factory=list)  # (first block, digests, bytes)
    unaligned: bool = False

    def add(self, offset: int, data: bytes | memoryview, digests: bytes | None = None) -> None:
        """Record the blocks of one write; `digests`, when the sender brought them along, are
        those of `data` (the active hashed what it read), so it is not hashed again."""
        if offset % self.block_size:
            self.unaligned = True  # no sender writes this way; hashes would need a full read back
            return
        if digests is None:
            digests = hash_bytes(data, self.block_size)
        self.runs.append((offset // self.block_size, digests, len(data)))

    def final(self, size: int, *, fresh: bool, base: Entry | None,
              read_block: Callable[[int], bytes]) -> bytes | None:
        """Hashes of the committed file of `size` bytes, or None when they cannot be had cheaply.

        `fresh`: the stage started empty (untouched blocks are holes); else it started as a copy
        of the target, whose hashes `base` holds when known. Every block's digest must cover
        min(block size, what is left of the file): a short block whose length changed is read back.
        """
        bs, d = self.block_size, DIGEST_SIZE
        if self.unaligned or (not fresh and (base is None or base.hashes is None)):
            return None
        n = -(-size // bs)
        full_zero = zero_digest(bs)
        cover: dict[int, int] = {}  # block -> bytes its digest in `out` covers, where that is not a full block
        if fresh:
            out = bytearray(full_zero * n)  # holes; a short last hole is read back below (as zeros)
        else:
            assert base is not None and base.hashes is not None
            base_n = -(-base.size // bs)
            keep = min(base_n, n, len(base.hashes) // d)
            out = bytearray(base.hashes[: keep * d]) + full_zero * (n - keep)
            if base.size % bs and base_n - 1 < n:
                cover[base_n - 1] = base.size - (base_n - 1) * bs
        for first, digests, length in self.runs:
            k = len(digests) // d
            upto = min(first + k, n)
            if upto <= first:
                continue
            out[first * d : upto * d] = digests[: (upto - first) * d]
            for i in [i for i in cover if first <= i < upto]:
                del cover[i]
            tail = length - (k - 1) * bs
            if tail != bs and first + k - 1 < n:
                cover[first + k - 1] = tail
        last = n - 1
        stale = [i for i, c in cover.items() if c != min(bs, size - i * bs)]
        if n and size - last * bs != bs and cover.get(last, bs) != size - last * bs and last not in stale:
            stale.append(last)
        if len(stale) > MAX_READ_BACK:
            return None
        for i in stale:
            out[i * d : (i + 1) * d] = hash_bytes(read_block(i), bs)
        return bytes(out)


class Held:
    """The passive's `shipped` rows, written in batches: `flush` at every applied-position commit."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._puts: dict[str, Entry] = {}

    def get(self, path: str) -> Entry | None:
        if path in self._puts:
            return self._puts[path]
        return shipped_entry(self.db, path)

    def put(self, entry: Entry) -> None:
        self._puts[entry.path] = entry

    def forget(self, path: str) -> None:
        """`path` and everything below it are gone (or no longer what the rows describe)."""
        self.flush()
        forget_shipped(self.db, path)

    def move(self, src: str, dst: str) -> None:
        self.flush()
        move_shipped(self.db, src, dst)

    def retime(self, path: str, mode: int, mtime_ns: int) -> None:
        """Mode and mtime changed, content did not."""
        e = self.get(path)
        if e is not None and e.kind == "file":
            self._puts[path] = Entry(path, "file", mode, e.size, mtime_ns, None, e.hashes)

    def flush(self) -> None:
        """Write what is pending (inside the caller's transaction if one is open)."""
        if not self._puts:
            return
        entries, self._puts = list(self._puts.values()), {}
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN IMMEDIATE")
        try:
            put_shipped(self.db, *entries)
        except BaseException:
            if own:
                self.db.execute("ROLLBACK")
            raise
        if own:
            self.db.execute("COMMIT")
