"""Early flushes: a sync's pages reach the disk while it is still arriving, one flush at a time."""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from engine.flush import EarlyFlush
from tests.conftest import wait_for
from tests.test_direct import on_a_disk

MIB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recent")]


def dirty_pages(path: Path) -> int:
    """Pages of `path` not yet written back (cachestat(2), Linux 6.5 and later)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _Stat()
        if _libc.syscall(451, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(st), 0) != 0:
            raise OSError(ctypes.get_errno(), "cachestat")
        return st.dirty + st.writeback
    finally:
        os.close(fd)


def flushing() -> bool:
    return any(t.name == "early-flush" for t in threading.enumerate())


def test_a_kick_writes_the_dirty_pages_back_in_the_background(tmp_path: Path) -> None:
    on_a_disk(tmp_path)
    f = tmp_path / "f"
    f.write_bytes(os.urandom(8 * MIB))
    assert dirty_pages(f) > 0
    EarlyFlush(tmp_path).kick()
    wait_for(lambda: dirty_pages(f) == 0, timeout=20, what="the early flush to write the file back")


def test_a_kick_soon_after_a_flush_leaves_new_pages_to_the_next(tmp_path: Path) -> None:
    on_a_disk(tmp_path)
    flush = EarlyFlush(tmp_path, interval=3600)
    first = tmp_path / "first"
    first.write_bytes(os.urandom(MIB))
    flush.kick()
    wait_for(lambda: dirty_pages(first) == 0 and not flushing(), timeout=20, what="the first flush to end")
    second = tmp_path / "second"
    second.write_bytes(os.urandom(8 * MIB))
    for _ in range(100):
        flush.kick()
    assert dirty_pages(second) > 0, "a kick within the interval flushed again"
