"""The CLI as operators and scripts meet it: help, exit codes, error shapes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import nf
from nftui.demo import create


@pytest.mark.parametrize("args", [[], ["agent"], ["init"], ["status"], ["verify"], ["demo"], ["demo", "up"],
                                  ["demo", "down"], ["demo", "kill"], ["demo", "start"], ["why"], ["failover"], ["switchover"]])
def test_every_command_has_help(args: list[str]) -> None:
    out = nf(*args, "--help").stdout
    assert "Usage" in out and "--help" in out


def test_agent_with_bad_config_names_the_file_and_field(tmp_path: Path) -> None:
    create(tmp_path, 2)
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(re.sub(r'(?m)^channel = "([0-9.]+):7780"', r'channel = "\1:99999"', cluster.read_text(), count=1))
    proc = nf("agent", "--config", str(tmp_path / "primary" / "node.toml"), check=False)
    assert proc.returncode == 1
    assert str(cluster) in proc.stderr and "nodes[0].channel" in proc.stderr


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
