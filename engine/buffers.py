"""Reused, page-aligned buffers for bulk data: frame bodies on the passive, direct reads on
the active.

A fresh buffer of megabytes per frame or per read costs a zero-fill and a page fault per
page, every time; on a virtual machine whose host reclaims free guest memory each fault is
also a trip to the host (about a tenth of a passive's CPU in a sync). Pooled buffers are
mmap'ed, so page-aligned: data received into them can be written with O_DIRECT as it is, and
data read into them with O_DIRECT needs no copy out.

A buffer is free again once nothing refers to it: every memoryview sliced from it, however
far it travels (a record's data, a frame part waiting for the TLS writer), holds a reference
to its mmap. Buffers idle for `idle` seconds are let go, at the next `take` or when the agent
calls `trim_idle` (about every second), so a sync's hundred megabytes do not stay resident.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
import threading
import time
import weakref

__all__ = ["BufferPool", "is_aligned", "trim_idle"]

_pools: "weakref.WeakSet[BufferPool]" = weakref.WeakSet()


class BufferPool:
    """Buffers of `size` bytes (a whole number of pages), at most `most` of them at once."""

    def __init__(self, size: int, most: int, *, idle: float = 10.0) -> None:
        self.size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.most = most
        self.idle = idle
        self._pool: list[list] = []  # [mmap, monotonic time it was last handed out]
        self._trimmed = time.monotonic()
        self._lock = threading.Lock()
        _pools.add(self)

    def __len__(self) -> int:
        """Buffers held, in use or idle."""
        return len(self._pool)

    def trim(self) -> None:
        """Let go of the buffers nothing refers to that have been idle for `idle` seconds."""
        with self._lock:
            self._trim(time.monotonic())

    def take(self, n: int) -> memoryview | None:
        """A writable view of `n` bytes at the start of a free buffer; None when `n` does not
        fit one or all `most` are in use (the caller allocates as before)."""
        if n > self.size:
            return None
        now = time.monotonic()
        with self._lock:
            if now - self._trimmed > 1.0:
                self._trim(now)
            for entry in self._pool:
                if _free(entry):
                    entry[1] = now
                    return memoryview(entry[0])[:n]
            if len(self._pool) >= self.most:
                return None
            buf = mmap.mmap(-1, self.size)
            self._pool.append([buf, now])
            return memoryview(buf)[:n]

    def _trim(self, now: float) -> None:
        self._trimmed = now
        self._pool = [e for e in self._pool if now - e[1] < self.idle or not _free(e)]


def trim_idle() -> None:
    """Trim every pool of this process (the agent's maintenance loop calls this)."""
    for pool in list(_pools):
        pool.trim()


def is_aligned(view: memoryview, align: int) -> bool:
    """Whether a writable view starts at a multiple of `align` in memory (False if read-only)."""
    if view.readonly or not view.c_contiguous:
        return False
    try:
        anchor = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return False  # empty, or not a plain byte buffer
    address = ctypes.addressof(anchor)
    del anchor
    return address % align == 0


def _free(entry: list) -> bool:
    buf = entry[0]
    return sys.getrefcount(buf) == 3  # the pool's entry, `buf` and the argument: no view of it is left
