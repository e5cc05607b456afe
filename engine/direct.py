"""Bulk reads and writes that bypass the page cache (O_DIRECT).

An initial sync or a reclone reads the active's whole protected set once and writes it once on
the passive. Through the page cache every byte lands in freshly allocated cache pages that
nobody reads soon, and they crowd out the applications' working set on both nodes. Large
aligned chunks therefore go straight between the device and a reused buffer: on a virtual
machine whose host reclaims free guest memory, first touching a fresh page costs more than the
I/O itself (writing 512 MiB on the machine in bench/: 1.6 CPU-s buffered, 0.2 direct).

A chunk that is mostly cached already is read through the cache, which is faster than the
device (`cachestat`, Linux 6.5; without it every read stays buffered). Small and unaligned
I/O (under DIRECT_MIN) stays buffered, and so does everything once a file system has refused
O_DIRECT.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from engine.buffers import BufferPool, is_aligned

__all__ = ["ALIGN", "read_chunk", "write_chunk", "reads_direct", "cachestat", "pread_full", "pwrite_all"]

#: Offsets, lengths and memory of direct I/O are aligned to this (a page: enough for every
#: logical block size a Linux file system asks for).
ALIGN = 4096

#: Chunks smaller than this stay buffered: for them the device's latency outweighs the copy.
DIRECT_MIN = 1 << 20

#: A bounce buffer (data from the channel may sit at any address, the device wants it aligned),
#: and a pooled read buffer: one chunk of a sync.
BUFFER_BYTES = 4 << 20

#: A buffered write at least this large is handed to the disk at once (sync_file_range), so the
#: receiver's syncfs at the end of a batch finds little left to flush.
WRITEBACK_BYTES = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2
_NR_CACHESTAT = 451  # the same number on every architecture (new system calls share one table)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


_reads_direct = hasattr(os, "O_DIRECT")
_writes_direct = hasattr(os, "O_DIRECT")
_read_buffers = BufferPool(BUFFER_BYTES, 10)  # direct reads on their way to a passive: about SEND_BUFFER of them
_spare: list[mmap.mmap] = []  # bounce buffers not in use
_spare_lock = threading.Lock()


def read_chunk(fd: int, length: int, offset: int) -> bytes | memoryview:
    """`length` bytes at `offset` (fewer at the end of the file): from the device when they are
    not cached, through the page cache when they are or when this cannot be told.

    A direct read comes back as a view of a pooled buffer (`engine.buffers`), which is reused
    once the caller and whoever it hands the data to let go of it."""
    if _reads_direct and length >= DIRECT_MIN and offset % ALIGN == 0 and not _mostly_cached(fd, offset, length):
        data = _read_direct(fd, length, offset)
        if data is not None:
            return data
    return pread_full(fd, length, offset)


def write_chunk(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`: its aligned part directly where that can be done, the rest
    (a file's tail, or everything on a file system without O_DIRECT) through the page cache."""
    view = memoryview(data).cast("B")
    if _writes_direct and offset % ALIGN == 0 and len(view) >= DIRECT_MIN:
        aligned = view[: len(view) // ALIGN * ALIGN]
        # Data received into a pooled (page-aligned) frame buffer goes to the device as it is.
        done = _write_direct(fd, aligned, offset, bounce=not is_aligned(aligned, ALIGN))
        view, offset = view[done:], offset + done
    pwrite_all(fd, view, offset)
    if len(view) >= WRITEBACK_BYTES:
        _libc.sync_file_range(fd, offset, len(view), _SYNC_FILE_RANGE_WRITE)  # best effort


def cachestat(fd: int, offset: int = 0, length: int = 0) -> _Cachestat | None:
    """The page cache's state of a range of an open file (`length` 0: to the end), or None
    where the kernel cannot tell (cachestat(2), Linux 6.5)."""
    st = _Cachestat()
    if _libc.syscall(_NR_CACHESTAT, fd, ctypes.byref(_CachestatRange(offset, length)), ctypes.byref(st), 0) != 0:
        return None
    return st


def reads_direct() -> bool:
    """Whether `read_chunk` still reads around the page cache (it stops at the first refusal)."""
    return _reads_direct


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`, fewer only at the end of the file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# -- private ---------------------------------------------------------------------------------

def _mostly_cached(fd: int, offset: int, length: int) -> bool:
    global _reads_direct
    st = cachestat(fd, offset, length)
    if st is None:
        _reads_direct = False  # a kernel before 6.5 (ENOSYS), or a file it cannot tell about
        return True
    return st.nr_cache * ALIGN * 2 >= length


def _read_direct(fd: int, length: int, offset: int) -> memoryview | None:
    """The bytes, read directly into a pooled page-aligned buffer (a fresh one when all are in
    use); None if refused."""
    global _reads_direct
    whole = -(-length // ALIGN) * ALIGN  # whole pages: reading past the end of the file is fine
    buf = _read_buffers.take(whole)
    if buf is None:
        buf = memoryview(mmap.mmap(-1, whole))
    with _direct_mode(fd) as ok:
        if not ok:
            _reads_direct = False
            return None
        try:
            n = os.preadv(fd, [buf], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _reads_direct = False  # the file system took the flag and refuses the read
            return None
    return buf[: min(n, length)]


def _write_direct(fd: int, view: memoryview, offset: int, *, bounce: bool) -> int:
    """Bytes of `view` (a whole number of ALIGN) written directly, through a bounce buffer
    unless `view` is aligned in memory already; fewer after a refusal."""
    global _writes_direct
    done = 0
    with _direct_mode(fd) as ok, (_bounce() if bounce else nullcontext()) as buf:
        if not ok:
            _writes_direct = False
            return 0
        while done < len(view):
            if bounce:
                n = min(BUFFER_BYTES, len(view) - done)
                buf[:n] = view[done : done + n]
                chunk = buf[:n]
            else:
                chunk = view[done:]
                n = len(chunk)
            try:
                written = os.pwrite(fd, chunk, offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or done:
                    raise
                _writes_direct = False
                return 0
            done += written
            if written < n:
                break  # a short write: the rest goes through the page cache
    return done


@contextmanager
def _direct_mode(fd: int) -> Iterator[bool]:
    """O_DIRECT on `fd` for the block (False when the file system refuses it), then as before."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        yield False
        return
    try:
        yield True
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


@contextmanager
def _bounce() -> Iterator[memoryview]:
    """A page-aligned buffer of BUFFER_BYTES, reused: fresh memory is what this module avoids."""
    with _spare_lock:
        buf = _spare.pop() if _spare else mmap.mmap(-1, BUFFER_BYTES)
    view = memoryview(buf)
    try:
        yield view
    finally:
        view.release()
        with _spare_lock:
            _spare.append(buf)
