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
    """Digests of the blocks one staged file was sent, by block index."""

    block_size: int
    full: dict[int, bytes] = field(default_factory=dict)
    short: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # index -> (length, digest)
    unaligned: bool = False

    def add(self, offset: int, data: bytes | memoryview) -> None:
        bs = self.block_size
        if offset % bs:
            self.unaligned = True  # no sender writes this way; hashes would need a full read back
            return
        digests = hash_bytes(data, bs)
        first = offset // bs
        for k in range(len(digests) // DIGEST_SIZE):
            d = digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
            length = min(bs, len(data) - k * bs)
            self.short.pop(first + k, None)
            self.full.pop(first + k, None)
            if length == bs:
                self.full[first + k] = d
            else:
                self.short[first + k] = (length, d)

    def final(self, size: int, *, fresh: bool, base: Entry | None,
              read_block: Callable[[int], bytes]) -> bytes | None:
        """Hashes of the committed file of `size` bytes, or None when they cannot be had cheaply.

        `fresh`: the stage started empty (untouched blocks are holes); else it started as a copy
        of the target, whose hashes `base` holds when known (its size is `base.size`).
        """
        bs = self.block_size
        if self.unaligned or (not fresh and base is None):
            return None
        base_hashes = base.hashes if base is not None and base.hashes is not None else b""
        base_size = base.size if base is not None else 0
        n = -(-size // bs)
        out: list[bytes] = []
        reads = 0
        for i in range(n):
            length = min(bs, size - i * bs)
            d = self.full.get(i) if length == bs else None
            if d is None and i in self.short and self.short[i][0] == length:
                d = self.short[i][1]
            if d is None and i not in self.full and i not in self.short:
                if fresh or i * bs >= base_size:
                    d = zero_digest(length)  # never written: a hole, or the zeros an extension adds
                elif length == min(bs, base_size - i * bs) and len(base_hashes) >= (i + 1) * DIGEST_SIZE:
                    d = base_hashes[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]  # unchanged
            if d is None:  # a block whose length changed: read it back
                reads += 1
                if reads > MAX_READ_BACK:
                    return None
                d = hash_bytes(read_block(i), bs)
            out.append(d)
        return b"".join(out)


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
            for e in entries:
                put_shipped(self.db, e)
        except BaseException:
            if own:
                self.db.execute("ROLLBACK")
            raise
        if own:
            self.db.execute("COMMIT")
