"""Failover on the namespace testbed (tests/netbed.py) with the `linux` identity provider.

Each node is a network namespace with its own agent, the public address moves between them with
`ip addr`, and a client in its own namespace reads a file over HTTP from the service on the
public address, the way users of a clustered server would.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_kept_aside, nf, require, require_root, tree_diff, wait_for
from netbed import CLIENT, NetBed


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[NetBed]:
    require_root()
    require(shutil.which("ip") is not None and shutil.which("unshare") is not None,
            "needs iproute2 (ip) and util-linux (unshare)")
    probe = subprocess.run(["ip", "netns", "add", "nfprobe-ns"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "nfprobe-ns"], capture_output=True)
    require(probe.returncode == 0, "needs network namespaces (ip netns add)")
    b = NetBed(tmp_path / "bed")
    b.workdir.mkdir(parents=True)
    try:
        b.up()
        yield b
    finally:
        b.down()


def _running(bed: NetBed, **create: Any) -> None:
    bed.create(**create)
    bed.start("primary")
    wait_for(lambda: bed.role("primary") == "active", 30, "the primary to be active")
    bed.start("secondary")
    wait_for(lambda: bed.role("secondary") == "passive" and all(n["connected"] for n in bed.status("primary")["nodes"]),
             30, "the secondary to follow the primary")
    # level: a file written now has arrived and the initial sync is over, so the secondary may promote
    (bed.data("primary") / "cluster-up").write_text("level\n")
    wait_for(lambda: (bed.data("secondary") / "cluster-up").exists()
             and not next(n for n in bed.status("primary")["nodes"] if n["id"] == "secondary").get("syncing", True),
             30, "the secondary to be level")


def test_the_active_node_dies_and_the_client_is_served_by_the_secondary(bed: NetBed) -> None:
    _running(bed)
    (bed.data("primary") / "index.txt").write_text("served by the cluster\n")
    bed.wait_serving("index.txt", "served by the cluster\n")
    for i in range(50):
        (bed.data("primary") / f"acked-{i:02d}").write_text(f"file {i}\n")
    wait_for(lambda: tree_diff(bed.data("primary"), bed.data("secondary")) == [], 30,
             "every file to be applied on the secondary")
    host_name = subprocess.run(["hostname"], capture_output=True, text=True).stdout

    bed.crash("primary")
    bed.wait_serving("index.txt", "served by the cluster\n", timeout=60)  # bench/failover.py times this

    assert bed.role("secondary") == "active"
    for i in range(50):
        assert (bed.data("secondary") / f"acked-{i:02d}").read_text() == f"file {i}\n"
    got = subprocess.run(["ip", "-n", bed.ns["secondary"], "-o", "addr", "show", "dev", "eth0"],
                         capture_output=True, text=True).stdout
    assert "10.77.0.50/" in got, "the linux provider put the public address on the new active's interface"
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout == host_name, \
        "the machine's own host name is untouched"


def test_a_cut_channel_with_the_public_network_up_promotes_nobody_and_resyncs_on_heal(bed: NetBed) -> None:
    _running(bed)
    (bed.data("primary") / "before").write_text("before the cut\n")
    wait_for(lambda: (bed.data("secondary") / "before").exists(), 30, "replication before the cut")
    bed.cut_channel()
    (bed.data("primary") / "during").write_text("written while the channel is down\n")
    from engine.config import load_cluster

    timeout = load_cluster(bed.config).heartbeat.failover_timeout
    deadline = time.monotonic() + 3 * timeout
    while time.monotonic() < deadline:  # the secondary hears no heartbeat, but the active still answers
        assert bed.role("secondary") == "passive", "a passive promoted while the active was alive"
        assert bed.role("primary") == "active"
        time.sleep(0.2)
    assert not (bed.data("secondary") / "during").exists()
    bed.heal_channel()
    wait_for(lambda: tree_diff(bed.data("primary"), bed.data("secondary")) == [], 60,
             "the secondary to catch up once the channel is back")
    assert bed.fetch("during") == "written while the channel is down\n"


def _checksums(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}


def test_switchover_there_and_back_loses_nothing_and_the_client_follows(bed: NetBed) -> None:
    _running(bed)
    d = bed.data("primary")
    (d / "index.txt").write_text("one service, two nodes\n")
    for i in range(100):
        (d / f"s{i:03d}").write_bytes(os.urandom(3000 + i))
    bed.wait_serving("index.txt", "one service, two nodes\n")

    wait_for(lambda: (_hostname(bed, "primary"), _hostname(bed, "secondary")) == ("app", "app-nf-secondary"), 20,
             "each agent's host name to be the name its role presents")
    there = json.loads(nf("switchover", "--config", str(bed.config), "--to", "secondary", "--json").stdout)
    assert there["took_over"] and there["lost_records"] == 0, there
    assert _checksums(bed.data("secondary")) == _checksums(d)
    wait_for(lambda: bed.role("secondary") == "active" and bed.role("primary") == "passive", 20, "roles swapped")
    bed.wait_serving("index.txt", "one service, two nodes\n")
    wait_for(lambda: (_hostname(bed, "primary"), _hostname(bed, "secondary")) == ("app-nf-primary", "app"), 20,
             "the host names to follow the roles")
    assert "10.77.0.50/" not in subprocess.run(["ip", "-n", bed.ns["primary"], "-o", "addr"], capture_output=True,
                                               text=True).stdout, "the old active released the public address"

    (bed.data("secondary") / "written-on-secondary").write_text("written while the secondary was active\n")
    wait_for(lambda: not next(n for n in bed.status("secondary")["nodes"] if n["id"] == "primary").get("syncing", True)
             and (d / "written-on-secondary").exists(), 30, "the old primary to be level again")
    back = json.loads(nf("switchover", "--config", str(bed.config), "--to", "primary", "--json").stdout)
    assert back["took_over"] and back["lost_records"] == 0, back
    assert _checksums(d) == _checksums(bed.data("secondary"))
    bed.wait_serving("written-on-secondary", "written while the secondary was active\n")


def _hostname(bed: NetBed, node: str) -> str:
    """The host name in the agent's own UTS namespace (the machine's is never touched)."""
    pid = bed.procs[node].pid  # ip netns exec and unshare exec the agent: the same process
    return subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True).stdout.strip()


def _holders(bed: NetBed) -> list[str]:
    return [n for n in ("primary", "secondary")
            if "10.77.0.50/" in subprocess.run(["ip", "-n", bed.ns[n], "-o", "addr", "show", "dev", "eth0"],
                                               capture_output=True, text=True).stdout]


def test_a_frozen_active_is_never_answered_beside_and_steps_down_when_it_wakes(bed: NetBed) -> None:
    import signal

    _running(bed)
    (bed.data("primary") / "index.txt").write_text("one at a time\n")
    bed.wait_serving("index.txt", "one at a time\n")
    bed.kill("primary", signal.SIGSTOP)
    try:
        wait_for(lambda: bed.role("secondary") == "active", 30, "the secondary to promote past the timeout")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # the frozen node's kernel still answers ARP: the new active waits
            assert _holders(bed) == ["primary"], _holders(bed)
            time.sleep(0.1)
        # a program on the frozen node's machine keeps writing: after the fork, so a divergence
        (bed.data("primary") / "written-after-fork").write_text("only the old active has this\n")
    finally:
        bed.kill("primary", signal.SIGCONT)
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and seen[-1:] != [["secondary"]]:
        seen.append(_holders(bed))
        assert len(seen[-1]) <= 1, f"two nodes held the public address at once: {seen[-1]}"
    assert seen[-1] == ["secondary"], seen[-5:]
    wait_for(lambda: bed.role("primary") == "passive", 30, "the woken active to step down")
    bed.wait_serving("index.txt", "one at a time\n")
    assert_kept_aside(bed.config, "primary", "srv/data/written-after-fork", "only the old active has this\n")
    wait_for(lambda: not (bed.data("primary") / "written-after-fork").exists(), 30,
             "the old active to resync to the new active's tree")
    assert not (bed.data("secondary") / "written-after-fork").exists()


def test_an_active_cut_from_everything_isolates_itself_and_the_secondary_takes_over(bed: NetBed) -> None:
    _running(bed, heartbeat=f'probes = ["icmp:{CLIENT}"]')  # the client stands in for the gateway
    (bed.data("primary") / "index.txt").write_text("served through an isolation\n")
    bed.wait_serving("index.txt", "served through an isolation\n")
    wait_for(lambda: (bed.data("secondary") / "index.txt").exists(), 30, "replication before the cut")

    bed.isolate("primary")
    wait_for(lambda: bed.role("primary") == "passive", 30, "the cut-off active to demote itself")
    assert any("self-isolation" in e["message"] for e in bed.events("primary"))
    wait_for(lambda: bed.role("secondary") == "active", 30, "the secondary to promote")
    bed.wait_serving("index.txt", "served through an isolation\n")
    assert _holders(bed) == ["secondary"]

    bed.rejoin("primary")
    (bed.data("secondary") / "after").write_text("written on the new active\n")
    wait_for(lambda: (bed.data("primary") / "after").exists(), 30, "the old active to follow the new one")
    assert bed.role("primary") == "passive" and _holders(bed) == ["secondary"]


def test_an_application_whose_monitor_fails_is_restarted_then_switched_over(bed: NetBed) -> None:
    import signal

    _running(bed, restarts=1)
    (bed.data("primary") / "index.txt").write_text("web\n")
    bed.wait_serving("index.txt", "web\n")
    pid_file = bed.workdir / "primary" / "http.pid"
    first = pid_file.read_text().strip()

    os.kill(int(first), signal.SIGKILL)  # the service dies behind the agent's back
    wait_for(lambda: pid_file.read_text().strip() not in ("", first), 20, "the primary to restart the service")
    bed.wait_serving("index.txt", "web\n")
    assert bed.role("secondary") == "passive" and _holders(bed) == ["primary"]
    assert any("restart 1 of 1" in e["message"] for e in bed.events("primary"))

    (bed.workdir / "broken-primary").touch()  # now it fails for good: restarts are used up
    wait_for(lambda: bed.role("secondary") == "active", 30, "the switchover to the secondary")
    bed.wait_serving("index.txt", "web\n")
    assert _holders(bed) == ["secondary"]
    assert bed.role("primary") == "passive"
    assert any("still failing" in e["message"] for e in bed.events("primary"))


def test_alerts_reach_smtp_over_starttls_with_login_and_a_webhook(bed: NetBed) -> None:
    from engine.pki import make_ca, make_node_cert, write_public, write_secret

    sink_dir = bed.workdir / "sink"
    ca_cert, ca_key = make_ca("sink")
    cert, key = make_node_cert(ca_cert, ca_key, "smtp", "sink", [CLIENT])
    write_public(sink_dir / "ca.pem", ca_cert)
    write_public(sink_dir / "cert.pem", cert)
    write_secret(sink_dir / "key.pem", key)
    write_secret(bed.workdir / "smtp.password", b"mail-pass-2f9c\n")
    write_secret(bed.workdir / "webhook.token", b"hook-token-81ad\n")
    out = sink_dir / "received.jsonl"
    sink = subprocess.Popen(
        ["ip", "netns", "exec", bed.ns["client"], sys.executable, str(Path(__file__).parent / "alert_sink.py"),
         "--host", CLIENT, "--smtp-port", "2525", "--web-port", "8081", "--cert", str(sink_dir / "cert.pem"),
         "--key", str(sink_dir / "key.pem"), "--user", "nf-alerts", "--password-file", str(bed.workdir / "smtp.password"),
         "--out", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready", "the alert sink did not start"
        _running(bed, extra=f"""
