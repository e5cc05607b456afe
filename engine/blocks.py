"""Block hashes: xxh3-128 digests of fixed-size blocks, concatenated into one bytes object.

Digest i (bytes 16*i .. 16*i+16) covers bytes [i*block_size, (i+1)*block_size) of the file; the
last block is hashed at its real length. Holes are found with SEEK_DATA/SEEK_HOLE and given
the digest of a zero block without being read, so a large sparse file hashes in the time its
data takes. A block of zeros written out and a hole hash the same: they read the same.
"""
from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import xxhash

from engine.direct import pread_full, read_chunk, reads_direct

__all__ = ["DIGEST_SIZE", "zero_digest", "ZERO_DIGEST", "hash_file", "changed_blocks", "read_ranges",
           "read_shipped", "data_extents", "new_digests", "read_hashing", "hash_bytes", "read_whole", "INLINE_BYTES"]

DIGEST_SIZE = 16

#: Bytes read per pread while hashing (a whole number of blocks at least this large).
_READ_BYTES = 4 << 20

#: A new file up to this size is shipped whole in one record (see `engine.apply`).
INLINE_BYTES = 64 << 10

_digest = xxhash.xxh3_128_digest

#: Digests of full zero blocks of every block size hashed so far (see `changed_blocks`).
_zero_digests: set[bytes] = set()


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """Digest of `length` zero bytes (a hole block, or a block written full of zeros)."""
    d = _digest(bytes(length))
    _zero_digests.add(d)
    return d


ZERO_DIGEST = zero_digest


