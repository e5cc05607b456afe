"""The engine's client: how the CLI, the console and tests reach agents.

Given a cluster.toml, the client finds the node configs beside it (the same directory, or one
directory per node below it, as `nf init` and `nf demo` lay them out) and talks to each node's
management socket. `ask_any` returns the first agent that answers.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import NodeConfig, load_cluster, load_node
from engine.errors import AgentUnreachable, ApiError, ConfigError, NfError

DEFAULT_CONFIG = "/etc/nf/cluster.toml"

#: Long work on the active (`run_on_active`) is given up once the agent has not answered a
#: status request for this many seconds: it died, hung or was stopped.
SILENCE_LIMIT = 15.0


@dataclass(frozen=True)
class AgentAddress:
    node: str
    socket: Path


def cluster_path(config: str | os.PathLike[str] | None) -> Path:
    return Path(config or os.environ.get("NF_CONFIG") or DEFAULT_CONFIG)


def find_agents(config: str | os.PathLike[str] | None) -> list[AgentAddress]:
    path = cluster_path(config)
    cluster = load_cluster(path)
    found: list[AgentAddress] = []
    for candidate in [path.parent / "node.toml", *sorted(path.parent.glob("*/node.toml"))]:
        if candidate.exists():
            node: NodeConfig = load_node(candidate, cluster)
            found.append(AgentAddress(node.id, node.socket))
    if not found:
        raise ConfigError(str(path), "node.toml", "a node.toml beside the cluster config or in a node directory below it",
                          hint="run nf on a cluster node, or point --config at the cluster.toml nf init wrote")
    return found


def request(sock: Path, op: str, timeout: float = 30.0, **args: Any) -> Any:
    """One request to one agent; raises the agent's error as an NfError."""
    with Connection(sock, timeout) as conn:
        return conn.request(op, **args)


class Connection:
    """A kept connection to one agent, for callers that ask many times a second (a watch, a
    benchmark waiting for a sync): a new connection per request cost the agent about as much
    CPU again as the request itself. A connection the agent has closed is opened again once."""

    def __init__(self, sock: Path, timeout: float | None = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._s: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._s is not None:
            self._s.close()
            self._s, self._buf = None, b""

    def abort(self) -> None:
        """End a request another thread is waiting on (it raises AgentUnreachable)."""
        s = self._s
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def request(self, op: str, **args: Any) -> Any:
        """The agent's answer; raises its error as an NfError, AgentUnreachable when it is gone."""
        line = json.dumps({"op": op, **args}).encode() + b"\n"
        kept = self._s is not None
        try:
            answer = self._exchange(line)
        except AgentUnreachable:
            if not kept:
                raise
            answer = self._exchange(line)  # the agent closed the kept connection (a restart): once more
        if answer.get("ok"):
            return answer.get("result")
        err = answer.get("error") or {}
        raise ApiError(err.get("message", "request failed"), hint=err.get("hint", ""), code=err.get("code"))

    def _exchange(self, line: bytes) -> dict[str, Any]:
        if self._s is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.sock))
            except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
                s.close()
                raise AgentUnreachable(f"agent socket {self.sock}: {exc.strerror or exc}") from None
            self._s = s
        try:
            self._s.sendall(line)
            while b"\n" not in self._buf:
                chunk = self._s.recv(1 << 16)
                if not chunk:
                    raise AgentUnreachable(f"agent socket {self.sock} closed the connection")
                self._buf += chunk
        except TimeoutError:
            self.close()
            raise AgentUnreachable(f"agent at {self.sock} did not answer within {self.timeout or 0:g} s "
                                   "(stopped or overloaded?)",
                                   hint="nf status asks the next agent; check the agent's process and log") from None
        except (AgentUnreachable, ConnectionError):
            self.close()
            raise AgentUnreachable(f"agent socket {self.sock} closed the connection") from None
        answer, _, self._buf = self._buf.partition(b"\n")
        return json.loads(answer)


def ask_any(config: str | os.PathLike[str] | None, op: str, timeout: float = 5.0, **args: Any) -> Any:
    """Ask the first agent of the cluster that answers."""
    errors: list[str] = []
    for agent in find_agents(config):
        try:
            return request(agent.socket, op, timeout=timeout, **args)
        except AgentUnreachable as exc:
            errors.append(str(exc))
    raise AgentUnreachable("no agent of the cluster answered: " + "; ".join(errors),
                           hint="start the agents (nf agent --config NODE.toml, or nf demo up)")


def ask_all(config: str | os.PathLike[str] | None, op: str, timeout: float = 10.0, **args: Any) -> list[dict[str, Any]]:
    """Ask every agent of the cluster; a node that does not answer is {"node", "error"} in the list."""
    answers: list[dict[str, Any]] = []
    for agent in find_agents(config):
        try:
            answers.append(request(agent.socket, op, timeout=timeout, **args))
        except NfError as exc:
            answers.append({"node": agent.node, "error": exc.message})
    if not any("error" not in a for a in answers):
        raise AgentUnreachable("no agent of the cluster answered",
                               hint="start the agents (nf agent --config NODE.toml, or nf demo up)")
    return answers


def ask_active(config: str | os.PathLike[str] | None, op: str, timeout: float = 600.0, **args: Any) -> Any:
    """Ask the agent that is active; active-only work goes here."""
    return request(find_active(config).socket, op, timeout=timeout, **args)


def find_active(config: str | os.PathLike[str] | None) -> AgentAddress:
    """The agent of the cluster that says it is active."""
    errors: list[str] = []
    for agent in find_agents(config):
        try:
            status = request(agent.socket, "status", timeout=5)
        except AgentUnreachable as exc:
            errors.append(str(exc))
            continue
        if status.get("role") == "active":
            return agent
    raise AgentUnreachable("no active agent of the cluster answered" + (": " + "; ".join(errors) if errors else ""),
                           hint="nf status shows which node is active; run this on it")


def run_on_active(config: str | os.PathLike[str] | None, op: str, *,
                  on_status: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> Any:
    """Long work on the active (a verify of terabytes takes hours): the answer, however long it
    takes, as long as the agent keeps answering.

    The request waits without a time limit while the agent's status is asked twice a second on
    a second connection, and handed to `on_status` (a progress bar). An agent that dies ends
    the request at once; one that stops answering status for SILENCE_LIMIT seconds ends it with
    AgentUnreachable.
    """
    agent = find_active(config)
    work = Connection(agent.socket, timeout=None)
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["result"] = work.request(op, **args)
        except Exception as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=ask, name=f"nf-{op}", daemon=True)
    thread.start()
    heard = time.monotonic()
    with Connection(agent.socket, timeout=5.0) as watch:
        while thread.is_alive():
            thread.join(0.5)
            if not thread.is_alive():
                break
            try:
                status = watch.request("status")
            except AgentUnreachable:
                if time.monotonic() - heard > SILENCE_LIMIT:
                    work.abort()
                    raise AgentUnreachable(
                        f"the active agent ({agent.node}) stopped answering for {SILENCE_LIMIT:.0f} s during {op}",
                        hint="check the agent's process and log; nf status shows whether it is still active") from None
                continue
            heard = time.monotonic()
            if on_status is not None:
                on_status(status)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


__all__ = ["AgentAddress", "NfError", "ask_active", "ask_all", "ask_any", "cluster_path", "find_active", "find_agents",
           "request", "run_on_active"]