[alerts]
[alerts.email]
host = "{CLIENT}"
port = 2525
from = "nf@bed.test"
to = ["ops@bed.test"]
starttls = true
username = "nf-alerts"
password_file = "smtp.password"
ca_file = "sink/ca.pem"
[alerts.webhook]
url = "http://{CLIENT}:8081/hook"
token_file = "webhook.token"
""")
        bed.crash("primary")

        def received() -> list[dict[str, Any]]:
            return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

        def promoted(r: dict[str, Any]) -> bool:
            text = r["content"] if r["sink"] == "smtp" else json.dumps(r["body"])
            return "role_changed" in text and "passive -> active" in text

        wait_for(lambda: {r["sink"] for r in received() if promoted(r)} == {"smtp", "webhook"}, 30,
                 "the promotion to be mailed and posted")
        mail = next(r for r in received() if r["sink"] == "smtp" and promoted(r))
        assert mail["tls"] and mail["user"] == "nf-alerts" and mail["rcpt_tos"] == ["ops@bed.test"]
        assert "Subject: [nf bed] warning: role_changed on secondary" in mail["content"]
        hook = next(r for r in received() if r["sink"] == "webhook" and promoted(r))
        assert hook["auth"] == "Bearer hook-token-81ad" and hook["body"]["node"] == "secondary"
        for log in bed.workdir.glob("*/agent.log"):
            assert "mail-pass-2f9c" not in log.read_text() and "hook-token-81ad" not in log.read_text()
    finally:
        sink.kill()
        sink.wait()
