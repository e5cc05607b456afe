"""The local demo cluster: real agents as background processes on loopback addresses.

Layout under the work directory: `cluster.toml`, and per node `ID/node.toml`, `ID/tls/`,
`ID/state/`, `ID/agent.pid`, `ID/agent.log`, with the node's root prefix at `ID/` so the
protected set `/srv/data` of the primary is `ID/srv/data`. Addresses come from one /24 in
127.0.0.0/8 derived from the work directory, so two demos on one machine do not collide.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import client
from engine.errors import AgentUnreachable, NfError
from engine.single import lock_holder

NODE_IDS = ("primary", "secondary", "tertiary")
START_TIMEOUT = 60.0
#: How the demo runs an agent: `nf agent` without the console's imports (see engine.daemon).
AGENT = (sys.executable, "-m", "engine.daemon")

# Agents this process started; their exit is seen through the Popen handle, without a pid race.
_started: dict[str, subprocess.Popen[bytes]] = {}
STOP_TIMEOUT = 30.0


class DemoError(NfError):
    code = "demo_error"


def subnet(workdir: Path) -> str:
    digest = hashlib.sha256(str(workdir.resolve()).encode()).digest()
    return f"127.{100 + digest[0] % 100}.{digest[1] % 250 + 1}"


def create(workdir: Path, nodes: int) -> Path:
    # Imported here: it loads cryptography, which every `nf` start (the agent's too) would pay for.
    from engine.init import NodePlan, init_cluster

    net = subnet(workdir)
    plans = [
        NodePlan(id=node_id, channel=f"{net}.{10 + i}:7780", management=f"{net}.{10 + i}",
                 root=workdir / node_id, state_dir=workdir / node_id / "state")
        for i, node_id in enumerate(NODE_IDS[:nodes])
    ]
    return init_cluster(workdir, "demo", "app01.nf.test", [f"{net}.1"], plans, protected=["/srv/data"],
                        provider="local", netbios="APP01")


def node_ids(workdir: Path) -> list[str]:
    return [n for n in NODE_IDS if (workdir / n / "node.toml").exists()]


def pid_of(workdir: Path, node: str) -> int | None:
    """The agent's pid if that process is alive and is an nf agent: the one the demo started,
    or one started by hand (`nf agent`), found by the node lock it holds."""
    try:
        pid = int((workdir / node / "agent.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        pid = None
    if pid is None or not _is_agent(pid):
        pid = lock_holder(workdir / node / "state")
    return pid


def _is_agent(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return b"engine.daemon" in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(workdir: Path, node: str) -> int:
    if node not in node_ids(workdir):
        raise DemoError(f"node {node!r} is not part of the demo in {workdir}",
                        hint=f"nodes here: {', '.join(node_ids(workdir)) or 'none (run nf demo up)'}")
    pid = pid_of(workdir, node)
    if pid is not None:
        (workdir / node / "agent.pid").write_text(f"{pid}\n")  # also for one started by hand
        return pid
    log = open(workdir / node / "agent.log", "ab")
    proc = subprocess.Popen(
        [*AGENT, "--config", str(workdir / node / "node.toml")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    _started[node] = proc
    (workdir / node / "agent.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def stop(workdir: Path, node: str, sig: signal.Signals = signal.SIGTERM) -> bool:
    pid = pid_of(workdir, node)
    if pid is None:
        (workdir / node / "agent.pid").unlink(missing_ok=True)
        return False
    os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_of(workdir, node) is not None:
        _reap(pid)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT
        time.sleep(0.02)
    (workdir / node / "agent.pid").unlink(missing_ok=True)
    return True


def wait_connected(workdir: Path, timeout: float = START_TIMEOUT,
                   tick: Callable[[dict[str, Any] | None], None] | None = None) -> dict[str, Any]:
    """Poll the agents until every node of the demo is connected; return that status."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            last = client.ask_any(workdir / "cluster.toml", "status", timeout=5)
        except AgentUnreachable:
            last = None
        if tick:
            tick(last)
        if last and all(n["connected"] and n["role"] != "unknown" for n in last["nodes"]):
            return last
        for node, proc in _started.items():
            if proc.poll() is not None:
                raise DemoError(f"agent {node} exited with code {proc.returncode} during start-up",
                                hint=f"see {workdir / node / 'agent.log'}")
        time.sleep(0.1)
    raise DemoError(f"the demo cluster did not connect within {timeout:.0f} s",
                    hint=f"see the agent logs under {workdir}")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
