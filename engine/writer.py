"""Large chunks of staged files written by a thread of their own.

A passive applies records in one thread, in order. Written in that thread, each megabyte of a
large file held it for the disk's time, and the small files behind it waited: in an initial
sync of both kinds the passive's apply thread spent half its time waiting on O_DIRECT writes.
Written here, the apply thread goes on with the next records while the disk works.

The stage file a write goes to must not be used otherwise, nor closed (its fd number would be
reused, and a late write land in another file), until `wait` for it has returned: the Applier
waits before it commits, drops or closes a stage, and that is where a failed write surfaces.
"""
from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for

from engine.direct import write_chunk

__all__ = ["BackgroundWrites"]

#: Chunks at least this large go to the thread; smaller ones cost less than the hand-over.
MIN_BYTES = 256 << 10


class BackgroundWrites:
    """`write_chunk` calls done in order by one thread, at most `most` bytes outstanding."""

    def __init__(self, most: int = 16 << 20) -> None:
        self.most = most
        self._executor: ThreadPoolExecutor | None = None
        self._by_fd: dict[int, list[Future[None]]] = {}
        self._queued: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._bytes = 0

    def write(self, fd: int, data: memoryview | bytes, offset: int) -> None:
        """Write `data` at `offset` of `fd` now (small, and nothing pending for `fd`) or soon."""
        if len(data) < MIN_BYTES and fd not in self._by_fd:
            write_chunk(fd, data, offset)
            return
        while self._queued and self._bytes + len(data) > self.most:
            done, n = self._queued.popleft()
            wait_for([done])  # its outcome is collected by `wait` for its fd
            self._bytes -= n
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply-write")
        future = self._executor.submit(write_chunk, fd, data, offset)
        self._by_fd.setdefault(fd, []).append(future)
        self._queued.append((future, len(data)))
        self._bytes += len(data)

    def wait(self, fd: int) -> None:
        """Return once every write to `fd` is done; raises the first one's error, if any."""
        futures = self._by_fd.pop(fd, None)
        if not futures:
            return
        errors = [f.exception() for f in futures]  # waits for each
        for exc in errors:
            if exc is not None:
                raise exc
