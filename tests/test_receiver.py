"""The passive's receiver: where it commits its applied position in the receive queue.

Driven in-process on a real state database and replica (no channel): records are queued as
`on_recs` queues them, and each `_apply_batch` is one pass of the apply loop.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_cluster, load_node
from engine.init import NodePlan, init_cluster
from engine.errors import NfError, ProtocolError
from engine.blocks import hash_file
from engine.protocol import Codec, Message
from engine.replication import (FEATURES, MANIFEST_PATHS, MANIFEST_PATHS_BYTES, Listing, ManifestWaiter, Receiver,
                                _enqueue, manifest_groups)
from engine.state import State


def _receiver(tmp_path: Path, replication: str = "") -> tuple[Receiver, Path]:
    cfg = init_cluster(tmp_path / "c", "demo", "app.test", ["127.0.0.9"], [
        NodePlan("primary", "127.0.0.9:7781", "127.0.0.9", tmp_path / "r1", tmp_path / "s1"),
        NodePlan("secondary", "127.0.0.9:7782", "127.0.0.9", tmp_path / "r2", tmp_path / "s2")])
    if replication:
        cfg.write_text(re.sub(r"(?m)^\[replication\].*$", "[replication]\n" + replication, cfg.read_text()))
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

    def spy(done_id: int, done_seq: int, level: Any) -> None:
        seen.append((done_seq, sorted(str(p.relative_to(data)) for p in data.rglob("*"))))
        commit(done_id, done_seq, level)

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

    def crash_at_the_last(done_id: int, done_seq: int, level: Any) -> None:
        if done_seq == 2 + len(new_log):
            raise Crash
        commit(done_id, done_seq, level)

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


class _Loopback:
    """A link whose messages go straight to the active's ManifestWaiter, checked against the
    frame limit on the way as the channel checks them."""

    def __init__(self, waiter: ManifestWaiter, rx: Receiver | None = None, features: tuple[str, ...] = FEATURES) -> None:
        self.waiter = waiter
        self.codec = Codec(max_frame=rx.cluster.replication.max_frame_bytes if rx else 1 << 20)
        self.hello = {"features": list(features)}
        self.largest = 0

    async def send(self, type_: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> None:
        frame = b"".join(self.codec.frame(type_, 1, fields, [payload]))
        self.largest = max(self.largest, len(frame))
        self.waiter.on_message(self.codec.decode_body(frame[4:]))


class _Link:
    """A link to the active that takes the passive's acks and does nothing with them."""

    closed = False

    async def send(self, type_: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> None:
        pass


def _ask_entries(rx: Receiver, features: tuple[str, ...] = FEATURES, **fields: Any) -> tuple[Listing, _Loopback]:
    async def go() -> tuple[Listing, _Loopback]:
        waiter = ManifestWaiter()
        rid, answer = waiter.new()
        link = _Loopback(waiter, rx, features)
        rx.on_manifest_req(link, Message("manifest_req", 1, {"id": rid, "kept": True, **fields}))
        return await asyncio.wait_for(answer, 30), link
    return asyncio.run(go())


def _ask(rx: Receiver, **fields: Any) -> tuple[list[str], list[str]]:
    """A manifest_req with these fields, answered: the paths listed, and those kept aside."""
    (listed, kept), _ = _ask_entries(rx, **fields)
    return [e.path for e in listed], [e.path for e in kept]


def test_one_manifest_request_lists_every_path_it_names(tmp_path: Path) -> None:
    rx, data = _receiver(tmp_path)
    (data / "a/deep").mkdir(parents=True)
    (data / "a/deep/f").write_text("f")
    (data / "b").write_text("b")
    (data / "c").write_text("not asked for")
    listed, kept = _ask(rx, paths=["srv/data/a", "srv/data/b", "srv/data/gone"])
    assert sorted(listed) == ["srv/data/a", "srv/data/a/deep", "srv/data/a/deep/f", "srv/data/b"]
    assert kept == []
    assert _ask(rx, path="srv/data/b") == (["srv/data/b"], [])  # as an active of an older version asks


def test_a_manifest_request_naming_a_path_outside_the_trees_is_answered_with_an_error(tmp_path: Path) -> None:
    rx, _ = _receiver(tmp_path)
    with pytest.raises(NfError, match="peer could not list its tree: .*etc/passwd"):
        _ask(rx, paths=["srv/data", "etc/passwd"])


@pytest.mark.parametrize("paths", [[], ["srv/data/a", 7], "srv/data/a", ["srv/data/f"] * (MANIFEST_PATHS + 1)])
def test_a_malformed_manifest_request_is_refused_naming_the_field(tmp_path: Path, paths: Any) -> None:
    rx, _ = _receiver(tmp_path)
    with pytest.raises(ProtocolError, match="manifest_req.paths: expected"):
        rx.on_manifest_req(_Loopback(ManifestWaiter()), Message("manifest_req", 1, {"id": 1, "paths": paths}))


def test_manifest_requests_name_many_paths_only_for_a_passive_that_knows_how() -> None:
    paths = [f"srv/data/d{i:05d}" for i in range(2500)]
    assert [len(g) for g in manifest_groups(paths, batched=True)] == [MANIFEST_PATHS, MANIFEST_PATHS, 500]
    assert [g for g in manifest_groups(paths, batched=False)] == [[p] for p in paths]
    long = ["srv/data/" + f"{i:03d}" + "x" * 3000 for i in range(200)]  # a few thousand bytes each
    groups = list(manifest_groups(long, batched=True))
    assert [p for g in groups for p in g] == long
    assert len(groups) > 1 and all(sum(len(p) + 3 for p in g) <= MANIFEST_PATHS_BYTES for g in groups)


def test_a_file_whose_block_hashes_pass_a_frame_is_listed_in_parts(tmp_path: Path) -> None:
    """At 8 KiB blocks the hashes take 1/256 of a file's size in hex: this 1 GiB file's take
    4 MiB, more than the smallest frame (1 MiB, and its header) can carry."""
    rx, data = _receiver(tmp_path, "max_frame_bytes = 1048576")
    big = data / "big.img"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
        for off in range(0, 1 << 30, 64 << 20):
            f.seek(off)
            f.write(os.urandom(8192))
    (data / "small").write_text("after it")
    (listed, _), link = _ask_entries(rx, path="srv/data")
    entries = {e.path: e for e in listed}
    assert entries["srv/data/big.img"].hashes == hash_file(big, 8192)
    assert entries["srv/data/small"].hashes == hash_file(data / "small", 8192)
    assert link.largest <= 1 << 20

    # An active of an older version cannot read the parts: the answer says why instead.
    with pytest.raises(NfError, match="srv/data/big.img: its block hashes take .* upgrade the active"):
        _ask_entries(rx, features=("manifest_paths",), path="srv/data")


@pytest.mark.parametrize("items", [
    [{"path": "srv/data/f", "more": "00" * 16}],  # nothing before it
    [{"path": "srv/data/f", "kind": "file", "mode": 420, "hashes": "00" * 16}, {"path": "srv/data/g", "more": "00" * 16}],
    [{"path": "srv/data/f", "kind": "file", "mode": 420, "hashes": "00" * 16}, {"path": "srv/data/f", "more": "0"}],
])
def test_more_hashes_are_taken_only_right_after_their_file(items: list[Any]) -> None:
    async def go() -> None:
        waiter = ManifestWaiter()
        rid, _ = waiter.new()
        waiter.on_message(Message("manifest", 1, {"id": rid}, json.dumps(items).encode()))
    with pytest.raises(ProtocolError, match="manifest.more: expected"):
        asyncio.run(go())


def test_a_syncs_progress_counts_groups_of_paths_and_the_file_data_shipped_for_the_current_one() -> None:
    from engine.manifest import Entry
    from engine.replication import SyncProgress
    from engine.sync import Difference

    def file(path: str, size: int, kind: str = "missing") -> Difference:
        return Difference(path, kind, Entry(path, "file", 0o644, size), None)

    p = SyncProgress("dirty-path resync", paths=4, started=100.0)
    assert p.to_json(now=101.0) == {"reason": "dirty-path resync", "paths": 4, "paths_done": 0, "bytes_sent": 0,
                                    "percent": 0.0, "eta_seconds": None}
    # Two paths in the first group: 1,000 bytes to send; a mode change and a delete ship none.
    p.start_group(2, [file("a", 600), file("b", 400, "content"), file("c", 50, "mode"),
                      Difference("d", "extra", None, Entry("d", "file", 0o644, 9))])
    p.shipped(500)
    assert p.to_json(now=110.0)["percent"] == 25.0  # half of half the paths
    assert p.to_json(now=110.0)["eta_seconds"] == 30.0  # 10 s for a quarter
    p.shipped(700)  # a delta may ship less than the file, never more than the bound counts
    p.end_group()
    assert p.to_json(now=120.0) == {"reason": "dirty-path resync", "paths": 4, "paths_done": 2,
                                    "bytes_sent": 1200, "percent": 50.0, "eta_seconds": 20.0}
    p.start_group(2, [])  # directories only: done once shipped
    assert p.fraction() == 0.5
    p.end_group()
    assert p.to_json(now=130.0)["percent"] == 100.0 and p.to_json(now=130.0)["eta_seconds"] == 0.0


def test_a_manifest_asked_with_progress_says_how_far_the_listing_has_come(tmp_path: Path, monkeypatch) -> None:
    """A verify of terabytes waits an hour on the passive's listing: the operator sees it move."""
    from engine import replication

    rx, data = _receiver(tmp_path)
    for i in range(300):
        (data / f"f{i}").write_bytes(b"x" * 1000)
    monkeypatch.setattr(replication, "PROGRESS_INTERVAL", 0)  # a report at every turn of the loop

    def ask(fields: dict[str, Any]) -> tuple[int, Listing, list[tuple[int, int, int]]]:
        seen: list[tuple[int, int, int]] = []

        async def go() -> tuple[int, Listing]:
            waiter = ManifestWaiter()
            rid, answer = waiter.new(on_progress=lambda *report: seen.append(report))
            rx.on_manifest_req(_Loopback(waiter, rx), Message("manifest_req", 1, {"id": rid, **fields}))
            return rid, await asyncio.wait_for(answer, 30)
        rid, listing = asyncio.run(go())
        return rid, listing, seen

    rid, (listed, _), seen = ask({"path": "srv/data", "progress": True})
    assert len([e for e in listed if e.kind == "file"]) == 300
    assert seen and {r for r, _, _ in seen} == {rid}
    counts = [(files, nbytes) for _, files, nbytes in seen]
    assert counts == sorted(counts) and all(nbytes == 1000 * files <= 300_000 for files, nbytes in counts), counts
    _, _, unasked = ask({"path": "srv/data"})  # an active of an older version does not ask
    assert unasked == []


@pytest.mark.parametrize("fields, error", [
    ({"files": -1, "bytes": 0}, "manifest_progress: expected counts of 0 or more"),
    ({"files": 1, "bytes": "many"}, "manifest_progress.bytes: expected int"),
    ({"files": 1}, "manifest_progress.bytes: missing"),
])
def test_a_progress_report_that_makes_no_sense_is_refused(fields: dict[str, Any], error: str) -> None:
    async def go() -> None:
        waiter = ManifestWaiter()
        rid, _ = waiter.new(on_progress=lambda *report: None)
        waiter.on_message(Message("manifest_progress", 1, {"id": rid, **fields}))
    with pytest.raises(ProtocolError, match=error):
        asyncio.run(go())


def test_a_resync_after_a_spill_that_cut_a_file_in_two_is_answered_and_drops_the_part(tmp_path: Path) -> None:
    """The active spilled this passive's backlog after sending the first data records of a large
    file: their end never comes. The dirty-path resync's manifest request waited for the queue
    to drain, which waited for that end: the resync (and the passive) stood still for good."""
    rx, data = _receiver(tmp_path)
    (data / "big").write_bytes(b"old" * 1000)
    _queue(rx, ("data", {"path": "srv/data/big", "gid": 9, "offset": 0, "fresh": True}, b"n" * 8192),
           ("data", {"path": "srv/data/big", "gid": 9, "offset": 8192, "fresh": True}, b"n" * 8192))
    assert rx._apply_batch()  # applied into the file's stage, which waits for its "file" record
    (listed, _), _ = _ask_entries(rx, path="srv/data")  # the resync's manifest request is answered
    assert {e.path: e.size for e in listed}["srv/data/big"] == 3000  # the old version, still whole
    # The resync ships the file again (sync records carry no sequence), then marks the passive level.
    _enqueue(rx.db, [(None, "file", {"path": "srv/data/big", "gid": None, "size": 5, "mode": 0o644, "mtime_ns": 0,
                                     "fresh": False}, b"fresh", 0.0),
                     (None, "level", {"journal_id": "j2", "head": 40}, b"", 0.0)], 40)
    while rx._apply_batch():
        pass
    assert (data / "big").read_bytes() == b"fresh"
    assert rx.state.get_int("applied_seq") == 40
    assert rx.db.execute("SELECT COUNT(*) FROM recvq").fetchone()[0] == 0
    stages = [p for p in data.rglob("*") if rx.applier.stage_name in p.parts and p.is_file()]
    assert stages == [], "the cut-off part is dropped, not left in the stage directory"


def test_batches_from_a_replaced_link_and_its_successor_are_queued_one_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """The active closes a link to spill a backlog and dials again: the old link's last batch
    was still being queued when the new link's first came, both on one database connection.
    The second failed ("cannot start a transaction within a transaction") and every batch
    after it too, and the passive stood still for good."""
    import threading

    from engine import replication
    from engine.replication import pack_batch

    rx, _ = _receiver(tmp_path)
    first_started, release = threading.Event(), threading.Event()
    real = replication._enqueue

    def held_enqueue(db: Any, records: Any, received: int) -> None:
        if not first_started.is_set():
            first_started.set()
            db.execute("BEGIN IMMEDIATE")  # as the real one does first
            release.wait(10)
            db.execute("ROLLBACK")
        real(db, records, received)

    monkeypatch.setattr(replication, "_enqueue", held_enqueue)

    def batch(first: int, last: int) -> Message:
        fields, parts = pack_batch([(seq, "mkdir", {"path": f"srv/data/d{seq}", "mode": 0o755, "mtime_ns": 0}, b"", 0.0)
                                    for seq in range(first, last + 1)])
        return Message("recs", 1, fields, b"".join(parts))

    async def two_links() -> None:
        rx.link = old_link = _Link()  # type: ignore[assignment]
        old = asyncio.ensure_future(rx.on_recs(batch(1, 5), old_link))  # type: ignore[arg-type]
        await asyncio.to_thread(first_started.wait, 10)
        rx.link = new_link = _Link()  # type: ignore[assignment]
        new = asyncio.ensure_future(rx.on_recs(batch(3, 8), new_link))  # type: ignore[arg-type]  # resent from the hello
        await asyncio.sleep(0)
        release.set()
        async with asyncio.timeout(20):
            await asyncio.gather(old, new)

    asyncio.run(two_links())
    assert [r[0] for r in rx.db.execute("SELECT seq FROM recvq ORDER BY id")] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rx.received_seq == 8


def test_acks_name_the_level_record_applied_only_once_it_is(tmp_path: Path) -> None:
    """A passive that was level once says `source` is the active's journal on every ack from
    then on, also on acks of what it queued before a new resync's `level` record: the active
    took that for the new level and dropped the dirty list it was still repairing."""
    from engine.replication import pack_batch

    class Acks:
        closed = False

        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []

        async def send(self, type_: str, fields: dict[str, Any] | None = None, parts: Any = ()) -> None:
            self.sent.append(dict(fields or {}))

    rx, data = _receiver(tmp_path)
    rx.state.put(source_journal_id="j1")  # level with j1 since an earlier sync
    rx.link = link = Acks()  # type: ignore[assignment]

    async def receive(*records: tuple[int | None, str, dict[str, Any]]) -> dict[str, Any]:
        fields, parts = pack_batch([(seq, op, meta, b"", 0.0) for seq, op, meta in records])
        await rx.on_recs(Message("recs", 1, fields, b"".join(parts)), link)  # type: ignore[arg-type]
        while rx._apply_batch():
            await rx._ack()
        return link.sent[-1]

    mkdir = {"mode": 0o755, "mtime_ns": 0}
    before = asyncio.run(receive((1, "mkdir", {"path": "srv/data/a", **mkdir})))
    assert before["source"] == "j1" and "level" not in before
    after = asyncio.run(receive((None, "mkdir", {"path": "srv/data/b", **mkdir}),
                                (None, "level", {"journal_id": "j1", "head": 1, "sync": "t2"})))
    assert after["level"] == "t2" and (data / "b").is_dir()


def test_a_level_record_with_a_token_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    from engine.replication import pack_batch

    rx, _ = _receiver(tmp_path)
    fields, parts = pack_batch([(None, "level", {"journal_id": "j1", "head": 1, "sync": 7}, b"", 0.0)])
    with pytest.raises(ProtocolError, match="level.sync: expected a string"):
        asyncio.run(rx.on_recs(Message("recs", 1, fields, b"".join(parts)), rx.link))  # type: ignore[arg-type]


@pytest.mark.parametrize("failure, reported", [(ConnectionResetError("peer closed the channel"), False),
                                               (RuntimeError("a bug"), True)])
def test_an_answer_cut_off_by_a_closed_link_is_let_go_and_any_other_failure_is_reported(
        tmp_path: Path, failure: Exception, reported: bool) -> None:
    """The active closes a link to spill a backlog while the passive answers its manifest
    request: every such spill logged "Task exception was never retrieved" with a traceback."""
    class Closing:
        hello = {"features": list(FEATURES)}

        async def send(self, type_: str, fields: dict[str, Any] | None = None, payload: bytes = b"") -> None:
            raise failure

    rx, _ = _receiver(tmp_path)
    unhandled: list[dict[str, Any]] = []

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        rx.on_manifest_req(Closing(), Message("manifest_req", 1, {"id": 1, "path": "srv/data"}))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            while rx._answering:
                await asyncio.sleep(0.01)

    asyncio.run(go())
    import gc
    gc.collect()  # where a task's unretrieved exception is reported
    assert unhandled == []
    assert ("a bug" in rx.last_error) is reported


def test_a_batch_still_arriving_on_a_link_the_active_replaced_is_dropped(tmp_path: Path) -> None:
    """The active closed a link to spill a backlog while the passive still held frames of it:
    applied after the next link's resync had brought a log level, an old link's records put it
    back 300,000 bytes short, and the passive said it was level."""
    from engine.replication import pack_batch

    rx, data = _receiver(tmp_path)
    old, new = _Link(), _Link()

    def batch(*records: tuple[int | None, str, dict[str, Any], bytes]) -> Message:
        fields, parts = pack_batch([(*r, 0.0) for r in records])
        return Message("recs", 1, fields, b"".join(parts))

    def log(content: bytes) -> tuple[int | None, str, dict[str, Any], bytes]:
        return None, "file", {"path": "srv/data/log", "gid": None, "size": len(content), "mode": 0o644,
                              "mtime_ns": 0, "fresh": False}, content

    async def story() -> None:
        rx.link = new  # type: ignore[assignment]
        await rx.on_recs(batch(log(b"all of it"), (None, "level", {"journal_id": "j", "head": 7}, b"")), new)  # type: ignore[arg-type]
        await rx.on_recs(batch((5, *log(b"part")[1:])), old)  # type: ignore[arg-type]
        while rx._apply_batch():
            pass

    asyncio.run(story())
    assert (data / "log").read_bytes() == b"all of it"
    assert rx.received_seq == 7
