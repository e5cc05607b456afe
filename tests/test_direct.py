"""Bulk I/O around the page cache: every byte arrives, and a sync does not fill the cache."""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from engine import direct
from engine.buffers import BufferPool
from tests.conftest import require

MIB = 1 << 20


def resident(path: Path) -> int:
    """Bytes of `path` in the page cache, as util-linux's fincore sees them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def on_a_disk(path: Path) -> None:
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(path)], check=True, capture_output=True, text=True).stdout
    require(fs.strip() not in ("tmpfs", "ramfs"), f"{path} is on {fs.strip()}: its pages are all cache")


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def fresh_module_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "_reads_direct", True)
    monkeypatch.setattr(direct, "_writes_direct", True)
    monkeypatch.setattr(direct, "_spare", [])


def test_a_large_write_lands_whole_and_leaves_the_cache_alone(tmp_path: Path) -> None:
    on_a_disk(tmp_path)
    data = os.urandom(9 * MIB + 100)  # more than one bounce buffer, and a tail that is not aligned
    f = tmp_path / "big"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        direct.write_chunk(fd, memoryview(data)[17:], 0)  # the source need not be aligned in memory
        direct.write_chunk(fd, b"x" * 5000, len(data) - 17)  # nor need its length be
    finally:
        os.close(fd)
    cached = resident(f)  # before anything reads the file back
    assert cached <= 2 * direct.ALIGN, f"{cached} bytes of a direct write stayed in the page cache"
    assert f.read_bytes() == data[17:] + b"x" * 5000


def test_data_in_page_aligned_memory_is_written_as_it_is(tmp_path: Path) -> None:
    """A body received into a pooled buffer goes to the device without the bounce buffer."""
    on_a_disk(tmp_path)
    data = os.urandom(6 * MIB)
    view = BufferPool(8 * MIB, 1).take(len(data))
    assert view is not None
    view[:] = data
    f = tmp_path / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        direct.write_chunk(fd, view, 0)
    finally:
        os.close(fd)
    assert not direct._spare, "the bounce buffer was used for memory that needs none"
    assert resident(f) == 0
    assert f.read_bytes() == data


def test_an_unaligned_offset_is_written_through_the_cache(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB)
    f = tmp_path / "f"
    f.write_bytes(b"a" * 10)
    fd = os.open(f, os.O_RDWR)
    try:
        direct.write_chunk(fd, data, 10)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"a" * 10 + data


def test_an_uncached_file_is_read_from_the_device_and_a_cached_one_from_the_cache(tmp_path: Path) -> None:
    on_a_disk(tmp_path)
    data = os.urandom(6 * MIB + 123)
    f = tmp_path / "f"
    f.write_bytes(data)
    evict(f)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert direct.read_chunk(fd, 8 * MIB, 0) == data  # asks past the end: gets the file
        assert direct.read_chunk(fd, MIB, 5 * MIB) == data[5 * MIB : 6 * MIB]
        assert resident(f) == 0, "reading an uncached file filled the page cache"
        os.pread(fd, len(data), 0)  # now it is cached
        assert direct.read_chunk(fd, 2 * MIB, 4 * MIB) == data[4 * MIB : 6 * MIB]
    finally:
        os.close(fd)
    assert direct.reads_direct()


def test_a_file_system_that_refuses_o_direct_still_gets_every_byte(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = fcntl.fcntl

    def refuse(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(direct.fcntl, "fcntl", refuse)
    data = os.urandom(3 * MIB)
    f = tmp_path / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        direct.write_chunk(fd, data, 0)
        evict(f)
        assert direct.read_chunk(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert f.read_bytes() == data
    assert not direct.reads_direct() and not direct._writes_direct, "a refusal turns direct I/O off"
