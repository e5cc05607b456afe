"""TLS contexts for the channel: mutual TLS 1.3 against the cluster's own CA.

Both ends present a node certificate and require one from the peer. Host names are not
checked: nodes are addressed by IP and may move, and what matters is *which node* answered,
which the channel reads from the verified certificate with `peer_node_id`.
"""
from __future__ import annotations

import ssl

from engine.config import NodeConfig
from engine.errors import ChannelAuthError, ConfigError


def server_context(node: NodeConfig) -> ssl.SSLContext:
    """Context for accepting channel connections; a client without a cluster certificate is refused."""
    return _context(node, ssl.PROTOCOL_TLS_SERVER)


def client_context(node: NodeConfig) -> ssl.SSLContext:
    """Context for dialling a peer; the peer must present a certificate of this cluster's CA."""
    ctx = _context(node, ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the channel checks the node id in the certificate instead
    return ctx


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The node id (certificate CN) of a verified peer."""
    if ssl_object is None:
        raise ChannelAuthError("the connection is not protected by TLS")
    cert = ssl_object.getpeercert()
    if not cert:
        raise ChannelAuthError("the peer presented no verified certificate",
                               hint="every node needs the certificate nf init wrote for it")
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    raise ChannelAuthError("the peer certificate names no node (no common name)")


def _context(node: NodeConfig, protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=str(node.ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(str(node.path), "tls.ca", "the cluster CA certificate (PEM)", str(exc)) from None
    try:
        ctx.load_cert_chain(certfile=str(node.cert), keyfile=str(node.key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(str(node.path), "tls.cert", "a PEM certificate matching tls.key", str(exc),
                          hint="re-run nf init, or copy the node's tls/ directory again") from None
    return ctx
