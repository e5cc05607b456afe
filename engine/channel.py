"""The channel: mutual-TLS TCP links between the nodes of one cluster.

Every node listens on its channel address and dials the peers whose id sorts after its own,
so each pair shares exactly one link. The TLS upgrade is done by hand after accept, so a
refused handshake (no certificate, another cluster's CA) is an event we log with the peer's
address rather than noise in asyncio's exception handler. After the handshake both sides send
`hello`; the certificate's node id must match the hello and be a node of this cluster.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import ChannelAuthError, ProtocolError
from engine.protocol import Codec, Message
from engine.tls import peer_node_id

log = logging.getLogger("nf.channel")

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class Link:
    """One authenticated connection to a peer node."""

    node: str
    hello: dict[str, Any]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    codec: Codec
    epoch: Callable[[], int]

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, type_: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> None:
        frame = self.codec.encode(type_, self.epoch(), fields, payload)
        async with self._lock:
            if self.closed or self.writer.is_closing():
                raise ConnectionResetError(f"channel to {self.node} is closed")
            self.writer.write(frame)
            await self.writer.drain()

    async def recv(self) -> Message:
        return await self.codec.read(self.reader)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


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

    async def start(self) -> None:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
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

    # -- accept side ------------------------------------------------------------------
    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            self._spawn(self._accept(conn))

    async def _accept(self, conn: socket.socket) -> None:
        """TLS is set up on the raw socket, so no byte of the ClientHello can be read as plain data."""
        loop = asyncio.get_running_loop()
        try:
            addr = "%s:%s" % conn.getpeername()[:2]
        except OSError:
            addr = "unknown peer"
        writer: asyncio.StreamWriter | None = None
        try:
            reader = asyncio.StreamReader(limit=2**16)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.server_ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            link = await self._handshake(reader, writer)
        except (ssl.SSLError, ChannelAuthError, ProtocolError, asyncio.TimeoutError, ConnectionError, OSError,
                asyncio.IncompleteReadError) as exc:
            self.on_refused(addr, _reason(exc))
            if writer is not None:
                writer.close()
            else:
                conn.close()
            return
        await self._run(link)

    # -- dial side --------------------------------------------------------------------
    async def _dial_forever(self, peer: str) -> None:
        delay = 0.1
        host, port = self.peers[peer]
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=self.client_ctx, server_hostname=None),
                    HANDSHAKE_TIMEOUT,
                )
                link = await self._handshake(reader, writer, expect=peer)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    ProtocolError, ChannelAuthError) as exc:
                log.debug("dial %s failed: %r", peer, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            await self._run(link)

    # -- common -----------------------------------------------------------------------
    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, expect: str | None = None
    ) -> Link:
        ssl_object = writer.get_extra_info("ssl_object")
        node = peer_node_id(ssl_object)
        if node not in self.peers:
            raise ChannelAuthError(f"certificate names {node!r}, which is not a peer of this node")
        if expect is not None and node != expect:
            raise ChannelAuthError(f"dialled {expect} but the certificate names {node}")
        codec = self.codec_factory()
        link = Link(node, {}, reader, writer, codec, self.epoch)
        await link.send("hello", self.hello())
        msg = await asyncio.wait_for(link.recv(), HANDSHAKE_TIMEOUT)
        if msg.type != "hello":
            raise ProtocolError(f"expected hello, got {msg.type}")
        if msg.get("node", str) != node:
            raise ChannelAuthError(f"hello names {msg.fields.get('node')!r} but the certificate names {node}")
        link.hello = dict(msg.fields, epoch=msg.epoch)
        return link

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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, asyncio.TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__
