"""nf init, the cluster CA and the channel's mutual TLS."""
from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from engine.config import load_cluster, load_node
from engine.errors import ChannelAuthError, ConfigError, NfError
from engine.init import NodePlan, init_cluster
from engine.pki import make_ca, make_node_cert, write_secret
from engine.tls import client_context, peer_node_id, server_context


def plans(base: Path) -> list[NodePlan]:
    return [NodePlan(id=node_id, channel=f"127.0.10.{2 + i}:7780", management=f"127.0.10.{2 + i}",
                     root=base / node_id, state_dir=base / node_id / "state")
            for i, node_id in enumerate(["primary", "secondary"])]


def make_cluster(tmp_path: Path, name: str = "demo") -> Path:
    out = tmp_path / name
    return init_cluster(out, name, "app01.example.test", ["127.0.10.1"], plans(out), netbios="APP01")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_cluster_its_loader_accepts_with_secrets_private(tmp_path: Path) -> None:
    path = make_cluster(tmp_path)
    out = path.parent
    assert path == out / "cluster.toml"
    cluster = load_cluster(path)
    assert [n.id for n in cluster.nodes] == ["primary", "secondary"]
    assert mode(out / "ca.key") == 0o600
    assert mode(out / "ca.pem") == 0o644
    for node_id in ("primary", "secondary"):
        node = load_node(out / node_id / "node.toml", cluster)
        assert node.root == out / node_id and node.state_dir == out / node_id / "state"
        assert node.key == out / node_id / "tls" / "node.key"
        assert mode(node.key) == 0o600 and mode(node.cert) == 0o644 and mode(node.ca) == 0o644
        assert mode(node.key.parent) == 0o700
        assert 'key = "tls/node.key"' in (out / node_id / "node.toml").read_text()
    assert not list(out.glob(".nf-init-*"))


def test_node_certificates_name_the_node_and_its_addresses(tmp_path: Path) -> None:
    out = make_cluster(tmp_path).parent
    cert = x509.load_pem_x509_certificate((out / "secondary" / "tls" / "node.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "secondary"
    assert cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value == "nf cluster demo"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["secondary"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.10.3"]


def test_init_refuses_an_existing_cluster(tmp_path: Path) -> None:
    make_cluster(tmp_path)
    with pytest.raises(NfError) as caught:
        make_cluster(tmp_path)
    assert "already exists" in caught.value.message and caught.value.hint


def test_init_with_a_bad_argument_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    nodes = plans(out)
    nodes[1] = NodePlan("secondary", "127.0.10.3:7780", "not-an-ip", out / "s", out / "s" / "state")
    with pytest.raises(ConfigError) as caught:
        init_cluster(out, "bad", "app01.example.test", ["127.0.10.1"], nodes)
    assert caught.value.file == str(out / "cluster.toml") and caught.value.field == "nodes[1].management"
    assert list(out.iterdir()) == []


def test_write_secret_replaces_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "new" / "secret.key"
    write_secret(path, b"one")
    write_secret(path, b"two")
    assert path.read_bytes() == b"two" and mode(path) == 0o600 and mode(path.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]


# -- mutual TLS ---------------------------------------------------------------------------

def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[object, object]:
    """Handshake over a socketpair; per side, the peer's node id or the exception it raised."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                seen["server"] = peer_node_id(tls)
                tls.sendall(b"ok")
        except Exception as exc:  # reported to the test below
            seen["server"] = exc
        finally:
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=None) as tls:
            seen["client"] = peer_node_id(tls)
            tls.recv(2)  # in TLS 1.3 the server judges the client's certificate after the client finishes
    except (ssl.SSLError, ConnectionError) as exc:
        seen["client"] = exc
    finally:
        b.close()
        thread.join(5)
    return seen["server"], seen["client"]


def test_two_nodes_authenticate_each_other(tmp_path: Path) -> None:
    path = make_cluster(tmp_path)
    cluster = load_cluster(path)
    primary = load_node(path.parent / "primary" / "node.toml", cluster)
    secondary = load_node(path.parent / "secondary" / "node.toml", cluster)
    assert handshake(server_context(primary), client_context(secondary)) == ("secondary", "primary")


def test_a_node_of_another_cluster_is_refused_by_the_server(tmp_path: Path) -> None:
    ours = make_cluster(tmp_path, "ours")
    theirs = make_cluster(tmp_path, "theirs")
    primary = load_node(ours.parent / "primary" / "node.toml")
    stranger = load_node(theirs.parent / "secondary" / "node.toml")
    client = client_context(stranger)
    client.load_verify_locations(cafile=str(primary.ca))  # the stranger trusts us, so only we can refuse
    server_saw, client_saw = handshake(server_context(primary), client)
    assert isinstance(server_saw, ssl.SSLCertVerificationError)
    assert isinstance(client_saw, (ssl.SSLError, ConnectionError))


def test_a_server_of_another_cluster_is_refused_by_the_client(tmp_path: Path) -> None:
    ours = make_cluster(tmp_path, "ours")
    theirs = make_cluster(tmp_path, "theirs")
    primary = load_node(ours.parent / "primary" / "node.toml")
    stranger = load_node(theirs.parent / "secondary" / "node.toml")
    server_saw, client_saw = handshake(server_context(stranger), client_context(primary))
    assert isinstance(client_saw, ssl.SSLCertVerificationError)
    assert isinstance(server_saw, (ssl.SSLError, ConnectionError))


def test_a_connection_without_a_peer_certificate_names_no_node() -> None:
    with pytest.raises(ChannelAuthError):
        peer_node_id(None)


def test_make_node_cert_puts_host_names_in_dns_names() -> None:
    ca_cert, ca_key = make_ca("demo")
    cert_pem, _ = make_node_cert(ca_cert, ca_key, "primary", "demo", ["node-a.example.test", "::1"])
    san = x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["primary", "node-a.example.test"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["::1"]
