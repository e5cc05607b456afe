"""Cozen identities on a real demo cluster: BIND9 takes the DNS updates, nmblookup asks the responder.

Every passive presents its cozen name (DNS A and PTR for its management address, a NetBIOS name
answered there); the active presents the public names. The machine's own host name is never
touched by the demo (the local provider).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Demo, nf, require_root, wait_for
from engine.config import load_cluster
from nftui.demo import create
from servers import Bind9, SambaAD, ensure_packages, free_port


@pytest.fixture
def bind9(tmp_path: Path) -> Iterator[Bind9]:
    server = Bind9(tmp_path / "named", "nf.test")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _configure(demo: Demo, bind9: Bind9, *, secret: str | None = None, port: int | None = None,
               takeover: bool = False) -> None:
    require_root()  # the NetBIOS responder answers on UDP 137
    ensure_packages({"nmblookup": "samba-common-bin"})
    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 3)
    bind9.write_key(demo.workdir / "dns.key", secret)
    with open(demo.config, "a") as f:
        f.write(f'\n[dns]\nserver = "127.0.0.1"\nport = {port or bind9.port}\nzone = "nf.test"\n'
                f'reverse_zones = ["127.in-addr.arpa"]\nkey_file = "dns.key"\npublic_takeover = {str(takeover).lower()}\n'
                f'\n[netbios]\n')


@pytest.fixture
def samba(tmp_path: Path) -> Iterator[SambaAD]:
    require_root()  # samba's LDAP server binds ports 389 and 636
    server = SambaAD(tmp_path / "ad")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _with_directory(demo: Demo, samba: SambaAD, url: str = "ldaps://127.0.0.1") -> None:
    """A demo cluster whose cozen identities go to the directory (and NetBIOS), not DNS."""
    require_root()
    ensure_packages({"nmblookup": "samba-common-bin"})
    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 3)
    secret = demo.workdir / "ad.password"
    secret.write_text(samba.password + "\n")
    secret.chmod(0o600)
    with open(demo.config, "a") as f:
        f.write(f'\n[directory]\nurl = "{url}"\nbind_dn = "{samba.ADMIN_DN}"\npassword_file = "ad.password"\n'
                f'base = "OU=nf-clones,{samba.BASE}"\nca_file = "{samba.ca_file}"\n\n[netbios]\n')


def _cozen(demo: Demo, *args: str) -> dict[str, dict[str, Any]]:
    out = nf("cozen", *args, "--config", str(demo.config), "--json", check=False)
    return {n["node"]: n for n in json.loads(out.stdout)["nodes"]}


def _nmblookup(address: str, name: str) -> str | None:
    """The address nmblookup gets for `name` by asking `address` directly, or None."""
    out = subprocess.run(["nmblookup", "-U", address, name], capture_output=True, text=True, timeout=20).stdout
    for line in out.splitlines():
        if line.endswith(f" {name}<00>"):
            return line.split()[0]
    return None


def _ptr(address: str) -> str:
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa."


def test_a_new_cluster_registers_each_passive_in_dns_and_netbios(demo: Demo, bind9: Bind9) -> None:
    _configure(demo, bind9, takeover=True)
    cluster = load_cluster(demo.config)
    demo.up(nodes=3)
    nodes = {n.id: n for n in cluster.nodes}
    for node in ("secondary", "tertiary"):
        n = nodes[node]
        wait_for(lambda n=n: bind9.lookup(n.cozen_fqdn, "A") == {n.management}, 30, f"{n.cozen_fqdn} in DNS")
        assert bind9.lookup(_ptr(n.management), "PTR") == {n.cozen_fqdn + "."}
        assert _nmblookup(n.management, n.cozen_netbios) == n.management
    assert bind9.lookup(nodes["primary"].cozen_fqdn, "A") == set(), "the active presents the public name only"
    public = cluster.public.addresses[0].split("/")[0]
    wait_for(lambda: bind9.lookup("app01.nf.test", "A") == {public}, 30, "the public name at the public address")
    wait_for(lambda: _nmblookup(public, "APP01") == public, 30, "the public NetBIOS name on the public address")

    status = _cozen(demo, "status")
    for node in ("secondary", "tertiary"):
        dns = status[node]["providers"]["dns"]
        assert dns["registered"] and dns["verified"] and not dns["error"], dns
        assert status[node]["providers"]["netbios"]["registered"]
        assert status[node]["providers"]["directory"]["configured"] is False
        assert status[node]["presented"] == nodes[node].cozen_fqdn
    assert status["primary"]["presented"] == "app01.nf.test"
    presented = {n["id"]: n["presented_name"] for n in demo.status()["nodes"]}
    assert presented == {"primary": "app01.nf.test", "secondary": nodes["secondary"].cozen_fqdn,
                         "tertiary": nodes["tertiary"].cozen_fqdn}


def test_after_a_switchover_the_names_follow_the_roles(demo: Demo, bind9: Bind9) -> None:
    _configure(demo, bind9)
    cluster = load_cluster(demo.config)
    nodes = {n.id: n for n in cluster.nodes}
    host_name = subprocess.run(["hostname"], capture_output=True, text=True).stdout
    demo.up(nodes=3)
    p, s = nodes["primary"], nodes["secondary"]
    wait_for(lambda: bind9.lookup(s.cozen_fqdn, "A") == {s.management}, 30, "the secondary's cozen name")
    out = json.loads(nf("switchover", "--config", str(demo.config), "--to", "secondary", "--json").stdout)
    assert out["took_over"], out

    wait_for(lambda: bind9.lookup(p.cozen_fqdn, "A") == {p.management}, 30, "the old active's cozen name")
    wait_for(lambda: bind9.lookup(s.cozen_fqdn, "A") == set(), 30, "the new active's cozen name to go")
    assert bind9.lookup(_ptr(p.management), "PTR") == {p.cozen_fqdn + "."}
    assert bind9.lookup(_ptr(s.management), "PTR") == set()
    wait_for(lambda: _nmblookup(p.management, p.cozen_netbios) == p.management, 30, "the old active's NetBIOS name")
    assert _nmblookup(s.management, s.cozen_netbios) is None, "the new active no longer answers its cozen name"
    public = cluster.public.addresses[0].split("/")[0]
    wait_for(lambda: _nmblookup(public, "APP01") == public, 30, "the public NetBIOS name, now from the secondary")
    presented = {n["id"]: n["presented_name"] for n in demo.status()["nodes"]}
    assert presented["secondary"] == "app01.nf.test" and presented["primary"] == p.cozen_fqdn
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout == host_name, \
        "the demo never changes the machine's host name"


def test_a_wrong_key_or_a_silent_server_is_a_clear_error_and_netbios_keeps_working(demo: Demo, bind9: Bind9) -> None:
    import base64
    import os

    _configure(demo, bind9, secret=base64.b64encode(os.urandom(32)).decode())
    cluster = load_cluster(demo.config)
    s = cluster.node("secondary")
    demo.up(nodes=2)
    wait_for(lambda: _cozen(demo, "status")["secondary"]["providers"]["dns"]["error"], 30, "the DNS error")
    status = _cozen(demo, "status")["secondary"]
    assert "refused our TSIG key" in status["providers"]["dns"]["error"], status
    assert status["providers"]["netbios"]["registered"] and _nmblookup(s.management, s.cozen_netbios) == s.management
    assert bind9.lookup(s.cozen_fqdn, "A") == set()
    assert nf("cozen", "status", "--config", str(demo.config), check=False).returncode == 1
    events = [e["message"] for e in demo.events("secondary")]
    assert any("refused our TSIG key" in m for m in events) and not any(bind9.secret in m for m in events)

    text = demo.config.read_text().replace(f"port = {bind9.port}", f"port = {free_port()}")  # nothing listens there
    demo.config.write_text(text)
    demo.kill("secondary")
    demo.start("secondary")
    wait_for(lambda: "did not answer" in _cozen(demo, "status")["secondary"]["providers"]["dns"]["error"], 60,
             "the unreachable-server error")
    assert _nmblookup(s.management, s.cozen_netbios) == s.management


def test_apply_twice_changes_nothing_the_second_time(demo: Demo, bind9: Bind9) -> None:
    _configure(demo, bind9)
    s = load_cluster(demo.config).node("secondary")
    demo.up(nodes=3)
    wait_for(lambda: bind9.lookup(s.cozen_fqdn, "A") == {s.management}, 30, "the secondary's cozen name")
    first = _cozen(demo, "apply")
    serial = bind9.serial()
    second = _cozen(demo, "apply")
    assert all(not p["changed"] for n in second.values() for p in n["providers"].values()), second
    assert bind9.serial() == serial, "no update reached the server"
    assert all(n["providers"]["dns"]["verified"] for n in first.values())
    human = nf("cozen", "apply", "--config", str(demo.config))
    assert "Nothing to change" in human.stdout


def test_remove_takes_a_departed_nodes_names_out_of_dns(demo: Demo, bind9: Bind9) -> None:
    _configure(demo, bind9)
    t = load_cluster(demo.config).node("tertiary")
    demo.up(nodes=3)
    wait_for(lambda: bind9.lookup(t.cozen_fqdn, "A") == {t.management}, 30, "the tertiary's cozen name")
    demo.kill("tertiary")
    out = json.loads(nf("cozen", "remove", "tertiary", "--config", str(demo.config), "--json").stdout)
    assert not out["providers"]["dns"]["error"] and out["providers"]["dns"]["registered"] is False, out
    assert bind9.lookup(t.cozen_fqdn, "A") == set() and bind9.lookup(_ptr(t.management), "PTR") == set()
    refused = nf("cozen", "remove", "primary", "--config", str(demo.config), "--json", check=False)
    assert refused.returncode == 1 and "the active" in refused.stdout



def test_the_responder_answers_its_name_and_ignores_garbage() -> None:
    import asyncio
    import socket
    import struct

    from engine.config import NodeSpec
    from engine.cozen import Presentation
    from engine.cozen.netbios import NetBiosRegistrar, decode_question, encode_name

    def query(name: str, suffix: int = 0) -> bytes:  # id 0xabcd, a name query with recursion desired
        return struct.pack(">HHHHHH", 0xABCD, 0x0110, 1, 0, 0, 0) + encode_name(name, suffix) + struct.pack(">HH", 0x20, 1)

    async def exchange() -> list[bytes | None]:
        port = free_port()
        responder = NetBiosRegistrar(port)
        node = NodeSpec("secondary", "127.0.0.1", 7780, "127.0.0.1", "clone", "CLONE-7", "x.test")
        state = await responder.apply(Presentation(node, "passive", "x.test", "CLONE-7", ("127.0.0.1",)))
        assert state.registered, state
        loop = asyncio.get_running_loop()
        answers: list[bytes | None] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            for packet in (b"\x00" * 3, b"\xff" * 80, query("SOMEONE-ELSE"), query("clone-7")):
                s.sendto(packet, ("127.0.0.1", port))
                try:
                    answers.append(await asyncio.wait_for(loop.sock_recv(s, 512), 0.3))
                except asyncio.TimeoutError:
                    answers.append(None)
        await responder.close()
        return answers

    *ignored, answer = asyncio.run(exchange())
    assert ignored == [None, None, None], "garbage and other names get no answer"
    assert answer is not None and answer[:2] == b"\xab\xcd" and answer[2] & 0x80, "a response to our query"
    assert answer[-4:] == bytes([127, 0, 0, 1]) and decode_question(answer) is None


@pytest.mark.parametrize(("dns", "field"), [
    ('server = "dns.example"\nzone = "nf.test"\nkey_file = "dns.key"', "dns.server"),
    ('server = "127.0.0.1"\nzone = "nf.test"', "dns.key_file"),
    ('server = "127.0.0.1"\nzone = "nf.test"\nkey_file = "open.key"', "dns.key_file"),
    ('server = "127.0.0.1"\nzone = "other.test"\nkey_file = "dns.key"\npublic_takeover = true', "dns.public_takeover"),
    ('server = "127.0.0.1"\nzone = "nf.test"\nkey_file = "dns.key"\nreverse_zones = ["10.in-addr"]', "dns.reverse_zones"),
])
def test_bad_dns_config_names_the_field(tmp_path: Path, dns: str, field: str) -> None:
    from engine.errors import ConfigError

    create(tmp_path, 2)
    for name, mode in (("dns.key", 0o600), ("open.key", 0o644)):
        (tmp_path / name).write_text('key "k" { algorithm hmac-sha256; secret "AAAA"; };\n')
        (tmp_path / name).chmod(mode)
    with open(tmp_path / "cluster.toml", "a") as f:
        f.write(f"\n[dns]\n{dns}\n")
    with pytest.raises(ConfigError) as err:
        load_cluster(tmp_path / "cluster.toml")
    assert field in str(err.value), str(err.value)


def test_node_local_identity_files_differ_between_clones_and_survive_verify_with_repair(demo: Demo) -> None:
    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 2)
    with open(demo.config, "a") as f:
        f.write('\n[[protected]]\npath = "/etc"\ninclude = []\nexclude = []\n')
    identity = ("etc/machine-id", "etc/ssh/ssh_host_ed25519_key", "etc/patch-agent/id.dat")
    for node in ("primary", "secondary"):
        for rel in identity:
            path = demo.workdir / node / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{node}'s own {rel}\n")
        with open(demo.workdir / node / "node.toml", "a") as f:  # what a patch-agent plugin declares
            f.write('\n[identity]\nlocal_files = ["/etc/patch-agent/id.dat"]\n')
    (demo.workdir / "primary" / "etc" / "app.conf").write_text("the same on every clone\n")
    demo.up(nodes=2)
    wait_for(lambda: (demo.workdir / "secondary" / "etc" / "app.conf").exists(), 30, "etc/app.conf to replicate")

    out = nf("verify", "--repair", "--config", str(demo.config), "--json", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (demo.workdir / "primary" / "etc" / "machine-id").write_text("changed on the active\n")  # an event, not shipped
    (demo.workdir / "primary" / "etc" / "app.conf").write_text("changed after\n")
    wait_for(lambda: (demo.workdir / "secondary" / "etc" / "app.conf").read_text() == "changed after\n", 30,
             "the change after verify to replicate")
    assert nf("verify", "--repair", "--config", str(demo.config), "--json", check=False).returncode == 0
    for rel in identity:
        assert (demo.workdir / "secondary" / rel).read_text() == f"secondary's own {rel}\n", rel
    assert (demo.workdir / "primary" / "etc" / "patch-agent" / "id.dat").read_text() == "primary's own etc/patch-agent/id.dat\n"

    # The active removes the directory above an identity file: the passive keeps its own file,
    # loses what else was there, and verify still finds the clones equal.
    (demo.workdir / "primary" / "etc" / "patch-agent" / "agent.log").write_text("replicated\n")
    passive_log = demo.workdir / "secondary" / "etc" / "patch-agent" / "agent.log"
    wait_for(passive_log.exists, 30, "the patch agent's log to replicate")
    shutil.rmtree(demo.workdir / "primary" / "etc" / "patch-agent")
    wait_for(lambda: not passive_log.exists(), 30, "the directory's removal to replicate")
    assert (demo.workdir / "secondary" / "etc" / "patch-agent" / "id.dat").read_text() == \
        "secondary's own etc/patch-agent/id.dat\n"
    out = nf("verify", "--config", str(demo.config), "--json", check=False)
    assert out.returncode == 0, out.stdout + out.stderr

    # A new version of the directory is renamed into its place (an upgrade): the passive's
    # identity file stays, and what the new directory brings joins it.
    new = demo.workdir / "primary" / "etc" / "patch-agent.new"
    new.mkdir()
    (new / "agent.conf").write_text("version 2\n")
    (new / "id.dat").write_text("the active's new id, replicated while it has another name\n")
    wait_for((demo.workdir / "secondary" / "etc" / "patch-agent.new" / "agent.conf").exists, 30,
             "the new directory to replicate")
    new.rename(demo.workdir / "primary" / "etc" / "patch-agent")
    conf = demo.workdir / "secondary" / "etc" / "patch-agent" / "agent.conf"
    wait_for(conf.exists, 30, "the renamed directory to replicate")
    assert conf.read_text() == "version 2\n"
    assert (demo.workdir / "secondary" / "etc" / "patch-agent" / "id.dat").read_text() == \
        "secondary's own etc/patch-agent/id.dat\n"
    assert not (demo.workdir / "secondary" / "etc" / "patch-agent.new").exists()
    out = nf("verify", "--config", str(demo.config), "--json", check=False)
    assert out.returncode == 0, out.stdout + out.stderr

    # The agent is uninstalled on the active, which leaves its directory empty: the passive's
    # copy holds only its own identity file now, and that is the same directory, not a difference.
    for name in ("id.dat", "agent.conf"):
        (demo.workdir / "primary" / "etc" / "patch-agent" / name).unlink()
    wait_for(lambda: not conf.exists(), 30, "the removal of agent.conf to replicate")
    out = nf("verify", "--config", str(demo.config), "--json", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["differences"] == 0


@pytest.mark.parametrize("bad", ['"etc/machine-id"', '"/etc/../shadow"', '"/"'])
def test_a_bad_local_file_names_the_field(tmp_path: Path, bad: str) -> None:
    from engine.config import load_node
    from engine.errors import ConfigError

    create(tmp_path, 2)
    with open(tmp_path / "secondary" / "node.toml", "a") as f:
        f.write(f"\n[identity]\nlocal_files = [{bad}]\n")
    with pytest.raises(ConfigError) as err:
        load_node(tmp_path / "secondary" / "node.toml", load_cluster(tmp_path / "cluster.toml"))
    assert "identity.local_files" in str(err.value) and "absolute" in str(err.value)


def test_each_node_has_a_computer_object_enabled_while_passive(demo: Demo, samba: SambaAD) -> None:
    _with_directory(demo, samba)
    cluster = load_cluster(demo.config)
    demo.up(nodes=3)
    for node in cluster.nodes:
        wait_for(lambda n=node: samba.computer(f"{n.cozen_netbios}$") is not None, 30, f"{node.id}'s computer object")
    s = cluster.node("secondary")
    obj = samba.computer(f"{s.cozen_netbios}$")
    assert obj is not None
    assert obj["dn"] == f"CN={s.cozen_netbios},OU=nf-clones,{samba.BASE}"
    assert obj["dNSHostName"] == [s.cozen_fqdn]
    assert sorted(obj["servicePrincipalName"]) == sorted([f"HOST/{s.cozen_fqdn}", f"HOST/{s.cozen_netbios}"])
    assert obj["description"] == ["nf cluster demo: cozen identity of node secondary"]
    assert int(obj["userAccountControl"][0]) & 2 == 0, "enabled while passive"
    primary = samba.computer(f"{cluster.node('primary').cozen_netbios}$")
    assert primary is not None and int(primary["userAccountControl"][0]) & 2, "disabled while active"
    status = _cozen(demo, "status")["secondary"]["providers"]["directory"]
    assert status["registered"] and status["verified"] and not status["error"], status

    out = json.loads(nf("switchover", "--config", str(demo.config), "--to", "secondary", "--json").stdout)
    assert out["took_over"], out
    wait_for(lambda: int(samba.computer(f"{s.cozen_netbios}$")["userAccountControl"][0]) & 2, 30,
             "the new active's object to be disabled")
    wait_for(lambda: int(samba.computer(f"{cluster.node('primary').cozen_netbios}$")["userAccountControl"][0]) & 2
             == 0, 30, "the new passive's object to be enabled")
    second = _cozen(demo, "apply")
    assert not any(n["providers"]["directory"]["changed"] for n in second.values()), second

    demo.kill("tertiary")
    removed = json.loads(nf("cozen", "remove", "tertiary", "--config", str(demo.config), "--json").stdout)
    assert not removed["providers"]["directory"]["error"], removed
    t = samba.computer(f"{cluster.node('tertiary').cozen_netbios}$")
    assert t is not None and int(t["userAccountControl"][0]) & 2, "disabled (on_remove = disable)"


def test_nodes_registering_at_once_share_the_new_ou(demo: Demo, samba: SambaAD) -> None:
    """Every passive of a new cluster presents at start-up: whoever misses the OU creates it,
    and losing that race is no error (it cost a node its computer object until the next try)."""
    import dataclasses
    import threading

    from engine.cozen.directory import DirectoryRegistrar

    _with_directory(demo, samba)
    cluster = load_cluster(demo.config)
    assert cluster.directory is not None
    for attempt in range(20):  # the race is in timing: twenty new OUs make losing it near certain
        base = f"OU=nf-race{attempt},{samba.BASE}"
        settings = dataclasses.replace(cluster.directory, base=base)
        start = threading.Barrier(len(cluster.nodes))
        states: dict[str, Any] = {}

        def register(node: Any) -> None:
            registrar = DirectoryRegistrar(settings, cluster.name)
            start.wait()
            states[node.id] = registrar._run(node, "enable")

        threads = [threading.Thread(target=register, args=(n,)) for n in cluster.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert {n: s.error for n, s in states.items()} == {n.id: "" for n in cluster.nodes}, base
        conn = samba.connect()
        assert conn.search(base, "(objectClass=computer)", attributes=["sAMAccountName"]), conn.result
        assert sorted(str(e.sAMAccountName) for e in conn.entries) == sorted(f"{n.cozen_netbios}$" for n in cluster.nodes)
        for dn in [e.entry_dn for e in conn.entries] + [base]:  # the next round starts without them
            assert conn.delete(dn), conn.result
        conn.unbind()


def test_on_remove_delete_takes_a_departed_nodes_object_out_of_the_directory(demo: Demo, samba: SambaAD) -> None:
    import asyncio
    import dataclasses

    from engine.cozen.directory import DirectoryRegistrar

    _with_directory(demo, samba)
    cluster = load_cluster(demo.config)
    assert cluster.directory is not None
    base = f"OU=nf-remove,{samba.BASE}"
    registrar = DirectoryRegistrar(dataclasses.replace(cluster.directory, base=base, on_remove="delete"),
                                   cluster.name)
    node = cluster.node("tertiary")
    assert registrar._run(node, "enable").error == ""
    assert samba.computer(f"{node.cozen_netbios}$") is not None
    state = asyncio.run(registrar.remove(node))
    assert state.error == "" and not state.registered, state
    assert samba.computer(f"{node.cozen_netbios}$") is None
    again = asyncio.run(registrar.remove(node))  # a second remove finds nothing to do
    assert again.error == "" and not again.changed, again
    conn = samba.connect()
    assert conn.delete(base), conn.result
    conn.unbind()


def test_a_directory_refusal_reaches_the_operator_in_the_servers_words(demo: Demo, samba: SambaAD) -> None:
    _with_directory(demo, samba, url="ldap://127.0.0.1")  # StartTLS this time
    s = load_cluster(demo.config).node("secondary")
    conn = samba.connect()  # another object already holds the secondary's SPN
    assert conn.add(f"CN=OTHER,CN=Computers,{samba.BASE}", ["top", "person", "organizationalPerson", "user", "computer"],
                    {"sAMAccountName": "OTHER$", "servicePrincipalName": [f"HOST/{s.cozen_netbios}"],
                     "userAccountControl": 4096}), conn.result
    conn.unbind()
    demo.up(nodes=2)
    wait_for(lambda: _cozen(demo, "status")["secondary"]["providers"]["directory"]["error"], 30, "the refusal")
    status = _cozen(demo, "status")["secondary"]["providers"]
    assert "would cause a conflict" in status["directory"]["error"], status["directory"]
    assert status["netbios"]["registered"] and _nmblookup(s.management, s.cozen_netbios) == s.management
    assert nf("cozen", "status", "--config", str(demo.config), check=False).returncode == 1


@pytest.mark.parametrize(("directory", "field"), [
    ('url = "http://dc1"\nbind_dn = "CN=a,DC=b"\npassword_file = "pw"\nbase = "OU=x,DC=b"', "directory.url"),
    ('url = "ldaps://dc1"\nbind_dn = "CN=a,DC=b"\nbase = "OU=x,DC=b"', "directory.password_file"),
    ('url = "ldaps://dc1"\nbind_dn = "CN=a,DC=b"\npassword_file = "pw"\nbase = "CN=Computers,DC=b"', "directory.base"),
    ('url = "ldaps://dc1"\nbind_dn = "CN=a,DC=b"\npassword_file = "pw"\nbase = "OU=x,DC=b"\non_remove = "keep"',
     "directory.on_remove"),
])
def test_bad_directory_config_names_the_field(tmp_path: Path, directory: str, field: str) -> None:
    from engine.errors import ConfigError

    create(tmp_path, 2)
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "pw").chmod(0o600)
    with open(tmp_path / "cluster.toml", "a") as f:
        f.write(f"\n[directory]\n{directory}\n")
    with pytest.raises(ConfigError) as err:
        load_cluster(tmp_path / "cluster.toml")
    assert field in str(err.value), str(err.value)
