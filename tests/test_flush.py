"""Early flushes: a sync's pages reach the disk while it is still arriving, one flush at a time."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from engine.direct import cachestat
from engine.flush import EarlyFlush
from tests.conftest import wait_for
from tests.test_direct import on_a_disk

MIB = 1 << 20


def dirty_pages(path: Path) -> int:
    """Pages of `path` not yet written back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = cachestat(fd)
    finally:
        os.close(fd)
    assert st is not None, "cachestat(2) is missing (Linux 6.5 and later)"
    return st.nr_dirty + st.nr_writeback


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
