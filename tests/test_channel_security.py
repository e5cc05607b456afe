"""The channel refuses peers without a cluster certificate and records with forged paths."""
from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path

from conftest import Demo, wait_for
from engine.config import load_cluster, load_node
from engine.init import NodePlan, init_cluster
from engine.protocol import Codec
from engine.replication import pack_batch
from engine.tls import client_context


def _channel_of(demo: Demo, node: str) -> tuple[str, int]:
    spec = load_cluster(demo.config).node(node)
    return spec.channel_host, spec.channel_port


def test_client_without_certificate_is_refused_and_logged(demo: Demo) -> None:
    demo.up(nodes=2)
    host, port = _channel_of(demo, "primary")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    refused = False
    with socket.create_connection((host, port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"\x00\x00\x00\x10hello-not-a-peer")
                refused = tls.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            refused = True
    assert refused
    wait_for(lambda: any(e["kind"] == "peer_refused" for e in demo.events("primary")), 10,
             "a peer_refused event on the primary")


def test_client_with_another_clusters_certificate_is_refused(demo: Demo, tmp_path: Path) -> None:
    demo.up(nodes=2)
    other = init_cluster(tmp_path / "other", "other", "x.test", ["127.0.0.9"], [
        NodePlan("primary", "127.0.0.9:7781", "127.0.0.9", tmp_path / "o1", tmp_path / "o1s"),
        NodePlan("secondary", "127.0.0.9:7782", "127.0.0.9", tmp_path / "o2", tmp_path / "o2s"),
    ])
    foreign = load_node(tmp_path / "other" / "primary" / "node.toml", load_cluster(other))
    host, port = _channel_of(demo, "secondary")

    async def attempt() -> bool:
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=client_context(foreign))
        except (ssl.SSLError, ConnectionError):
            return True
        try:
            return await asyncio.wait_for(reader.read(1), 10) == b""
        except (ssl.SSLError, ConnectionError):
            return True
        finally:
            writer.close()

    assert asyncio.run(attempt())
    wait_for(lambda: any(e["kind"] == "peer_refused" for e in demo.events("secondary")), 10,
             "a peer_refused event on the secondary")


def test_forged_paths_are_refused_and_nothing_is_written_outside(demo: Demo) -> None:
    demo.up(nodes=2)
    outside = demo.workdir / "outside"
    outside.mkdir()
    import os

    os.symlink(str(outside), demo.data("primary") / "escape")
    demo.wait_equal(30, nodes=("secondary",))
    demo.kill("primary")  # we speak as the primary, with its own certificate
    cluster = load_cluster(demo.config)
    primary = load_node(demo.workdir / "primary" / "node.toml", cluster)
    host, port = _channel_of(demo, "secondary")
    forged = ["../../outside/owned", "/etc/nf-owned", "srv/data/../../outside/owned",
              "srv/data/escape/owned", "srv/other/owned"]

    async def speak() -> None:
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context(primary))
        codec = Codec(max_frame=cluster.replication.max_frame_bytes)
        epoch = 10**6
        writer.write(codec.encode("hello", epoch, {"node": "primary", "role": "active", "cluster": cluster.name,
                                                   "journal_id": "forger"}))
        await codec.read(reader)  # the secondary's hello
        records = [(None, "file", {"path": p, "gid": None, "size": 5, "mode": 0o644, "mtime_ns": 0,
                                   "fresh": True}, b"", time.time()) for p in forged]
        records.append((None, "mkdir", {"path": "srv/data/legit", "mode": 0o755, "mtime_ns": 0}, b"", time.time()))
        fields, parts = pack_batch(records)
        writer.write(codec.encode("recs", epoch, fields, b"".join(parts)))
        await writer.drain()
        deadline = time.monotonic() + 20
        while not (demo.data("secondary") / "legit").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        writer.close()

    asyncio.run(speak())
    assert (demo.data("secondary") / "legit").is_dir(), "the valid record after the forged ones is applied"
    assert list(outside.iterdir()) == []
    assert not Path("/etc/nf-owned").exists()
    refused = [e for e in demo.events("secondary") if e["kind"] == "record_refused"]
    assert len(refused) == len(forged), refused


def test_a_sequence_gap_is_refused_and_logged(demo: Demo) -> None:
    demo.up(nodes=2)
    demo.kill("primary")
    cluster = load_cluster(demo.config)
    primary = load_node(demo.workdir / "primary" / "node.toml", cluster)
    host, port = _channel_of(demo, "secondary")

    async def speak() -> bytes:
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context(primary))
        codec = Codec(max_frame=cluster.replication.max_frame_bytes)
        epoch = 10**6  # above anything the secondary holds, so only the gap can be refused
        writer.write(codec.encode("hello", epoch, {"node": "primary", "role": "active", "cluster": cluster.name}))
        await codec.read(reader)
        held = demo.node_status("secondary")["applied_seq"]
        mkdir = {"path": "srv/data/gap", "mode": 0o755, "mtime_ns": 0}
        fields, parts = pack_batch([(held + 5, "mkdir", mkdir, b"", time.time())])
        writer.write(codec.encode("recs", epoch, fields, b"".join(parts)))
        await writer.drain()
        try:
            while True:  # heartbeats until the secondary closes the link
                await asyncio.wait_for(codec.read(reader), 10)
        except (asyncio.IncompleteReadError, ConnectionError):
            return b"closed"
        finally:
            writer.close()

    assert asyncio.run(speak()) == b"closed"
    assert not (demo.data("secondary") / "gap").exists()
    wait_for(lambda: any("sequence gap" in e["message"] for e in demo.events("secondary")), 10,
             "the gap to be logged")
