"""Background writes of large chunks: in order, never lost, errors surface at `wait`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.apply import Applier
from engine.writer import MIN_BYTES, BackgroundWrites

MIB = 1 << 20


def test_writes_land_in_order_and_wait_returns_once_they_are_on_the_file(tmp_path: Path) -> None:
    writes = BackgroundWrites(most=2 * MIB)  # a small budget: writing waits for earlier ones
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        chunks = [os.urandom(MIB) for _ in range(6)]
        for i, chunk in enumerate(chunks):
            writes.write(fd, chunk, i * MIB)
        writes.write(fd, b"later" * (MIN_BYTES // 5 + 1), 0)  # overlaps chunk 0: written after it
        writes.wait(fd)
        data = os.pread(fd, 6 * MIB, 0)
    finally:
        os.close(fd)
    later = b"later" * (MIN_BYTES // 5 + 1)
    assert data[: len(later)] == later
    assert data[len(later) :] == b"".join(chunks)[len(later) :]


def test_a_failed_write_is_raised_by_wait_for_its_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    fd = os.open(tmp_path / "f", os.O_RDONLY)  # writing to it fails (EBADF)
    writes = BackgroundWrites()
    try:
        writes.write(fd, bytes(MIB), 0)
        with pytest.raises(OSError):
            writes.wait(fd)
        writes.wait(fd)  # reported once
    finally:
        os.close(fd)


def test_small_writes_are_done_at_once(tmp_path: Path) -> None:
    writes = BackgroundWrites()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writes.write(fd, b"now", 0)
        assert os.pread(fd, 3, 0) == b"now"  # no wait needed
    finally:
        os.close(fd)


def test_a_large_file_applied_in_megabyte_chunks_is_whole_when_committed(tmp_path: Path) -> None:
    (tmp_path / "srv/data").mkdir(parents=True)

    class Tree:
        path, rel, include, exclude = "/srv/data", "srv/data", (), ()

    applier = Applier(tmp_path, [Tree()])
    content = os.urandom(5 * MIB + 123)
    for off in range(0, len(content), MIB):
        applier.apply("data", {"path": "srv/data/big", "gid": 1, "offset": off, "fresh": True},
                      memoryview(content)[off : off + MIB])
    assert applier.apply("file", {"path": "srv/data/big", "gid": 1, "size": len(content), "mode": 0o640,
                                  "mtime_ns": 10**18, "fresh": True}) is True
    assert (tmp_path / "srv/data/big").read_bytes() == content
    assert (tmp_path / "srv/data/big").stat().st_mode & 0o777 == 0o640
