"""The CLI as operators and scripts meet it: help, exit codes, error shapes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import nf
from nftui.demo import create


@pytest.mark.parametrize("args", [[], ["agent"], ["init"], ["status"], ["verify"], ["demo"], ["demo", "up"],
                                  ["demo", "down"], ["demo", "kill"], ["demo", "start"], ["why"], ["failover"], ["switchover"]])
def test_every_command_has_help(args: list[str]) -> None:
    out = nf(*args, "--help").stdout
    assert "Usage" in out and "--help" in out


@pytest.mark.parametrize("command", [["nf", "agent"], [sys.executable, "-m", "engine.daemon"]], ids=["nf", "daemon"])
def test_agent_with_bad_config_names_the_file_and_field(tmp_path: Path, command: list[str]) -> None:
    """`nf agent` and the demo's lighter entry point (engine.daemon) fail the same way."""
    create(tmp_path, 2)
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(re.sub(r'(?m)^channel = "([0-9.]+):7780"', r'channel = "\1:99999"', cluster.read_text(), count=1))
    args = ("--config", str(tmp_path / "primary" / "node.toml"))
    if command[0] == "nf":
        proc = nf(*command[1:], *args, check=False)
    else:
        proc = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert str(cluster) in proc.stderr and "nodes[0].channel" in proc.stderr


def test_the_daemon_entry_point_has_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "engine.daemon", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--config" in proc.stdout


def test_status_without_agents_says_so_with_exit_code_3(tmp_path: Path) -> None:
    create(tmp_path, 2)
    proc = nf("status", "--config", str(tmp_path / "cluster.toml"), "--json", check=False)
    assert proc.returncode == 3
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "agent_unreachable" and "nf demo up" in error["hint"]


def test_status_with_a_missing_config_names_it(tmp_path: Path) -> None:
    proc = nf("status", "--config", str(tmp_path / "nope.toml"), "--json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "config_error"


def test_a_second_agent_for_a_running_node_refuses_and_leaves_the_first_serving(demo) -> None:  # type: ignore[no-untyped-def]
    from engine.client import request
    from engine.config import load_cluster, load_node

    demo.up(nodes=2)
    running = int((demo.workdir / "primary/agent.pid").read_text())
    second = nf("agent", "--config", str(demo.workdir / "primary/node.toml"), check=False, timeout=60)
    assert second.returncode == 1
    assert f"the agent of node primary is already running (pid {running}" in " ".join(second.stderr.split())
    node = load_node(demo.workdir / "primary/node.toml", load_cluster(demo.config))
    assert request(node.socket, "ping")["pid"] == running  # its management socket is still its own


def test_an_agent_whose_channel_address_is_taken_says_so_before_serving(tmp_path: Path) -> None:
    import socket

    from engine.config import load_cluster, load_node

    create(tmp_path, 2)
    cluster = load_cluster(tmp_path / "cluster.toml")
    me = cluster.node("primary")
    node = load_node(tmp_path / "primary/node.toml", cluster)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((me.channel_host, me.channel_port))
        squatter.listen()
        proc = nf("agent", "--config", str(tmp_path / "primary/node.toml"), check=False, timeout=60)
    assert proc.returncode == 1
    assert f"channel address {me.channel_host}:{me.channel_port}: Address already in use" in proc.stderr
    assert not node.socket.exists()  # nothing was served


def test_demo_counts_an_agent_started_by_hand_as_running(tmp_path: Path) -> None:
    from conftest import wait_for
    from engine.single import lock_holder

    create(tmp_path, 2)
    by_hand = subprocess.Popen([sys.executable, "-m", "nftui", "agent", "--config", str(tmp_path / "primary/node.toml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: lock_holder(tmp_path / "primary/state") == by_hand.pid, 30, "the hand-started agent's lock")
        assert nf("demo", "start", "--workdir", str(tmp_path), "primary").stdout.split() == \
            ["primary", "running", "(pid", f"{by_hand.pid})"]
        assert (tmp_path / "primary/agent.pid").read_text() == f"{by_hand.pid}\n"
        nf("demo", "up", "--workdir", str(tmp_path), "--nodes", "2", "--json")  # starts only the secondary
        assert "stopped: primary, secondary" in nf("demo", "down", "--workdir", str(tmp_path)).stdout
        assert by_hand.wait(timeout=30) == 0  # stopped cleanly by the demo, on SIGTERM
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
            by_hand.wait()
        nf("demo", "down", "--workdir", str(tmp_path), check=False)


def test_status_says_how_far_a_sync_has_come_and_how_long_it_has_left() -> None:
    from nftui.commands.status import _progress

    assert _progress({"percent": 42.04, "eta_seconds": 65.2}) == " 42%, 1m05s left"
    assert _progress({"percent": 97.0, "eta_seconds": 3.4}) == " 97%, 3s left"
    assert _progress({"percent": 0.0, "eta_seconds": None}) == " 0%"
    assert _progress(None) == ""
