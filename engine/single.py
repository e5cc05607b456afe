"""One agent per node: an exclusive lock on the node's state directory.

A second agent for the same node (started by hand beside the service, or a second service unit)
would take over the first one's management socket and write the same journal and state. The
lock is an flock(2) on `STATE/agent.lock`, held by the open file for the agent's life: the
kernel drops it when the process ends, however it ends, so no stale lock outlives a crash.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from engine.errors import NfError

__all__ = ["hold_node_lock", "lock_holder", "AlreadyRunning"]

LOCK_NAME = "agent.lock"


class AlreadyRunning(NfError):
    """Another live agent holds this node's lock."""

    code = "already_running"


def hold_node_lock(node_id: str, state_dir: Path) -> int:
    """Take the node's lock and write our pid into it; return the fd, which must stay open.

    Raises AlreadyRunning, naming the pid that holds it, when another agent runs. The fd is
    close-on-exec, so applications the agent starts never keep the lock alive after it.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(
            f"the agent of node {node_id} is already running (pid {holder}, holding {path})",
            hint="stop that agent first (nf demo down, or its service), or ask it: nf status") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the agent holding the node's lock, or None when no agent runs.

    Read from /proc/locks rather than by trying the lock: a probe holding it even briefly could
    make an agent starting at that moment believe another one runs.
    """
    try:
        st = os.stat(state_dir / LOCK_NAME)
    except FileNotFoundError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        # "3: FLOCK  ADVISORY  WRITE 1362 fe:00:2146429 0 EOF" (a waiter's line has "->" after the number)
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            return int(fields[4])
    return None
