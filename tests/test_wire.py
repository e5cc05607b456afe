"""The TLS frame stream itself: both directions at full speed at once, and how a link ends.

OpenSSL drives the socket, and the reader and writer threads share one SSL object under a
lock, each waiting for the socket outside it. Heavy traffic both ways at once is what makes
them meet (a write that must wait while a read is due, and the other way round), so that is
what the first test does, checking every byte in order.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from engine.buffers import is_aligned
from engine.config import load_cluster, load_node
from engine.protocol import Codec
from engine.tls import client_context, server_context
from engine.wire import RECV_BUFFER, SEND_BUFFER, FrameStream, handshake
from nftui.demo import create

FRAMES = 48
MAX_FRAME = 4 << 20


def codec() -> Codec:
    return Codec(max_frame=MAX_FRAME, compression="none")


async def tls_pair(workdir: Path) -> tuple[FrameStream, FrameStream]:
    """Two ends of one mutual-TLS link over loopback TCP, as two nodes of a demo cluster."""
    create(workdir, 2)
    cluster = load_cluster(workdir / "cluster.toml")
    primary, secondary = (load_node(workdir / n / "node.toml", cluster) for n in ("primary", "secondary"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        dialled = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    loop = asyncio.get_running_loop()
    server, client = await asyncio.gather(
        loop.run_in_executor(None, lambda: handshake(accepted, server_context(primary), server_side=True, timeout=10)),
        loop.run_in_executor(None, lambda: handshake(dialled, client_context(secondary), server_side=False, timeout=10)),
    )
    return FrameStream(server, codec(), "test-a"), FrameStream(client, codec(), "test-b")


def with_pair(workdir: Path, scenario: Callable[[FrameStream, FrameStream], Awaitable[None]]) -> None:
    """Run `scenario` on a fresh link in its own event loop (the streams need a running loop)."""
    async def main() -> None:
        a, b = await tls_pair(workdir)
        try:
            await scenario(a, b)
        finally:
            a.close()
            b.close()
    asyncio.run(main())


def frames(seed: int) -> list[bytes]:
    """Payloads from empty to just under the frame limit, most of them larger than a TLS record."""
    rnd = random.Random(seed)
    sizes = [0, 1, 16383, 16384, 16385, MAX_FRAME - 4096] + [rnd.randrange(1, 3 << 20) for _ in range(FRAMES - 6)]
    return [rnd.randbytes(n) for n in sizes]


async def send_all(stream: FrameStream, payloads: list[bytes]) -> None:
    for i, data in enumerate(payloads):
        await stream.send(stream.codec.frame("recs", 7, {"i": i}, [data[: len(data) // 3], data[len(data) // 3 :]]))


async def receive_all(stream: FrameStream, payloads: list[bytes]) -> None:
    for i, data in enumerate(payloads):
        msg = await asyncio.wait_for(stream.recv(), 60)
        assert (msg.type, msg.epoch, msg.fields) == ("recs", 7, {"i": i})
        assert hashlib.sha256(msg.payload).digest() == hashlib.sha256(data).digest(), f"frame {i} differs"


def test_both_directions_at_full_speed_arrive_whole_and_in_order(tmp_path: Path) -> None:
    to_b, to_a = frames(1), frames(2)
    assert sum(map(len, to_b)) > SEND_BUFFER + RECV_BUFFER  # more than both ends can hold at once

    async def scenario(a: FrameStream, b: FrameStream) -> None:
        await asyncio.wait_for(asyncio.gather(send_all(a, to_b), receive_all(b, to_b),
                                              send_all(b, to_a), receive_all(a, to_a)), 120)
    with_pair(tmp_path, scenario)


def test_a_closed_end_is_seen_by_the_peer_after_what_was_queued(tmp_path: Path) -> None:
    async def scenario(a: FrameStream, b: FrameStream) -> None:
        await a.send(a.codec.frame("hb", 1, {"last": True}, []))
        a.close()
        msg = await asyncio.wait_for(b.recv(), 10)
        assert msg.fields == {"last": True}
        with pytest.raises(ConnectionAbortedError, match="peer closed the channel"):
            await asyncio.wait_for(b.recv(), 10)
        with pytest.raises(ConnectionResetError):
            await a.send(a.codec.frame("hb", 1, {}, []))
    with_pair(tmp_path, scenario)


def test_payloads_still_held_keep_their_bytes_while_later_frames_reuse_freed_buffers(tmp_path: Path) -> None:
    """Large frame bodies come from reused buffers; one is reused only when no payload refers to it."""
    held_payloads = frames(3)[6:26]  # 20 frames of up to 3 MiB: more than the pool keeps

    async def scenario(a: FrameStream, b: FrameStream) -> None:
        sender = asyncio.ensure_future(send_all(a, held_payloads + held_payloads))
        kept = [await asyncio.wait_for(b.recv(), 60) for _ in held_payloads]
        for i, (msg, data) in enumerate(zip(kept, held_payloads)):
            assert bytes(msg.payload) == data, f"frame {i} was overwritten while still held"
        del kept, msg
        again = [await asyncio.wait_for(b.recv(), 60) for _ in held_payloads]
        await sender
        assert [bytes(m.payload) for m in again] == held_payloads
    with_pair(tmp_path, scenario)


def test_a_large_payload_arrives_page_aligned_and_a_small_one_as_it_comes(tmp_path: Path) -> None:
    """The sender pads a large frame's header so its payload lands on a page of the receiver's
    pooled buffer: file data can then be written with O_DIRECT without a copy."""
    large, small = random.Random(5).randbytes((2 << 20) + 123), b"tiny"

    async def scenario(a: FrameStream, b: FrameStream) -> None:
        await send_all(a, [large, small])
        first, second = [await asyncio.wait_for(b.recv(), 30) for _ in range(2)]
        assert bytes(first.payload) == large and first.fields == {"i": 0}
        assert is_aligned(first.payload, 4096), "a large payload is not page-aligned"
        assert bytes(second.payload) == small and second.fields == {"i": 1}
    with_pair(tmp_path, scenario)


def test_a_frame_the_peer_would_refuse_is_never_sent() -> None:
    """The receiver refuses a header over HEADER_MAX and a frame over the limit; the sender
    finds out first, as FrameTooLarge, so a sender of batches can split them."""
    from engine.errors import FrameTooLarge
    from engine.protocol import HEADER_MAX

    c = Codec(max_frame=1 << 20)
    fits = b"".join(c.frame("recs", 1, {"paths": ["p" * 1000] * 1000}, [b"x" * (1 << 20)]))
    assert c.decode_body(fits[4:]).fields["paths"][0] == "p" * 1000
    with pytest.raises(FrameTooLarge, match=f"recs header of .* bytes exceeds the limit of {HEADER_MAX}"):
        c.frame("recs", 1, {"paths": ["p" * 1000] * 1100}, [])
    with pytest.raises(FrameTooLarge, match="frame of .* bytes exceeds"):
        c.frame("recs", 1, {}, [random.randbytes((2 << 20) + 1)])  # incompressible


def test_a_heartbeat_overtakes_the_bulk_frames_not_yet_begun_and_never_waits_for_room(tmp_path: Path) -> None:
    """Queued behind 16 MiB of records for a passive whose disk was slow, and behind the wait
    for room, the active's heartbeats left up to a second late: the failover timeout."""
    bulk = [bytes(3 << 20)] * 12  # more than the send buffer holds

    async def scenario(a: FrameStream, b: FrameStream) -> None:
        queued = 0

        async def fill() -> None:
            nonlocal queued
            for i, data in enumerate(bulk):
                await a.send(a.codec.frame("recs", 7, {"i": i}, [data]))
                queued += 1

        filler = asyncio.ensure_future(fill())
        deadline = asyncio.get_running_loop().time() + 30
        while a._queued <= SEND_BUFFER:  # b reads nothing: the queue fills and the filler waits for room
            assert asyncio.get_running_loop().time() < deadline, "the send queue never filled"
            await asyncio.sleep(0.01)
        begun = queued - len(a._sendq)  # frames the writer has taken, the last one part-written
        a.send_now(a.codec.frame("hb", 7, {"now": True}, []))
        assert not filler.done()
        got = [await asyncio.wait_for(b.recv(), 60) for _ in range(len(bulk) + 1)]
        await filler
        assert [m.type for m in got].index("hb") == begun
        assert [m.fields["i"] for m in got if m.type == "recs"] == list(range(len(bulk)))
    with_pair(tmp_path, scenario)
