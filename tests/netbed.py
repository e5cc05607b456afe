"""The failover testbed: one network namespace per node, a bridge for the public network, a
separate link for the channel, and a client namespace that probes a small HTTP service on the
public address.

    client 10.77.0.100 ─┐
    primary eth0 .11 ───┼── br0 (in the switch namespace)   public 10.77.0.50 moves between nodes
    secondary eth0 .12 ─┘
    primary ch0 10.78.0.1 ──── secondary ch0 10.78.0.2       the channel, a link of its own

Agents run in their node's namespace inside a UTS namespace of their own (`unshare --uts`), so
the `linux` provider may add and remove the public address and set host names without touching
the machine's. Everything is removed again by `down`.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from conftest import wait_for
from engine.init import NodePlan, init_cluster

PUBLIC = "10.77.0.50"
PORT = 8080
NODES = {"primary": ("10.77.0.11", "10.78.0.1"), "secondary": ("10.77.0.12", "10.78.0.2")}
CLIENT = "10.77.0.100"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class NetBed:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = uuid.uuid4().hex[:6]
        self.ns = {name: f"nf{self.tag}-{name}" for name in ("switch", *NODES, "client")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.config = workdir / "cluster.toml"

    # -- network ----------------------------------------------------------------------
    def up(self) -> None:
        for ns in self.ns.values():
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        sw = self.ns["switch"]
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        hosts = {name: addr for name, (addr, _) in NODES.items()} | {"client": CLIENT}
        for i, (name, addr) in enumerate(hosts.items()):
            ns = self.ns[name]
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", sw)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", sw, "link", "set", f"p{i}", "master", "br0")
            ip("-n", sw, "link", "set", f"p{i}", "up")
        a, b = NODES
        ip("link", "add", "ch0", "netns", self.ns[a], "type", "veth", "peer", "name", "ch0", "netns", self.ns[b])
        for name, (_, channel) in NODES.items():
            ip("-n", self.ns[name], "addr", "add", f"{channel}/30", "dev", "ch0")
            ip("-n", self.ns[name], "link", "set", "ch0", "up")

    def down(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        for ns in self.ns.values():
            for pid in ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", ns, check=False)

    def isolate(self, node: str) -> None:
        """Cut a node from everything (public network and channel); its processes keep running."""
        for link in ("eth0", "ch0"):
            ip("-n", self.ns[node], "link", "set", link, "down")

    def rejoin(self, node: str) -> None:
        for link in ("eth0", "ch0"):
            ip("-n", self.ns[node], "link", "set", link, "up")

    def cut_channel(self) -> None:
        ip("-n", self.ns["primary"], "link", "set", "ch0", "down")

    def heal_channel(self) -> None:
        ip("-n", self.ns["primary"], "link", "set", "ch0", "up")

    # -- cluster ----------------------------------------------------------------------
    def create(self, heartbeat: str = "", restarts: int = 3, extra: str = "") -> None:
        """nf init for the testbed, an HTTP service as the protected application; `heartbeat`
        holds extra [heartbeat] settings and `extra` more tables (TOML lines).

        The service's monitor fails when its process is gone (a zombie counts as gone: who reaps
        it differs between machines) or when a file `broken-NODE` exists in the workdir."""
        plans = [NodePlan(name, f"{channel}:7780", addr, self.workdir / name, self.workdir / name / "state")
                 for name, (addr, channel) in NODES.items()]
        init_cluster(self.workdir, "bed", "app.bed.test", [f"{PUBLIC}/24"], plans, provider="linux")
        serve = (f"setsid {sys.executable} -m http.server {PORT} --bind {PUBLIC} "
                 f"--directory {self.workdir}/$NF_NODE/srv/data >/dev/null 2>&1 < /dev/null & "
                 f"echo $! > {self.workdir}/$NF_NODE/http.pid")
        with self.config.open("a") as fh:
            fh.write(f"""
[[applications]]
name = "web"
start = "{serve}"
stop = "kill $(cat {self.workdir}/$NF_NODE/http.pid)"
monitor = "test ! -f {self.workdir}/broken-$NF_NODE && grep -q '^State:.*[RSD]' /proc/$(cat {self.workdir}/$NF_NODE/http.pid)/status"
monitor_interval = 0.5
timeout = 10
restarts = {restarts}
{extra}""")
        if heartbeat:
            text = self.config.read_text()
            self.config.write_text(re.sub(r"(?m)^\[heartbeat\].*$", "[heartbeat]\n" + heartbeat, text))
        for name in NODES:
            (self.workdir / name / "srv" / "data").mkdir(parents=True, exist_ok=True)

    def data(self, node: str) -> Path:
        return self.workdir / node / "srv" / "data"

    def start(self, node: str) -> None:
        log = open(self.workdir / node / "agent.log", "ab")
        self.procs[node] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[node], "unshare", "--uts", "--",
             sys.executable, "-m", "nftui", "agent", "--config", str(self.workdir / node / "node.toml")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def kill(self, node: str, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.procs.pop(node, None) if sig == signal.SIGKILL else self.procs.get(node)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig == signal.SIGKILL:
                proc.wait(timeout=10)

    def crash(self, node: str) -> None:
        """The node dies: every process in its namespace is killed and its links go dark."""
        self.kill(node)
        for pid in ip("netns", "pids", self.ns[node], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("-n", self.ns[node], "link", "set", "eth0", "down")
        ip("-n", self.ns[node], "link", "set", "ch0", "down")

    def status(self, node: str) -> dict:
        return self._request(node, "status")

    def events(self, node: str, limit: int = 200) -> list[dict]:
        return self._request(node, "events", limit=limit)

    def _request(self, node: str, op: str, **args: object) -> Any:
        from engine.client import request
        from engine.config import load_cluster, load_node

        cfg = load_node(self.workdir / node / "node.toml", load_cluster(self.config))
        return request(cfg.socket, op, timeout=5, **args)

    def role(self, node: str) -> str | None:
        try:
            return self.status(node)["role"]
        except Exception:
            return None

    # -- the client -------------------------------------------------------------------
    def fetch(self, path: str, timeout: float = 1.0) -> str | None:
        """GET http://PUBLIC:PORT/path from the client namespace; None when it fails."""
        code = (f"import urllib.request,sys;"
                f"sys.stdout.write(urllib.request.urlopen('http://{PUBLIC}:{PORT}/{path}',timeout={timeout}).read().decode())")
        proc = subprocess.run(["ip", "netns", "exec", self.ns["client"], sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=timeout + 10)
        return proc.stdout if proc.returncode == 0 else None

    def wait_serving(self, path: str, expect: str, timeout: float = 30.0) -> float:
        """Poll the client until it reads `expect`; returns when it first did."""
        wait_for(lambda: self.fetch(path) == expect, timeout, f"the client to read {path} on {PUBLIC}")
        return time.monotonic()
