"""The passive's receiver: where it commits its applied position in the receive queue.

Driven in-process on a real state database and replica (no channel): records are queued as
`on_recs` queues them, and each `_apply_batch` is one pass of the apply loop.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_cluster, load_node
from engine.init import NodePlan, init_cluster
from engine.replication import Receiver, _enqueue
from engine.state import State


def _receiver(tmp_path: Path) -> tuple[Receiver, Path]:
    cfg = init_cluster(tmp_path / "c", "demo", "app.test", ["127.0.0.9"], [
        NodePlan("primary", "127.0.0.9:7781", "127.0.0.9", tmp_path / "r1", tmp_path / "s1"),
        NodePlan("secondary", "127.0.0.9:7782", "127.0.0.9", tmp_path / "r2", tmp_path / "s2")])
    cluster = load_cluster(cfg)
    node = load_node(cfg.parent / "secondary" / "node.toml", cluster)
    data = node.root / "srv/data"
    data.mkdir(parents=True)
    return Receiver(State(node.state_dir), cluster, node, on_event=lambda *a, **k: None), data


def _queue(rx: Receiver, *records: tuple[Any, ...]) -> None:
    """Queue records, each (op, meta) or (op, meta, data), as received from the active."""
    first = rx.received_seq + 1
    rows = [(first + i, r[0], r[1], r[2] if len(r) > 2 else b"", 0.0) for i, r in enumerate(records)]
    _enqueue(rx.db, rows, first + len(rows) - 1)
    rx.received_seq = first + len(rows) - 1


def _commits(rx: Receiver, data: Path, monkeypatch) -> list[tuple[int, list[str]]]:
    """Every commit of the applied position from now on: the sequence, and the tree then."""
    seen: list[tuple[int, list[str]]] = []
    commit = rx._commit

    def spy(done_id: int, done_seq: int, journal_id: str | None) -> None:
        seen.append((done_seq, sorted(str(p.relative_to(data)) for p in data.rglob("*"))))
        commit(done_id, done_seq, journal_id)

    monkeypatch.setattr(rx, "_commit", spy)
    return seen


def test_a_record_bringing_back_a_path_renamed_away_is_applied_after_a_commit(tmp_path: Path, monkeypatch) -> None:
    """Committed at the rename, a crash cannot replay "rename a to b" after a new a exists."""
    rx, data = _receiver(tmp_path)
    (data / "a").mkdir()
    (data / "a/f").write_text("a's content")
    commits = _commits(rx, data, monkeypatch)
    _queue(rx, ("rename", {"path": "srv/data/a", "dst": "srv/data/b"}),
           ("attr", {"path": "srv/data/b", "mode": 0o755, "mtime_ns": 0}),
           ("mkdir", {"path": "srv/data/a", "mode": 0o755, "mtime_ns": 0}))

    assert rx._apply_batch()
    assert commits == [(2, ["b", "b/f"]), (3, ["a", "b", "b/f"])]  # the rename and the attr, then the mkdir
    assert rx.state.get_int("applied_seq") == 3
    assert (data / "b/f").read_text() == "a's content"
    assert not rx._apply_batch()  # the queue is empty


class Crash(Exception):
    """The agent dies: nothing after this point runs."""


NEW_LOG = {"path": "srv/data/log", "size": 3, "mode": 0o644, "mtime_ns": 0, "fresh": True}


@pytest.mark.parametrize("new_log", [
    [("file", {**NEW_LOG, "gid": None}, b"new")],
    # staged: the commit before the file record comes in the middle of its unit, after its data
    [("data", {"path": "srv/data/log", "gid": 7, "offset": 0, "fresh": True}, b"new"), ("file", {**NEW_LOG, "gid": 7})],
], ids=["whole", "staged"])
def test_a_passive_killed_before_its_commit_replays_log_rotation_without_losing_a_generation(
        tmp_path: Path, monkeypatch, new_log: list[tuple[Any, ...]]) -> None:
    rx, data = _receiver(tmp_path)
    for name in ("log", "log.1"):
        (data / name).write_text(f"{name} as it was")
    _queue(rx, ("rename", {"path": "srv/data/log.1", "dst": "srv/data/log.2"}),
           ("rename", {"path": "srv/data/log", "dst": "srv/data/log.1"}), *new_log)
    commit = rx._commit

    def crash_at_the_last(done_id: int, done_seq: int, journal_id: str | None) -> None:
        if done_seq == 2 + len(new_log):
            raise Crash
        commit(done_id, done_seq, journal_id)

    monkeypatch.setattr(rx, "_commit", crash_at_the_last)
    with pytest.raises(Crash):
        rx._apply_batch()
    restarted = Receiver(State(rx.node.state_dir), rx.cluster, rx.node, on_event=lambda *a, **k: None)
    assert restarted._apply_batch()  # the replay
    assert {p.name: p.read_text() for p in data.iterdir() if p.is_file()} == {
        "log": "new", "log.1": "log as it was", "log.2": "log.1 as it was"}


def test_records_with_nothing_coming_back_commit_as_one_batch(tmp_path: Path, monkeypatch) -> None:
    rx, data = _receiver(tmp_path)
    (data / "a").mkdir()
    commits = _commits(rx, data, monkeypatch)
    _queue(rx, ("rename", {"path": "srv/data/a", "dst": "srv/data/b"}),
           ("mkdir", {"path": "srv/data/c", "mode": 0o755, "mtime_ns": 0}),
           ("delete", {"path": "srv/data/c"}))
    assert rx._apply_batch()
    assert [seq for seq, _ in commits] == [3]
    assert rx.state.get_int("applied_seq") == 3


def test_a_sync_record_that_cannot_be_applied_is_reported_by_its_paths(tmp_path: Path, monkeypatch) -> None:
    rx, _ = _receiver(tmp_path)

    def disk_full(*args: Any, **kwargs: Any) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rx.applier, "apply", disk_full)
    files = [["srv/data/a", 1, 0o644, 0], ["srv/data/b", 1, 0o644, 0]]
    rx._apply_direct([(None, "files", {"files": files}, b"ab", 0.0)])
    assert rx.last_error == "sync files srv/data/a (and 1 more): [Errno 28] No space left on device"
