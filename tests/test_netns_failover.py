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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import nf, require, require_root, tree_diff, wait_for
from netbed import NetBed


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


def _running(bed: NetBed) -> None:
    bed.create()
    bed.start("primary")
    wait_for(lambda: bed.role("primary") == "active", 30, "the primary to be active")
    bed.start("secondary")
    wait_for(lambda: bed.role("secondary") == "passive" and all(n["connected"] for n in bed.status("primary")["nodes"]),
             30, "the secondary to follow the primary")


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

    there = json.loads(nf("switchover", "--config", str(bed.config), "--to", "secondary", "--json").stdout)
    assert there["took_over"] and there["lost_records"] == 0, there
    assert _checksums(bed.data("secondary")) == _checksums(d)
    wait_for(lambda: bed.role("secondary") == "active" and bed.role("primary") == "passive", 20, "roles swapped")
    bed.wait_serving("index.txt", "one service, two nodes\n")
    assert "10.77.0.50/" not in subprocess.run(["ip", "-n", bed.ns["primary"], "-o", "addr"], capture_output=True,
                                               text=True).stdout, "the old active released the public address"

    (bed.data("secondary") / "written-on-secondary").write_text("written while the secondary was active\n")
    wait_for(lambda: not next(n for n in bed.status("secondary")["nodes"] if n["id"] == "primary").get("syncing", True)
             and (d / "written-on-secondary").exists(), 30, "the old primary to be level again")
    back = json.loads(nf("switchover", "--config", str(bed.config), "--to", "primary", "--json").stdout)
    assert back["took_over"] and back["lost_records"] == 0, back
    assert _checksums(d) == _checksums(bed.data("secondary"))
    bed.wait_serving("written-on-secondary", "written while the secondary was active\n")


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
