"""Shared test helpers: skip-or-fail for missing capabilities, polling, demo clusters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

REQUIRE_ALL = os.environ.get("NF_REQUIRE_ALL") == "1"
T = TypeVar("T")


def require(condition: bool, reason: str) -> None:
    """Skip on a laptop with a clear reason; fail in CI (NF_REQUIRE_ALL=1)."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"NF_REQUIRE_ALL=1 but: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (sysctl, network namespaces)")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll until predicate() is truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, AssertionError, KeyError, ValueError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval)


def nf(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a separate process."""
    proc = subprocess.run([sys.executable, "-m", "nftui", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"nf {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_kept_aside(config: Path, node: str, path: str, content: str) -> None:
    """`node` kept exactly one divergence, and in it `path` with `content` (written after the fork)."""
    listed = json.loads(nf("divergence", "list", "--config", str(config), "--json").stdout)
    kept = next(n for n in listed["nodes"] if n["node"] == node)["divergences"]
    assert len(kept) == 1, listed
    shown = json.loads(nf("divergence", "show", "--config", str(config), "--node", node, str(kept[0]["id"]),
                          "--json").stdout)
    entry = next(p for p in shown["paths"] if p["path"] == path)
    assert Path(entry["copy"]).read_text() == content


class Demo:
    """A demo cluster of real agent processes in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config = workdir / "cluster.toml"

    def data(self, node: str) -> Path:
        return self.workdir / node / "srv" / "data"

    def up(self, nodes: int = 3) -> dict[str, Any]:
        return json.loads(nf("demo", "up", "--workdir", str(self.workdir), "--nodes", str(nodes), "--json").stdout)

    def status(self) -> dict[str, Any]:
        return json.loads(nf("status", "--config", str(self.config), "--json").stdout)

    def node_status(self, node: str) -> dict[str, Any]:
        return next(n for n in self.status()["nodes"] if n["id"] == node)

    def kill(self, node: str) -> None:
        nf("demo", "kill", "--workdir", str(self.workdir), node)

    def start(self, node: str) -> None:
        nf("demo", "start", "--workdir", str(self.workdir), node)

    def down(self) -> None:
        nf("demo", "down", "--workdir", str(self.workdir), check=False)

    def events(self, node: str) -> list[dict[str, Any]]:
        from engine.client import request
        from engine.config import load_cluster, load_node

        cfg = load_node(self.workdir / node / "node.toml", load_cluster(self.config))
        return request(cfg.socket, "events", limit=1000)

    def wait_equal(self, timeout: float = 60.0, nodes: tuple[str, ...] = ("secondary", "tertiary")) -> None:
        src = self.data("primary")
        for node in nodes:
            if (self.workdir / node).exists():
                wait_for(lambda n=node: tree_diff(src, self.data(n)) == [], timeout,
                         f"{node}'s tree to equal the primary's: {tree_diff(src, self.data(node))[:5]}")


#: Each test's reports by phase ("setup", "call", "teardown"), for fixtures that act on a failure.
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


#: Lines of each agent's log shown when a test of a demo cluster fails.
LOG_TAIL = 60


@pytest.fixture
def demo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path / "demo")
    try:
        yield d
    finally:
        call = request.node.stash.get(_REPORTS, {}).get("call")
        if call is not None and call.failed:
            # CI keeps only what a failure prints: its temporary directory goes with the machine.
            for log in sorted(d.workdir.glob("*/agent.log")):
                lines = log.read_text(errors="replace").splitlines()
                print(f"--- {log.parent.name}: last {min(len(lines), LOG_TAIL)} of {len(lines)} lines of {log}")
                print("\n".join(lines[-LOG_TAIL:]))
        d.down()


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Content, mode, size, owner, symlink target and file mtime of every entry below root."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (dirpath == str(root) and d == ".nf-stage")]
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            owner = (st.st_uid, st.st_gid)
            if full.is_symlink():
                out[rel] = ("symlink", os.readlink(full), st.st_mtime_ns, owner)
            elif full.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, owner)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, st.st_size, st.st_mtime_ns, _digest(full), owner)
    return out


def tree_diff(a: Path, b: Path) -> list[str]:
    sa, sb = snapshot(a), snapshot(b)
    return sorted(p for p in set(sa) | set(sb) if sa.get(p) != sb.get(p))


def _digest(path: Path) -> str:
    """Content digest that ignores sparseness: holes and written zeros hash alike."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    chunk = 1 << 20
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            offset = start - start % chunk
            while offset < end:
                data = os.pread(fd, chunk, offset)
                if data.count(0) != len(data):
                    h.update(offset.to_bytes(8, "little") + data)
                offset += chunk
            pos = offset
    return h.hexdigest()
