"""A TLS connection carrying channel frames, driven by one reader and one writer thread.

asyncio's TLS transport encrypts and decrypts in the event loop's thread and copies every
byte through its stream buffers: at replication rates that alone held a link near 130 MB/s
and left the loop no time for heartbeats. Here the writer thread encrypts and sends, the
reader thread receives, decrypts and cuts frames, and OpenSSL runs with the GIL released, so
the loop only ever sees whole frames and encryption runs beside it.

OpenSSL reads and writes the (non-blocking) socket itself: memory BIOs cost a zero-fill and
two extra copies of every byte on each side, a sixth of the CPU of a bulk transfer. An SSL
object is not safe for concurrent use, so every call into it holds `_ssl_lock`; a thread that
must wait for the socket (want read, want write) waits in poll() without the lock, so the
other direction keeps moving. A write that had to wait is retried with the same bytes, as
OpenSSL requires.

Both directions are bounded: `send` waits while more than SEND_BUFFER bytes are queued, and
the reader stops reading while more than RECV_BUFFER bytes of frames wait for the loop.

Heartbeats must not wait behind bulk data: queued behind 16 MiB of records for a passive
whose disk was slow, and behind the wait for room, the active's heartbeats left a second late
(the failover timeout is one). `send_now` queues a small frame ahead of the bulk frames not yet
begun, without waiting for room; and the time the last frame of any kind arrived
(`last_arrival`) tells a peer that is alive but whose heartbeat is still behind records on
this end.
"""
from __future__ import annotations

import asyncio
import collections
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence

from engine.buffers import BufferPool
from engine.errors import ProtocolError
from engine.protocol import Codec, Message

__all__ = ["FrameStream", "handshake", "SEND_BUFFER", "RECV_BUFFER"]

SEND_BUFFER = 16 << 20
RECV_BUFFER = 32 << 20
#: Frames of `send_now` waiting at most; older ones are dropped (a heartbeat that old says nothing).
URGENT_MAX = 64
_COALESCE = 256 << 10  # small frame parts are joined up to this size: one TLS write, fewer records
_SLICE = 256 << 10  # at most this much is encrypted per hold of the SSL lock: the reader waits less
_CLOSE_GRACE = 2.0
# Large frame bodies are received into reused, page-aligned buffers (`engine.buffers`): a batch
# of 4 MiB with its header fits one, and about RECV_BUFFER of them wait while a few are applied.
_POOLED_MIN = 1 << 20
_BODY_BYTES = 5 << 20
_BODIES = 12

Buffer = bytes | bytearray | memoryview


def handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, timeout: float) -> ssl.SSLSocket:
    """Run the TLS handshake on a connected socket (blocking; call it from a worker thread).

    Returns the TLS socket, non-blocking and ready for a FrameStream; `sock` is taken over
    (closed on failure). Raises ssl.SSLError for a refused handshake, TimeoutError when the
    peer stalls, and OSError when it hangs up.
    """
    sock.settimeout(timeout)
    try:
        tls = ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        tls.do_handshake()
    except socket.timeout:
        tls.close()
        raise TimeoutError("TLS handshake timed out") from None
    except BaseException:
        tls.close()
        raise
    tls.setblocking(False)
    return tls


