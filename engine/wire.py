"""A TLS connection carrying channel frames, driven by one reader and one writer thread.

asyncio's TLS transport encrypts and decrypts in the event loop's thread and copies every
byte through its stream buffers: at replication rates that alone held a link near 130 MB/s
and left the loop no time for heartbeats. Here the writer thread encrypts and sends, the
reader thread receives, decrypts and cuts frames, and OpenSSL runs with the GIL released, so
the loop only ever sees whole frames and encryption runs beside it.

Both threads share one `ssl.SSLObject` over memory BIOs. OpenSSL objects are not safe for
concurrent use, so every call into it holds `_ssl_lock`, which is held for memory-only work
and never across a socket call; `_wire_lock` keeps TLS records on the wire in the order they
were produced (the reader may have to send too: TLS 1.3 post-handshake messages).

Both directions are bounded: `send` waits while more than SEND_BUFFER bytes are queued, and
the reader stops reading while more than RECV_BUFFER bytes of frames wait for the loop.
"""
from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import struct
import threading
from collections.abc import Sequence

from engine.errors import ProtocolError
from engine.protocol import Codec, Message

__all__ = ["FrameStream", "handshake", "SEND_BUFFER", "RECV_BUFFER"]

SEND_BUFFER = 16 << 20
RECV_BUFFER = 32 << 20
_RECV_BYTES = 1 << 20
_COALESCE = 256 << 10  # small frame parts are joined up to this size: one TLS write, fewer records
_CLOSE_GRACE = 2.0

Buffer = bytes | bytearray | memoryview


def handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
              timeout: float) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Run the TLS handshake on a connected socket (blocking; call it from a worker thread).

    Raises ssl.SSLError for a refused handshake, TimeoutError when the peer stalls, and
    ConnectionError when it hangs up.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side)
    sock.settimeout(timeout)
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(_RECV_BYTES)
                if not data:
                    raise ConnectionResetError("peer closed the connection during the TLS handshake")
                incoming.write(data)
            except ssl.SSLError:
                if outgoing.pending:  # tell the peer why (an alert) before giving up
                    try:
                        sock.sendall(outgoing.read())
                    except OSError:
                        pass
                raise
        if outgoing.pending:
            sock.sendall(outgoing.read())
    except socket.timeout:
        raise TimeoutError("TLS handshake timed out") from None
    sock.settimeout(None)
    return obj, incoming, outgoing


class FrameStream:
    """Frames in and out of one TLS connection; `send` and `recv` are called from the loop."""

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, codec: Codec, name: str) -> None:
        self.ssl_object = obj
        self.codec = codec
        self._sock = sock
        self._in, self._out = incoming, outgoing
        self._ssl_lock = threading.Lock()
        self._wire_lock = threading.Lock()
        self._cond = threading.Condition()
        self._sendq: collections.deque[list[Buffer]] = collections.deque()
        self._queued = 0   # bytes in _sendq
        self._unread = 0   # bytes of frames handed to the loop and not yet taken by recv
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._frames: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self._room = asyncio.Event()
        self._failed: BaseException | None = None
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
                    while not self._sendq and not self._closing:
                        self._cond.wait()
                    if not self._sendq:
                        break
                    parts = self._sendq.popleft()
                size = sum(len(p) for p in parts)
                with self._wire_lock:
                    for chunk in _coalesce(parts):
                        with self._ssl_lock:
                            self._obj_write(chunk)
                            data = self._out.read()
                        self._sock.sendall(data)
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

    def _obj_write(self, chunk: Buffer) -> None:
        view = memoryview(chunk)
        while view:
            n = self.ssl_object.write(view)
            view = view[n:]

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
                body = self._read_exact(frame_len)
                if body is None:
                    end = ConnectionAbortedError("peer closed the channel in the middle of a frame")
                    break
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

    def _read_exact(self, n: int) -> bytearray | None:
        """n bytes of plaintext, or None at a clean end of the stream before the first byte."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                with self._ssl_lock:
                    k = self.ssl_object.read(n - got, view[got:])
            except ssl.SSLWantReadError:
                k = -1
            except ssl.SSLZeroReturnError:
                k = 0
            if k == 0:
                if got:
                    raise ConnectionAbortedError("peer closed the channel in the middle of a frame")
                return None
            if k > 0:
                got += k
                continue
            data = self._sock.recv(_RECV_BYTES)
            if not data:
                if got:
                    raise ConnectionAbortedError("peer closed the channel in the middle of a frame")
                return None
            with self._ssl_lock:
                self._in.write(data)
                pending = self._out.pending
            if pending:
                self._flush_handshake_output()
        return buf

    def _flush_handshake_output(self) -> None:
        with self._wire_lock:
            with self._ssl_lock:
                data = self._out.read()
            if data:
                self._sock.sendall(data)

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
            self._sock.shutdown(socket.SHUT_RDWR)
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

