"""Until when is the journal complete? The point up to which every change made on disk is in it.

A sync reads the active's tree while changes keep coming, and the journal describes them only
later: inotify queues the events, the coalescer gathers them, the journaler reads the files.
A journal record after the sync's head may therefore describe a change the sync already read,
and replayed on top of it, a rename moves the wrong thing (`Sender.sync` explains what it does
about that). It needs a head that covers every change made before a given moment: a capture read begun
after that moment drains every event queued before it (inotify_simple reads all that is
pending), and the two journaler rounds begun after that read have journaled them and what they
put back (`Journaled.again`).
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


class CaptureBarrier:
    """Counts capture reads and journaler rounds; shared by the capture thread, the flush loop
    and the senders. Only `pokes` is read from the capture thread; the rest runs in the loop."""

    def __init__(self) -> None:
        self.pokes = 0  # waits begun
        self.read_after = 0  # the last wait that a finished capture read began after
        self.started = 0  # journaler rounds begun
        self.rounds = 0  # journaler rounds finished (one at a time)
        self._moved = asyncio.Event()
        # Written to wake the capture thread at once rather than at its next idle timeout.
        self.wake_fd, self._poke_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def captured(self, pokes: int) -> None:
        """A capture read finished that began after `pokes` waits had begun (its changes are in
        the coalescer: this is called after them)."""
        self.read_after = max(self.read_after, pokes)
        self._moved.set()

    def round_started(self) -> None:
        self.started += 1

    def round_done(self) -> None:
        self.rounds += 1
        self._moved.set()

    @property
    def flushing(self) -> bool:
        return self.started > self.rounds

    def woken(self) -> None:
        """The capture thread saw `wake_fd` ready."""
        try:
            os.read(self.wake_fd, 4096)
        except BlockingIOError:
            pass

    async def wait(self, idle: Callable[[], bool]) -> None:
        """Until every change made before this call is journaled; `idle` says that nothing is
        waiting to be journaled (then no further round comes, nor is needed)."""
        self.pokes += 1
        mine = self.pokes
        try:
            os.write(self._poke_fd, b"\0")
        except BlockingIOError:  # a poke is pending already
            pass
        await self._until(lambda: self.read_after >= mine)
        # The next round to begin takes those changes; the one after, what it put back.
        started = self.started
        await self._until(lambda: self.rounds >= started + 2 or idle())

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._moved.clear()
            await self._moved.wait()

    def close(self) -> None:
        os.close(self.wake_fd)
        os.close(self._poke_fd)
