"""The cluster's own certificate authority and its node certificates.

Each cluster gets a private CA, so "signed by our CA" already means "a node of this cluster":
the channel needs no pinning or external PKI, and a node of another nf cluster is refused at
the TLS handshake. The node id is the certificate's common name; the channel trusts that name
only after the chain has been verified.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=3652)  # ten years: nf has no renewal story yet, so outlive the hardware
CLOCK_SKEW = dt.timedelta(hours=1)  # a node whose clock runs a little behind still accepts new certs


def make_ca(cluster_name: str) -> tuple[bytes, bytes]:
    """A self-signed EC P-256 CA for one cluster; returns (cert_pem, key_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _org(cluster_name)),
        x509.NameAttribute(NameOID.COMMON_NAME, f"nf cluster {cluster_name} CA"),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_node_cert(ca_cert_pem: bytes, ca_key_pem: bytes, node_id: str, cluster_name: str,
                   addresses: list[str]) -> tuple[bytes, bytes]:
    """A node certificate signed by the cluster CA; returns (cert_pem, key_pem).

    CN is the node id (what the channel authenticates). The SAN holds the id as a DNS name and
    every address as an IP address (a host name among them becomes a DNS name), for tools that
    do check host names. Valid for both ends of a connection: nodes dial each other.
    """
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the cluster CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.DNSName(node_id)]
    for address in dict.fromkeys(addresses):
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            if address != node_id:
                san.append(x509.DNSName(address))
    now = dt.datetime.now(dt.timezone.utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _org(cluster_name)),
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                              ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_secret(path: Path, data: bytes) -> None:
    """Write a file only its owner can read; it never exists with wider permissions, even briefly."""
    _write_atomic(Path(path), data, mode=0o600, dir_mode=0o700)


def write_public(path: Path, data: bytes) -> None:
    """Write a world-readable file (certificates, configs) atomically."""
    _write_atomic(Path(path), data, mode=0o644, dir_mode=0o755)


def _org(cluster_name: str) -> str:
    return f"nf cluster {cluster_name}"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_atomic(path: Path, data: bytes, mode: int, dir_mode: int) -> None:
    """Temp file created with its final mode (O_EXCL), fsynced, then renamed over `path`.

    A crash leaves either the old file or the new one, never a half-written key. A parent
    directory that already exists keeps its mode: it may be shared with other files.
    """
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away from a public file
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
