"""The passive's receiver: where it commits its applied position in the receive queue.

Driven in-process on a real state database and replica (no channel): records are queued as
`on_recs` queues them, and each `_apply_batch` is one pass of the apply loop.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

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


def _queue(rx: Receiver, *records: tuple[str, dict[str, Any]]) -> None:
    first = rx.received_seq + 1
    rows = [(first + i, op, meta, b"", 0.0) for i, (op, meta) in enumerate(records)]
    _enqueue(rx.db, rows, first + len(rows) - 1)
    rx.received_seq = first + len(rows) - 1


def test_a_record_bringing_back_a_path_renamed_away_starts_a_new_batch(tmp_path: Path) -> None:
    """Committed at the rename, a crash cannot replay "rename a to b" after a new a exists."""
    rx, data = _receiver(tmp_path)
    (data / "a").mkdir()
    (data / "a/f").write_text("a's content")
    _queue(rx, ("rename", {"path": "srv/data/a", "dst": "srv/data/b"}),
           ("attr", {"path": "srv/data/b", "mode": 0o755, "mtime_ns": 0}),
           ("mkdir", {"path": "srv/data/a", "mode": 0o755, "mtime_ns": 0}))

    assert rx._apply_batch()
    assert rx.state.get_int("applied_seq") == 2  # the rename and the attr, not the mkdir
    assert not (data / "a").exists()
    assert rx._apply_batch()
    assert rx.state.get_int("applied_seq") == 3
    assert (data / "a").is_dir() and (data / "b/f").read_text() == "a's content"
    assert not rx._apply_batch()  # the queue is empty


def test_records_with_nothing_coming_back_commit_as_one_batch(tmp_path: Path) -> None:
    rx, data = _receiver(tmp_path)
    (data / "a").mkdir()
    _queue(rx, ("rename", {"path": "srv/data/a", "dst": "srv/data/b"}),
           ("mkdir", {"path": "srv/data/c", "mode": 0o755, "mtime_ns": 0}),
           ("delete", {"path": "srv/data/c"}))
    assert rx._apply_batch()
    assert rx.state.get_int("applied_seq") == 3


def test_a_sync_record_that_cannot_be_applied_is_reported_by_its_paths(tmp_path: Path, monkeypatch) -> None:
    rx, _ = _receiver(tmp_path)

    def disk_full(*args: Any, **kwargs: Any) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rx.applier, "apply", disk_full)
    files = [["srv/data/a", 1, 0o644, 0], ["srv/data/b", 1, 0o644, 0]]
    rx._apply_direct([(None, "files", {"files": files}, b"ab", 0.0)])
    assert rx.last_error == "sync files srv/data/a (and 1 more): [Errno 28] No space left on device"
