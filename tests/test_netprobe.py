"""Public network probes: what counts as an answer, bad targets, and self-isolation on a real demo."""
from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import Iterator

import pytest

from conftest import Demo, require, require_root, wait_for
from engine.netprobe import Target, parse_target, probe_all
from netbed import ip


@pytest.mark.parametrize("text, target", [
    ("tcp:192.0.2.1:53", Target("tcp", "192.0.2.1", 53)),
    ("tcp:[2001:db8::1]:443", Target("tcp", "2001:db8::1", 443)),
    ("icmp:192.0.2.254", Target("icmp", "192.0.2.254")),
])
def test_targets_parse_and_print_back(text: str, target: Target) -> None:
    assert parse_target(text) == target
    assert str(target) == text


@pytest.mark.parametrize("text, message", [
    ("udp:192.0.2.1:53", "expected tcp:HOST:PORT or icmp:HOST"),
    ("tcp:192.0.2.1", "expected tcp:HOST:PORT"),
    ("tcp:192.0.2.1:70000", "port 1..65535"),
    ("icmp:gateway.example", "expected an IP address"),
])
def test_bad_targets_say_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_target(text)


def test_a_listening_port_and_a_refusing_one_both_answer() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        open_port = listener.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]  # bound, never listening: the kernel refuses
        answers = asyncio.run(probe_all((Target("tcp", "127.0.0.1", open_port),
                                         Target("tcp", "127.0.0.1", closed_port)), timeout=0.5))
    assert list(answers.values()) == [True, True]


def test_an_unreachable_target_does_not_answer(unreachable: str) -> None:
    answers = asyncio.run(probe_all((Target("tcp", unreachable, 9), Target("icmp", unreachable)), timeout=0.5))
    assert list(answers.values()) == [False, False]


def test_icmp_echo_of_loopback_answers() -> None:
    require_root()
    answers = asyncio.run(probe_all((Target("icmp", "127.0.0.1"),), timeout=2.0))
    assert answers == {Target("icmp", "127.0.0.1"): True}


def test_bad_probe_in_cluster_toml_names_the_field(tmp_path) -> None:
    from nftui.demo import create
    from engine.config import load_cluster
    from engine.errors import ConfigError

    create(tmp_path, 2)
    config = tmp_path / "cluster.toml"
    config.write_text(re.sub(r"(?m)^\[heartbeat\].*$", '[heartbeat]\nprobes = ["tcp:10.0.0.1:53", "ping:10.0.0.1"]',
                             config.read_text()))
    with pytest.raises(ConfigError) as err:
        load_cluster(config)
    assert "heartbeat.probes[1]" in str(err.value)
    assert "expected tcp:HOST:PORT or icmp:HOST" in str(err.value)


@pytest.fixture
def unreachable() -> Iterator[str]:
    """An address with an `unreachable` route: nothing answers it, whatever the machine's uplink does
    (a sandbox's default route may accept every TCP connection)."""
    require_root()
    address = "198.18.0.2"
    ip("route", "add", "unreachable", f"{address}/32")
    try:
        yield address
    finally:
        subprocess.run(["ip", "route", "del", "unreachable", f"{address}/32"], capture_output=True)


def test_an_active_cut_from_its_peers_and_the_public_network_demotes_itself(demo: Demo) -> None:
    """Self-isolation: peers silent and no probe answering means we are the one cut off."""
    require_root()
    require(subprocess.run(["ip", "-V"], capture_output=True).returncode == 0, "needs iproute2 (ip)")
    from nftui.demo import create

    gateway = "198.18.0.1"  # a stand-in gateway on a link the test controls
    ip("link", "add", "nfprobe0", "type", "veth", "peer", "name", "nfprobe1")
    try:
        ip("addr", "add", f"{gateway}/32", "dev", "nfprobe0")
        ip("link", "set", "nfprobe0", "up")
        demo.workdir.mkdir(parents=True)
        create(demo.workdir, 2)
        demo.config.write_text(re.sub(r"(?m)^\[heartbeat\].*$", f'[heartbeat]\nprobes = ["tcp:{gateway}:9"]',
                                      demo.config.read_text()))
        demo.up(nodes=2)
        wait_for(lambda: demo.status()["public_ok"] is True, 20, "the active to reach the public network")
        demo.kill("secondary")
        wait_for(lambda: any(e["kind"] == "decision" and "peers silent but the public network answers"
                             in e["message"] for e in demo.events("primary")), 20,
                 "the active to hold on while the public network answers")
        assert demo.node_status("primary")["role"] == "active"
        ip("addr", "del", f"{gateway}/32", "dev", "nfprobe0")  # the public network goes away too
        ip("route", "add", "unreachable", f"{gateway}/32")
        wait_for(lambda: demo.node_status("primary")["role"] == "passive", 20, "the isolated active to demote")
        kinds = [e["kind"] for e in demo.events("primary")]
        assert "public_network_down" in kinds
        assert any("self-isolation" in e["message"] for e in demo.events("primary"))
    finally:
        subprocess.run(["ip", "route", "del", "unreachable", f"{gateway}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", "nfprobe0"], capture_output=True)
