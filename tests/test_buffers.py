"""Pooled buffers: handed out again only once let go, and aligned for direct I/O."""
from __future__ import annotations

from engine.buffers import BufferPool, is_aligned, trim_idle

MIB = 1 << 20


def test_a_buffer_is_handed_out_again_only_once_let_go() -> None:
    pool = BufferPool(4 * MIB, 4)
    first = pool.take(2 * MIB)
    assert first is not None
    first[:4] = b"mark"
    held = first[1000:1004]  # any slice keeps the whole buffer
    del first
    second = pool.take(2 * MIB)
    assert second is not None and bytes(second[:4]) != b"mark", "a buffer still referred to was handed out again"
    del held, second
    third = pool.take(2 * MIB)
    assert third is not None and bytes(third[:4]) == b"mark", "a buffer nothing refers to was not reused"


def test_a_full_pool_and_an_oversized_request_give_nothing() -> None:
    pool = BufferPool(MIB, 2)
    taken = [pool.take(MIB), pool.take(MIB)]
    assert all(t is not None for t in taken)
    assert pool.take(1) is None, "a third buffer was made beyond the limit"
    assert pool.take(MIB + 1) is None, "a request larger than a buffer was served"


def test_buffers_are_page_aligned_and_other_memory_need_not_be() -> None:
    view = BufferPool(MIB, 1).take(MIB)
    assert view is not None
    assert is_aligned(view, 4096)
    assert is_aligned(view[8192:], 4096)
    assert not is_aligned(view[1:], 4096)
    assert not is_aligned(memoryview(bytes(8192)), 4096), "read-only memory counts as unaligned: it cannot be told"


def test_idle_buffers_are_let_go_and_one_in_use_is_kept() -> None:
    pool = BufferPool(MIB, 4, idle=0.0)
    in_use = pool.take(MIB)
    idle = pool.take(MIB)
    assert in_use is not None and idle is not None and len(pool) == 2
    del idle
    trim_idle()
    assert len(pool) == 1, "an idle buffer was kept, or one in use was let go"
    in_use[:4] = b"kept"
    assert bytes(in_use[:4]) == b"kept"