def hash_file(path_or_fd: int | str | Path, block_size: int, size: int | None = None) -> bytes:
    """Digests of every block of a regular file, holes skipped without reading them.

    Given an fd, reads with pread and leaves its offset where it was. `size` is the length the
    caller stat'ed: exactly that much is hashed however the file has grown since, so digests
    and size describe one length. A file that changes while it is hashed gives digests of a mix
    of versions; capture sees the change and hashes it again.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if isinstance(path_or_fd, int):
        pos = os.lseek(path_or_fd, 0, os.SEEK_CUR)
        try:
            return _hash_fd(path_or_fd, block_size, size)
        finally:
            os.lseek(path_or_fd, pos, os.SEEK_SET)  # SEEK_DATA/SEEK_HOLE moved it
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _hash_fd(fd, block_size, size)
    finally:
        os.close(fd)


def hash_bytes(data: bytes | memoryview, block_size: int) -> bytes:
    """Digests of a file whose whole content is `data` (the same as `hash_file` would give)."""
    if 0 < len(data) <= block_size:
        return _digest(data)  # one block: most small files
    view = memoryview(data)
    return b"".join([_digest(view[off : off + block_size]) for off in range(0, len(view), block_size)])


def read_whole(fd: int, size: int) -> bytes:
    """The first `size` bytes of a file (fewer if it shrank), in as few reads as it takes."""
    return pread_full(fd, size, 0)


def changed_blocks(old: bytes | None, new: bytes, *, block_size: int | None = None) -> list[int]:
    """Indices of blocks in `new` whose digest differs from `old`'s or that `old` lacks.

    With `old` None (a fresh file) every block is sent except full zero blocks: the passive
    creates a fresh file sparse (ftruncate to its size), so holes and zero blocks read as zeros
    without being shipped. The zero digest is that of `block_size` when given, else of any block
    size this process has hashed with (hash_file always computes it first).
    """
    n = len(new) // DIGEST_SIZE
    if old is None:
        zeros = {zero_digest(block_size)} if block_size else _zero_digests
        return [i for i in range(n) if new[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] not in zeros]
    m = len(old) // DIGEST_SIZE
    out = [i for i in range(min(n, m))
           if new[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] != old[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]]
    out.extend(range(m, n))
    return out


def read_ranges(fd: int, indices: Sequence[int], block_size: int, size: int,
                max_chunk: int) -> Iterator[tuple[int, bytes]]:
    """(offset, data) for the given blocks, contiguous blocks merged into chunks of at most
    `max_chunk` bytes, read with pread; nothing past `size` (nor past the end of the file,
    should it have shrunk since) is returned.
    """
    if max_chunk <= 0:
        raise ValueError("max_chunk must be positive")
    for first, count in _runs(sorted(indices)):
        start = first * block_size
        end = min((first + count) * block_size, size)
        pos = start
        while pos < end:
            want = min(max_chunk, end - pos)
            data = read_chunk(fd, want, pos)
            if data:
                yield pos, data
            if len(data) < want:
                break  # the file shrank: the rest of this run is gone
            pos += want


#: The digest kept for a block that was to be shipped and was not read (the file shrank under
#: the reader): no block of data hashes to it, so the next look at the file ships the block.
UNSHIPPED = bytes(DIGEST_SIZE)


def read_shipped(fd: int, indices: Sequence[int], digests: bytearray, block_size: int, size: int,
                 max_chunk: int) -> Iterator[tuple[int, bytes | memoryview]]:
    """`read_ranges`, with the digests of the blocks read written into `digests`.

    The digests kept for a passive must be those of the bytes it was sent. Hashing reads the
    file once and shipping reads it again; a writer in between (a block changed and changed
    back) would otherwise leave a digest of data the passive never got, and the next change
    that restores it would not be shipped.
    """
    for i in indices:
        digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = UNSHIPPED
    step = max(block_size, max_chunk // block_size * block_size)  # whole blocks, each hashed whole
    for pos, data in read_ranges(fd, indices, block_size, size, step):
        hashed = hash_bytes(data, block_size)
        at = pos // block_size * DIGEST_SIZE
        digests[at : at + len(hashed)] = hashed
        yield pos, data


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the data regions of an open file up to `size`; one region if the file
    system cannot tell holes from data."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole from here on
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        if start >= size:
            return
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # truncated under us
                return
            raise
        end = min(end, size)
        if end <= start:
            return
        yield start, end
        pos = end


# -- private ---------------------------------------------------------------------------------

def _hash_fd(fd: int, block_size: int, size: int | None) -> bytes:
    if size is None:
        size = os.fstat(fd).st_size
    digests = new_digests(size, block_size)
    for _ in read_hashing(fd, block_size, digests, size=size):
        pass
    return bytes(digests)


def new_digests(size: int, block_size: int) -> bytearray:
    """Digests of a file of `size` bytes that is one hole: the start `read_hashing` fills in."""
    n = -(-size // block_size)
    if n == 0:
        return bytearray()
    out = bytearray(zero_digest(block_size) * n)
    tail = size - (n - 1) * block_size
    if tail != block_size:  # a short last block in a hole: zeros of its own length
        out[(n - 1) * DIGEST_SIZE :] = _digest(bytes(tail))
    return out


def read_hashing(fd: int, block_size: int, digests: bytearray, step: int = _READ_BYTES, *,
                 size: int) -> Iterator[tuple[int, bytes]]:
    """Read every data extent of the first `size` bytes of a file once, block-aligned, writing
    each block's digest into `digests` (from `new_digests(size)`) and yielding (offset, data)
    of each read; nothing past `size` is read, however the file has grown.

    So a caller that ships a file hashes it on the way instead of reading it twice. What is not
    cached is read from the device directly (`engine.direct`); where that cannot be done, the
    next read is announced to the kernel (WILLNEED) before this one is handed out, so the disk
    works while the caller does. Stops early if the file shrinks.
    """
    step = max(block_size, step // block_size * block_size)
    done = 0  # blocks below this index are hashed already
    # A file that fits one read is read whole: zeros hash like a hole, and asking where the
    # holes are would cost more system calls than the read.
    extents = [(0, size)] if size <= step else data_extents(fd, size)
    for start, end in extents:
        first = max(start // block_size, done)
        last = -(-end // block_size)  # one past the last block this extent touches
        pos = first * block_size
        stop = min(last * block_size, size)
        while pos < stop:
            want = min(step, stop - pos)
            if pos + want < stop and not reads_direct():
                os.posix_fadvise(fd, pos + want, 2 * step, os.POSIX_FADV_WILLNEED)
            buf = read_chunk(fd, want, pos)
            if buf:
                hashed = hash_bytes(buf, block_size)
                at = pos // block_size * DIGEST_SIZE
                digests[at : at + len(hashed)] = hashed
                yield pos, buf
            if len(buf) < want:
                return  # the file shrank while we read it
            pos += len(buf)
        done = last


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive indices (duplicates ignored)."""
    first = prev = None
    for i in indices:
        if prev is not None and i == prev:
            continue
        if first is None:
            first = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            yield first, prev - first + 1  # type: ignore[operator]
            first = prev = i
    if first is not None:
        yield first, prev - first + 1  # type: ignore[operator]