class FrameStream:
    """Frames in and out of one TLS connection; `send` and `recv` are called from the loop."""

    def __init__(self, tls: ssl.SSLSocket, codec: Codec, name: str) -> None:
        self.codec = codec
        self._sock = tls
        self._ssl_lock = threading.Lock()
        self._cond = threading.Condition()
        self._sendq: collections.deque[list[Buffer]] = collections.deque()
        self._urgent: collections.deque[list[Buffer]] = collections.deque(maxlen=URGENT_MAX)
        self._queued = 0   # bytes in _sendq
        self.last_arrival = time.time()  # when the last frame (or the connection) came in
        self._unread = 0   # bytes of frames handed to the loop and not yet taken by recv
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._frames: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self._room = asyncio.Event()
        self._failed: BaseException | None = None
        self._bodies = BufferPool(_BODY_BYTES, _BODIES)
        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-tx", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-rx", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closing

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Queue one frame (its parts in order); waits while the send buffer is full."""
        while self._queued > SEND_BUFFER and not self._closing:
            self._room.clear()
            await self._room.wait()
        if self._closing:
            raise ConnectionResetError(str(self._failed) if self._failed else "channel is closed")
        size = sum(len(p) for p in parts)
        with self._cond:
            self._sendq.append(list(parts))
            self._queued += size
            self._cond.notify()

    def send_now(self, parts: Sequence[Buffer]) -> None:
        """Queue one small frame ahead of the bulk frames not yet begun, without waiting for room."""
        if self._closing:
            raise ConnectionResetError(str(self._failed) if self._failed else "channel is closed")
        with self._cond:
            self._urgent.append(list(parts))
            self._cond.notify()

    async def recv(self) -> Message:
        """The next frame; raises what ended the connection once it has ended."""
        item = await self._frames.get()
        if isinstance(item, BaseException):
            self._frames.put_nowait(item)  # every later call sees the end too
            raise item
        with self._cond:
            self._unread -= len(item.payload)
            self._cond.notify_all()
        return item

    def close(self) -> None:
        """Stop taking frames; what is queued is still sent for up to a moment, then the socket shuts."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._room.set()
        timer = threading.Timer(_CLOSE_GRACE, self._shutdown)
        timer.daemon = True
        timer.start()

    # -- threads ----------------------------------------------------------------------
    def _write_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._urgent and not self._sendq and not self._closing:
                        self._cond.wait()
                    urgent = bool(self._urgent)
                    if urgent:
                        parts = self._urgent.popleft()
                    elif self._sendq:
                        parts = self._sendq.popleft()
                    else:
                        break
                for chunk in _coalesce(parts):
                    self._write_all(chunk)
                if urgent:
                    continue  # not counted in _queued
                size = sum(len(p) for p in parts)
                with self._cond:
                    self._queued -= size
                    low = self._queued <= SEND_BUFFER
                if low:
                    self._loop.call_soon_threadsafe(self._room.set)
        except (OSError, ssl.SSLError) as exc:
            self._fail(ConnectionResetError(f"send failed: {exc}"))
        except RuntimeError:  # the loop is gone: the agent is stopping
            pass
        self._shutdown()

    def _write_all(self, chunk: Buffer) -> None:
        view = memoryview(chunk).cast("B")
        while view:
            want = 0
            with self._ssl_lock:
                try:
                    n = self._sock.send(view[:_SLICE])
                except ssl.SSLWantWriteError:
                    n, want = 0, select.POLLOUT
                except ssl.SSLWantReadError:
                    n, want = 0, select.POLLIN
            if want:
                self._wait(want)
            view = view[n:]

    def _wait(self, events: int) -> None:
        """Until the socket is ready for `events`, or hung up (then the next call fails or ends)."""
        fd = self._sock.fileno()
        if fd < 0:
            raise ConnectionResetError("channel socket is closed")
        poller = select.poll()
        poller.register(fd, events)
        poller.poll(1000)  # a bound, so a thread never outlives its socket by long

    def _read_loop(self) -> None:
        end: BaseException
        try:
            while True:
                head = self._read_exact(4)
                if head is None:
                    end = ConnectionAbortedError("peer closed the channel")
                    break
                (frame_len,) = struct.unpack(">I", head)
                self.codec.check_frame_length(frame_len)
                pooled = self._bodies.take(frame_len) if frame_len >= _POOLED_MIN else None
                body = self._read_exact(frame_len, pooled)
                if body is None:
                    end = ConnectionAbortedError("peer closed the channel in the middle of a frame")
                    break
                self.last_arrival = time.time()
                msg = self.codec.decode_body(body)
                with self._cond:
                    while self._unread > RECV_BUFFER and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        end = ConnectionAbortedError("channel closed")
                        break
                    self._unread += len(msg.payload)
                self._loop.call_soon_threadsafe(self._frames.put_nowait, msg)
        except ProtocolError as exc:
            end = exc
        except (OSError, ssl.SSLError) as exc:
            end = ConnectionResetError(f"receive failed: {exc}")
        try:
            self._loop.call_soon_threadsafe(self._frames.put_nowait, end)
        except RuntimeError:
            pass
        self._fail(end)

    def _read_exact(self, n: int, buf: bytearray | memoryview | None = None) -> bytearray | memoryview | None:
        """n bytes of plaintext (into `buf` when given, of length n), or None at a clean end of
        the stream before the first byte."""
        if buf is None:
            buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            want = 0
            with self._ssl_lock:
                try:
                    k = self._sock.recv_into(view[got:], n - got)
                except ssl.SSLWantReadError:
                    k, want = -1, select.POLLIN
                except ssl.SSLWantWriteError:
                    k, want = -1, select.POLLOUT
                except ssl.SSLZeroReturnError:
                    k = 0
            if k > 0:
                got += k
            elif k == 0:
                if got:
                    raise ConnectionAbortedError("peer closed the channel in the middle of a frame")
                return None
            else:
                self._wait(want)
        return buf

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._failed is None:
                self._failed = exc
            self._closing = True
            self._cond.notify_all()
        try:
            self._loop.call_soon_threadsafe(self._room.set)
        except RuntimeError:
            pass
        self._shutdown()

    def _shutdown(self) -> None:
        """Unblock both threads; the reader closes the socket once the writer is done."""
        try:
            # The plain socket's shutdown: SSLSocket.shutdown would also drop the SSL object,
            # and a thread still in recv_into would then read raw bytes as plaintext.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is self._reader:
            self._writer.join(timeout=_CLOSE_GRACE)
            self._sock.close()


def _coalesce(parts: Sequence[Buffer]) -> list[Buffer]:
    """Large parts as they are, runs of small ones joined, in order."""
    out: list[Buffer] = []
    small: list[Buffer] = []
    small_bytes = 0
    for part in parts:
        if not part:
            continue
        if len(part) >= _COALESCE:
            if small:
                out.append(b"".join(small))
                small, small_bytes = [], 0
            out.append(part)
            continue
        small.append(part)
        small_bytes += len(part)
        if small_bytes >= _COALESCE:
            out.append(b"".join(small))
            small, small_bytes = [], 0
    if small:
        out.append(b"".join(small))
    return out

