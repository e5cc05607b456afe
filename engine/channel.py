"""The channel: mutual-TLS TCP links between the nodes of one cluster.

Every node listens on its channel address and dials the peers whose id sorts after its own,
so each pair shares exactly one link. The TLS handshake runs in a worker thread on the
raw socket, so a refused handshake (no certificate, another cluster's CA) is an event we log
with the peer's address; after it, `engine.wire` moves the frames in threads of their own. After the handshake both sides send
`hello`; the certificate's node id must match the hello and be a node of this cluster.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.config import format_channel
from engine.errors import ChannelAuthError, NfError, ProtocolError
from engine.protocol import Buffer, Codec, Message
from engine.tls import peer_node_id
from engine.wire import FrameStream, handshake

log = logging.getLogger("nf.channel")

HANDSHAKE_TIMEOUT = 10.0
#: A peer that is not listening (yet) is dialled again this often: a refused connect costs
#: nothing, and a passive that starts is reached in 25 ms on average.
DIAL_RETRY = 0.05
#: A peer that answers but fails the handshake or hello (wrong CA, not a peer) backs off to
#: this: retrying cannot fix it, and every attempt is a warning in the peer's log.
DIAL_BACKOFF_MAX = 5.0


class Link:
    """One authenticated connection to a peer node."""

    def __init__(self, node: str, stream: FrameStream, epoch: Callable[[], int]) -> None:
        self.node = node
        self.hello: dict[str, Any] = {}       # what the peer said
        self.sent_hello: dict[str, Any] = {}  # what we said: our role when the link was made
        self.stream = stream
        self.epoch = epoch

    @property
    def closed(self) -> bool:
        return self.stream.closed

    async def send(self, type_: str, fields: dict[str, Any] | None = None,
                   payload: Buffer | Sequence[Buffer] = b"") -> None:
        """Queue one message; `payload` may be a list of buffers sent back to back."""
        parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
        await self.stream.send(self.stream.codec.frame(type_, self.epoch(), fields, parts))

    def send_now(self, type_: str, fields: dict[str, Any] | None = None) -> None:
        """Queue a small control message (a heartbeat) ahead of bulk data (`FrameStream.send_now`)."""
        self.stream.send_now(self.stream.codec.frame(type_, self.epoch(), fields, []))

    async def recv(self) -> Message:
        return await self.stream.recv()

    def close(self) -> None:
        self.stream.close()


OnLink = Callable[[Link], Awaitable[None]]
OnRefused = Callable[[str, str], None]


class Channel:
    """Accepts and dials links; hands each authenticated link to `on_link` until it ends."""

    def __init__(
        self,
        *,
        node_id: str,
        peers: dict[str, tuple[str, int]],
        listen: tuple[str, int],
        server_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext,
        codec_factory: Callable[[], Codec],
        hello: Callable[[], dict[str, Any]],
        epoch: Callable[[], int],
        on_link: OnLink,
        on_refused: OnRefused,
    ) -> None:
        self.node_id = node_id
        self.peers = peers
        self.listen = listen
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        self.codec_factory = codec_factory
        self.hello = hello
        self.epoch = epoch
        self.on_link = on_link
        self.on_refused = on_refused
        self.links: dict[str, Link] = {}
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="channel-handshake")

    async def start(self) -> None:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise NfError(f"channel address {format_channel(host, port)}: {exc.strerror or exc}",
                          hint="another program listens there (ss -ltnp), or the address is not on this host "
                               "(ip addr); fix it, or the node's channel in cluster.toml") from None
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._spawn(self._accept_forever())
        for peer in sorted(self.peers):
            if peer > self.node_id:
                self._spawn(self._dial_forever(peer))

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for link in list(self.links.values()):
            link.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- accept side ------------------------------------------------------------------
    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            self._spawn(self._accept(conn))

    async def _accept(self, conn: socket.socket) -> None:
        """TLS is set up on the raw socket, so no byte of the ClientHello can be read as plain data."""
        try:
            addr = "%s:%s" % conn.getpeername()[:2]
        except OSError:
            addr = "unknown peer"
        link: Link | None = None
        try:
            link = await self._secure(conn, server_side=True)
            await self._handshake(link)
        except (ssl.SSLError, ChannelAuthError, ProtocolError, TimeoutError, ConnectionError,
                OSError) as exc:
            self.on_refused(addr, _reason(exc))
            if link is not None:
                link.close()
            else:
                conn.close()
            return
        await self._run(link)

    # -- dial side --------------------------------------------------------------------
    async def _dial_forever(self, peer: str) -> None:
        backoff = DIAL_RETRY
        host, port = self.peers[peer]
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock = await loop.run_in_executor(self._pool, _connect, host, port)
            except OSError as exc:  # not listening, or unreachable (the connect timed out)
                log.debug("dial %s failed: %r", peer, exc)
                await asyncio.sleep(DIAL_RETRY)
                continue
            link: Link | None = None
            try:
                link = await self._secure(sock, server_side=False)
                await self._handshake(link, expect=peer)
            except (OSError, ssl.SSLError, TimeoutError, ProtocolError, ChannelAuthError) as exc:
                log.debug("handshake with %s failed: %r", peer, exc)
                if link is not None:
                    link.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, DIAL_BACKOFF_MAX)
                continue
            backoff = DIAL_RETRY
            await self._run(link)

    # -- common -----------------------------------------------------------------------
    async def _secure(self, sock: socket.socket, *, server_side: bool) -> Link:
        """TLS on a connected socket (in a worker thread: the handshake blocks), as a Link."""
        loop = asyncio.get_running_loop()
        ctx = self.server_ctx if server_side else self.client_ctx
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = await loop.run_in_executor(
            self._pool, lambda: handshake(sock, ctx, server_side=server_side, timeout=HANDSHAKE_TIMEOUT))
        try:
            node = peer_node_id(tls)  # read now: once the reader thread runs, an alert may end the session
        except BaseException:
            tls.close()
            raise
        return Link(node, FrameStream(tls, self.codec_factory(), f"link-{node}"), self.epoch)

    async def _handshake(self, link: Link, expect: str | None = None) -> None:
        node = link.node
        if node not in self.peers:
            raise ChannelAuthError(f"certificate names {node!r}, which is not a peer of this node")
        if expect is not None and node != expect:
            raise ChannelAuthError(f"dialled {expect} but the certificate names {node}")
        link.sent_hello = self.hello()
        await link.send("hello", link.sent_hello)
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            msg = await link.recv()
        if msg.type != "hello":
            raise ProtocolError(f"expected hello, got {msg.type}")
        if msg.get("node", str) != node:
            raise ChannelAuthError(f"hello names {msg.fields.get('node')!r} but the certificate names {node}")
        link.hello = dict(msg.fields, epoch=msg.epoch)

    async def _run(self, link: Link) -> None:
        old = self.links.get(link.node)
        if old is not None:
            old.close()
        self.links[link.node] = link
        try:
            await self.on_link(link)
        finally:
            link.close()
            if self.links.get(link.node) is link:
                del self.links[link.node]

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _connect(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__
