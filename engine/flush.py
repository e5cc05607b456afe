"""Making the replica durable: `syncfs` before an applied position is committed, and early
flushes in the background while a sync is still arriving."""
from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

__all__ = ["syncfs", "EarlyFlush"]

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the file system holding `path` (every file system, where syncfs is refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class EarlyFlush:
    """Flushes the replica's file system in the background while a sync is still arriving.

    A passive counts a sync done only once `level` is applied, after a syncfs. Left to that
    moment, the flush of 20,000 small files' pages and inodes took 0.2 s of a 3.9 s initial
    sync, with the disk idle before it. Kicked after every batch of sync records (one flush at
    a time, at most every `interval` seconds), it runs beside the transfer, and the last one
    finds little left to do. Durability does not depend on it: the final syncfs still runs.
    """

    def __init__(self, root: Path, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self._lock = threading.Lock()
        self._running = False
        self._next = 0.0

    def kick(self) -> None:
        """Start a flush unless one is running or the last ended less than `interval` ago."""
        with self._lock:
            if self._running or time.monotonic() < self._next:
                return
            self._running = True
        threading.Thread(target=self._run, name="early-flush", daemon=True).start()

    def _run(self) -> None:
        try:
            syncfs(self.root)
        except OSError:
            pass  # the root vanished or cannot be opened: the final syncfs reports it
        finally:
            with self._lock:
                self._running = False
                self._next = time.monotonic() + self.interval
