"""Real servers the cozen tests talk to, started in a temporary directory and stopped after.

`Bind9`: Debian's `named` on loopback, a forward and a reverse zone that accept RFC 2136
updates signed with one TSIG key. `ensure_packages` installs what is missing (as root, with
apt), as a new machine has none of it.
"""
from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from conftest import require, wait_for


def ensure_packages(binaries: dict[str, str]) -> None:
    """{binary: Debian package}: install the packages whose binary is missing, or skip/fail."""
    missing = {pkg for binary, pkg in binaries.items() if shutil.which(binary) is None}
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", *sorted(missing)]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
    still = [b for b in binaries if shutil.which(b) is None]
    require(not still, f"needs {', '.join(still)} (Debian: apt-get install {' '.join(sorted(missing))})")


def terminate(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """Stop a server the test started: SIGTERM, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bind9:
    KEY_NAME = "nf-update"

    def __init__(self, workdir: Path, zone: str, reverse_zone: str = "127.in-addr.arpa") -> None:
        self.dir = workdir
        self.zone = zone
        self.reverse_zone = reverse_zone
        self.port = free_port()
        self.secret = base64.b64encode(os.urandom(32)).decode()
        self.proc: subprocess.Popen[bytes] | None = None

    def key_text(self, secret: str | None = None) -> str:
        return f'key "{self.KEY_NAME}" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret or self.secret}";\n}};\n'

    def write_key(self, path: Path, secret: str | None = None) -> Path:
        path.write_text(self.key_text(secret))
        path.chmod(0o600)
        return path

    def start(self) -> None:
        ensure_packages({"named": "bind9"})
        self.dir.mkdir(parents=True, exist_ok=True)
        soa = "@ IN SOA ns.{z}. admin.{z}. 1 60 60 600 60\n@ IN NS ns.{z}.\n"
        (self.dir / "forward.zone").write_text("$TTL 60\n" + soa.format(z=self.zone) + "ns IN A 127.0.0.1\n")
        (self.dir / "reverse.zone").write_text("$TTL 60\n" + soa.format(z=self.zone))
        (self.dir / "named.conf").write_text(textwrap.dedent(f"""\
            options {{
                directory "{self.dir}";
                pid-file "{self.dir}/named.pid";
                listen-on port {self.port} {{ 127.0.0.1; }};
                listen-on-v6 {{ none; }};
                recursion no;
                dnssec-validation no;
                allow-query {{ any; }};
            }};
            controls {{ }};
            {self.key_text()}
            zone "{self.zone}" {{ type primary; file "{self.dir}/forward.zone";
                allow-update {{ key "{self.KEY_NAME}"; }}; }};
            zone "{self.reverse_zone}" {{ type primary; file "{self.dir}/reverse.zone";
                allow-update {{ key "{self.KEY_NAME}"; }}; }};
            """))
        log = open(self.dir / "named.log", "wb")
        self.proc = subprocess.Popen(["named", "-g", "-c", str(self.dir / "named.conf")], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.proc is not None and self.proc.poll() is None and self.serial() > 0, 30,
                 f"named to answer on 127.0.0.1:{self.port} (see {self.dir}/named.log)")

    def stop(self) -> None:
        terminate(self.proc)

    def lookup(self, name: str, rdtype: str) -> set[str]:
        resp = dns.query.tcp(dns.message.make_query(name, rdtype), "127.0.0.1", port=self.port, timeout=3)
        return {rd.to_text() for rrset in resp.answer for rd in rrset}

    def serial(self) -> int:
        """The forward zone's SOA serial: it moves with every update the server accepted."""
        try:
            resp = dns.query.tcp(dns.message.make_query(self.zone, "SOA"), "127.0.0.1", port=self.port, timeout=2)
        except (OSError, dns.exception.DNSException):
            return 0
        if resp.rcode() != dns.rcode.NOERROR or not resp.answer:
            return 0
        return int(resp.answer[0][0].serial)


class SambaAD:
    """A Samba AD DC provisioned into a temporary directory: LDAPS (and StartTLS) on 127.0.0.1,
    with a certificate for that address from a CA of the test's own (`ca_file`)."""

    REALM, DOMAIN, BASE = "NF.TEST", "NF", "DC=nf,DC=test"
    ADMIN_DN = "CN=Administrator,CN=Users,DC=nf,DC=test"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.password = f"Nf-{os.urandom(6).hex()}-a1!"
        self.ca_file = workdir / "tls" / "ca.pem"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from engine.pki import make_ca, make_node_cert, write_public, write_secret

        ensure_packages({"samba": "samba-ad-dc", "samba-tool": "samba-ad-dc"})
        self.dir.mkdir(parents=True, exist_ok=True)
        prov = subprocess.run(
            ["samba-tool", "domain", "provision", f"--targetdir={self.dir}", f"--realm={self.REALM}",
             f"--domain={self.DOMAIN}", "--server-role=dc", "--dns-backend=NONE", f"--adminpass={self.password}",
             "--host-name=dc1", "--option=interfaces=127.0.0.1", "--option=bind interfaces only=yes"],
            capture_output=True, text=True, timeout=300)
        if prov.returncode != 0:
            raise RuntimeError(f"samba-tool domain provision failed: {prov.stdout[-2000:]}{prov.stderr[-2000:]}")
        ca_cert, ca_key = make_ca("ad-test")
        cert, key = make_node_cert(ca_cert, ca_key, "dc1", "ad-test", ["127.0.0.1"])
        write_public(self.ca_file, ca_cert)
        write_public(self.dir / "tls" / "cert.pem", cert)
        write_secret(self.dir / "tls" / "key.pem", key)
        (self.dir / "run").mkdir(exist_ok=True)
        conf = self.dir / "etc" / "smb.conf"
        conf.write_text(conf.read_text().replace("[global]\n", textwrap.dedent(f"""\
            [global]
            \tpid directory = {self.dir}/run
            \tlog file = {self.dir}/samba.%m.log
            \tserver services = ldap
            \ttls enabled = yes
            \ttls keyfile = {self.dir}/tls/key.pem
            \ttls certfile = {self.dir}/tls/cert.pem
            \ttls cafile = {self.ca_file}
            """), 1))
        log = open(self.dir / "samba.log", "wb")
        self.proc = subprocess.Popen(["samba", "-i", "-M", "single", "-s", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.proc is not None and self.proc.poll() is None and self._binds(), 60,
                 f"samba to answer LDAPS on 127.0.0.1:636 (see {self.dir}/samba.log)")

    def stop(self) -> None:
        terminate(self.proc)

    def connect(self):  # type: ignore[no-untyped-def]
        import ssl

        import ldap3

        tls = ldap3.Tls(ca_certs_file=str(self.ca_file), validate=ssl.CERT_REQUIRED)
        server = ldap3.Server("127.0.0.1", port=636, use_ssl=True, tls=tls, connect_timeout=5)
        return ldap3.Connection(server, user=self.ADMIN_DN, password=self.password, auto_bind=True)

    def _binds(self) -> bool:
        try:
            self.connect().unbind()
        except Exception:
            return False
        return True

    def computer(self, sam: str) -> dict | None:
        """The computer object with this sAMAccountName anywhere in the domain, as a dict of lists."""
        conn = self.connect()
        try:
            conn.search(self.BASE, f"(&(objectClass=computer)(sAMAccountName={sam}))",
                        attributes=["sAMAccountName", "dNSHostName", "servicePrincipalName", "description",
                                    "userAccountControl"])
            if not conn.entries:
                return None
            return dict(conn.entries[0].entry_attributes_as_dict, dn=conn.entries[0].entry_dn)
        finally:
            conn.unbind()
