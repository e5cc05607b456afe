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
