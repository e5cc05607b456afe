"""Block hashes: sparse files hash in the time their data takes, and only changed blocks ship."""
from __future__ import annotations

import os
import time
from pathlib import Path

import xxhash

from engine.blocks import DIGEST_SIZE, changed_blocks, hash_file, read_ranges, zero_digest

BS = 64 << 10
GIB = 1 << 30


def _digests(hashes: bytes) -> list[bytes]:
    return [hashes[i : i + DIGEST_SIZE] for i in range(0, len(hashes), DIGEST_SIZE)]


def test_a_sparse_gib_hashes_fast_and_only_written_blocks_change(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    with open(f, "wb") as fh:
        fh.truncate(GIB)
        fh.seek(5 * BS)
        fh.write(b"x" * (BS // 2))  # inside block 5
        fh.seek(GIB - 10)
        fh.write(b"tail")  # inside the last block
    before = hash_file(f, BS)
    assert len(before) == (GIB // BS) * DIGEST_SIZE

    with open(f, "r+b") as fh:
        fh.seek(1000 * BS + 17)
        fh.write(b"y" * (2 * BS))  # blocks 1000, 1001 and 1002
        fh.seek(5 * BS + 1)
        fh.write(b"z")  # block 5 again
    t0 = time.monotonic()
    after = hash_file(f, BS)
    elapsed = time.monotonic() - t0

    assert elapsed < 0.5, f"hashing a sparse 1 GiB file took {elapsed:.2f} s"
    assert changed_blocks(before, after) == [5, 1000, 1001, 1002]
    fresh = changed_blocks(None, after)
    assert fresh == [5, 1000, 1001, 1002, GIB // BS - 1], "a fresh file ships its data blocks, not its holes"


def test_a_hole_and_written_zeros_hash_the_same(tmp_path: Path) -> None:
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with open(sparse, "wb") as fh:
        fh.truncate(3 * BS + 100)
        fh.seek(BS)
        fh.write(b"data")
    dense.write_bytes(sparse.read_bytes())
    assert hash_file(sparse, BS) == hash_file(dense, BS)
    digests = _digests(hash_file(sparse, BS))
    assert digests[0] == digests[2] == zero_digest(BS)
    assert digests[3] == xxhash.xxh3_128_digest(bytes(100)), "the last block is hashed at its real length"


def test_fd_and_path_agree_and_the_offset_is_left_alone(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(os.urandom(3 * BS + 5))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        assert hash_file(fd, BS) == hash_file(f, BS)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7
    finally:
        os.close(fd)
    assert hash_file(tmp_path / "f", BS) == b"".join(
        xxhash.xxh3_128_digest(f.read_bytes()[i : i + BS]) for i in range(0, 3 * BS + 5, BS))


def test_an_empty_file_has_no_blocks(tmp_path: Path) -> None:
    (tmp_path / "e").touch()
    assert hash_file(tmp_path / "e", BS) == b""
    assert changed_blocks(None, b"") == []


def test_blocks_past_the_old_end_count_as_changed_and_a_shrink_changes_nothing_kept() -> None:
    a, b, c = (bytes([n]) * DIGEST_SIZE for n in (1, 2, 3))
    assert changed_blocks(a + b, a + b + c) == [2]
    assert changed_blocks(a + b + c, a + c) == [1]
    assert changed_blocks(a + b + c, a) == []


def test_read_ranges_merges_contiguous_blocks_into_bounded_chunks(tmp_path: Path) -> None:
    content = os.urandom(10 * BS + 123)
    f = tmp_path / "f"
    f.write_bytes(content)
    size = len(content)
    fd = os.open(f, os.O_RDONLY)
    try:
        chunks = list(read_ranges(fd, [1, 2, 3, 7, 8, 10], BS, size, 2 * BS))
    finally:
        os.close(fd)
    assert [(off, len(data)) for off, data in chunks] == [
        (1 * BS, 2 * BS), (3 * BS, BS),  # blocks 1-3, split at max_chunk
        (7 * BS, 2 * BS),                 # blocks 7-8 merged
        (10 * BS, 123),                   # the short last block, nothing past the size
    ]
    for off, data in chunks:
        assert data == content[off : off + len(data)]


def test_read_ranges_stops_where_the_file_shrank(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"a" * (BS + 10))
    fd = os.open(f, os.O_RDONLY)
    try:
        chunks = list(read_ranges(fd, [0, 1, 2], BS, 3 * BS, 8 * BS))
    finally:
        os.close(fd)
    assert chunks == [(0, b"a" * (BS + 10))]
