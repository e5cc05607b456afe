"""`nf verify` on a tree that takes long to hash: its progress, one at a time, and what ends it.

A passive frozen with SIGSTOP stands for one that is still hashing terabytes: it answers its
manifest request only once it is let go, so each state below lasts as long as the test needs.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import Demo, nf, wait_for
from engine.client import request
from engine.config import load_cluster, load_node
from engine.replication import PeerProgress, SyncProgress
from engine.verify import wait_applied


def _status(demo: Demo, node: str = "primary") -> dict[str, Any]:
    cfg = load_node(demo.workdir / node / "node.toml", load_cluster(demo.config))
    return request(cfg.socket, "status", timeout=5)


def _pid(demo: Demo, node: str) -> int:
    return int((demo.workdir / node / "agent.pid").read_text())


@contextmanager
def _frozen(demo: Demo, node: str) -> Iterator[None]:
    pid = _pid(demo, node)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _verify_in_background(demo: Demo) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "nftui", "verify", "--config", str(demo.config), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listing(demo: Demo) -> dict[str, Any]:
    """The active's verify progress once it waits on the secondary's listing."""
    def listing() -> dict[str, Any] | None:
        v = _status(demo).get("verify")
        return v if v and v["step"] == "listing" else None
    return wait_for(listing, 30, "the verify to wait on the secondary's listing")


def _up(demo: Demo) -> None:
    demo.up(nodes=2)
    (demo.data("primary") / "a").write_bytes(os.urandom(300_000))
    (demo.data("primary") / "b").write_text("b")
    demo.wait_equal(60, nodes=("secondary",))

    def level() -> bool:  # equal trees may still await the sync's level record, which a frozen passive holds up
        primary, secondary = _status(demo)["nodes"]
        return secondary["applied_seq"] == primary["applied_seq"] and secondary["sync"] is None
    wait_for(level, 60, "the secondary to be level")


def test_a_verify_shows_how_far_it_has_come_and_a_second_one_waits_its_turn(demo: Demo) -> None:
    _up(demo)
    with _frozen(demo, "secondary"):
        first = _verify_in_background(demo)
        v = _listing(demo)
        assert (v["node"], v["files"], v["bytes"], v["listed_bytes"]) == ("secondary", 2, 300_001, 0)
        shown = nf("status", "--config", str(demo.config)).stdout
        assert "verify running" in shown and "listing secondary, 0 B of 293.0 KiB hashed" in shown, shown
        second = nf("verify", "--config", str(demo.config), "--json", check=False)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "already running" in json.loads(second.stdout)["error"]["message"]
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    assert json.loads(out)["equal"] is True
    assert _status(demo)["verify"] is None


def test_a_verify_gives_up_on_a_passive_that_stops_answering(demo: Demo) -> None:
    _up(demo)
    with _frozen(demo, "secondary"):
        done = nf("verify", "--config", str(demo.config), "--json", check=False, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    [node] = json.loads(done.stdout)["nodes"]
    assert not node["checked"] and "secondary stopped answering" in node["error"], node


def test_a_verify_whose_operator_gives_up_stops_in_the_agent(demo: Demo) -> None:
    _up(demo)
    with _frozen(demo, "secondary"):
        cli = _verify_in_background(demo)
        _listing(demo)
        cli.send_signal(signal.SIGINT)  # Ctrl-C
        cli.communicate(timeout=30)
        wait_for(lambda: _status(demo)["verify"] is None, 30, "the agent to cancel the verify")
    again = nf("verify", "--config", str(demo.config), "--json")
    assert json.loads(again.stdout)["equal"] is True


def test_nf_verify_ends_when_the_active_hangs_under_it(demo: Demo) -> None:
    _up(demo)
    with _frozen(demo, "secondary"):
        cli = _verify_in_background(demo)
        _listing(demo)
        with _frozen(demo, "primary"):  # status goes unanswered
            out, err = cli.communicate(timeout=90)
    assert cli.returncode == 3, out + err
    assert "stopped answering" in json.loads(out)["error"]["message"]


def test_nf_verify_ends_when_the_active_dies_under_it(demo: Demo) -> None:
    _up(demo)
    with _frozen(demo, "secondary"):
        cli = _verify_in_background(demo)
        _listing(demo)
        demo.kill("primary")  # the request's connection closes
        out, err = cli.communicate(timeout=30)
    assert cli.returncode == 3, out + err
    assert "closed the connection" in json.loads(out)["error"]["message"]


def _syncing(eta_seconds: float) -> Any:
    """A stand-in agent whose secondary is a tenth of the way through a sync that has run for
    `eta_seconds / 9` seconds (so `eta_seconds` are left)."""
    sync = SyncProgress("initial sync", paths=1, started=time.monotonic() - eta_seconds / 9)
    sync.group_paths, sync.group_bytes, sync.group_sent = 1, 1000, 100
    return SimpleNamespace(progress={"secondary": PeerProgress("secondary", sync=sync)},
                           senders={"secondary": object()})


def test_a_passive_whose_sync_outlasts_the_wait_is_given_up_on_at_once_with_how_far_it_is() -> None:
    """A verify (or switchover) of a passive in a long initial sync waited out its two minutes
    and then said only that the passive had not applied the journal."""
    async def story() -> None:
        async with asyncio.timeout(5):
            await wait_applied(_syncing(540), "secondary", 7)

    with pytest.raises(TimeoutError, match=r"^secondary is in its initial sync \(10 % done, about 54\d s left\): "
                                           r"try again once nf status shows it level$"):
        asyncio.run(story())


def test_a_passive_whose_sync_ends_soon_is_waited_for() -> None:
    async def story() -> None:
        agent = _syncing(2)
        waiting = asyncio.ensure_future(wait_applied(agent, "secondary", 7))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        progress = agent.progress["secondary"]
        progress.sync, progress.acked_applied = None, 7  # level
        async with asyncio.timeout(5):
            await waiting

    asyncio.run(story())
