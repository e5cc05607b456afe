"""The active's sender, driven in-process on a real state database with a link that records
what it is given (no channel)."""
from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from engine.config import load_cluster, load_node
from engine.init import NodePlan, init_cluster
from engine.replication import WINDOW_BYTES, ManifestWaiter, PeerProgress, Sender
from engine.state import State


class RecordingLink:
    node = "secondary"
    hello: dict[str, Any] = {}
    closed = False

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send(self, type_: str, fields: dict[str, Any] | None = None, parts: Any = ()) -> None:
        self.sent.append((type_, dict(fields or {})))


def _sender(tmp_path: Path) -> tuple[Sender, RecordingLink, PeerProgress]:
    cfg = init_cluster(tmp_path / "c", "demo", "app.test", ["127.0.0.9"], [
        NodePlan("primary", "127.0.0.9:7781", "127.0.0.9", tmp_path / "r1", tmp_path / "s1"),
        NodePlan("secondary", "127.0.0.9:7782", "127.0.0.9", tmp_path / "r2", tmp_path / "s2")])
    cluster = load_cluster(cfg)
    node = load_node(cfg.parent / "primary" / "node.toml", cluster)
    link, progress = RecordingLink(), PeerProgress("secondary")
    wake = asyncio.Event()
    state = State(node.state_dir)

    async def settled() -> int:  # no capture here: the journal is all there is
        return state.journal_head()

    sender = Sender(link, state, cluster, node, progress, "journal", lambda: wake,  # type: ignore[arg-type]
                    ManifestWaiter(), lambda *a, **k: None, settled)
    return sender, link, progress


def test_streaming_goes_on_when_the_passive_acked_everything_before_the_window_filled(tmp_path: Path) -> None:
    """A fast passive acks each batch before the next is sent: the sender must count those acks
    rather than wait for one more, which never comes (replication stopped for good)."""
    async def story() -> list[int]:
        sender, link, progress = _sender(tmp_path)
        data = bytes(8 << 20)
        batches = WINDOW_BYTES // len(data) + 3
        for seq in range(1, batches + 1):
            async with asyncio.timeout(10):
                await sender._send([(seq, "data", {"path": "srv/data/f", "offset": 0}, data, 0.0)])
            progress.acked_received = seq  # the passive has it already
            progress.ack_event.set()
        return [fields["last"] for type_, fields in link.sent if type_ == "recs"]

    sent = asyncio.run(story())
    assert sent == list(range(1, WINDOW_BYTES // (8 << 20) + 4))


def test_the_window_still_holds_back_a_passive_that_does_not_ack(tmp_path: Path) -> None:
    async def story() -> tuple[int, bool]:
        sender, link, progress = _sender(tmp_path)
        data = bytes(8 << 20)
        for seq in range(1, WINDOW_BYTES // len(data) + 2):  # just over the window
            await sender._send([(seq, "data", {"path": "srv/data/f", "offset": 0}, data, 0.0)])
        held = asyncio.ensure_future(sender._send([(99, "data", {"path": "srv/data/f", "offset": 0}, data, 0.0)]))
        await asyncio.sleep(0)  # let it run up to its wait
        waiting = not held.done()
        progress.acked_received = 98
        progress.ack_event.set()
        async with asyncio.timeout(10):
            await held
        return len(link.sent), waiting

    count, waiting = asyncio.run(story())
    assert waiting, "a send beyond the window must wait for an ack"
    assert count == WINDOW_BYTES // (8 << 20) + 2


def test_paths_spilled_again_while_a_resync_runs_stay_in_the_dirty_list(tmp_path: Path) -> None:
    """A resync ended by deleting its passive's whole dirty list, also what a spill had put
    there meanwhile (the active spills a backlog and closes the link while the resync of the
    link before is still finishing): those changes never reached the passive, which stood at an
    old sequence with nothing left to send."""
    import json

    from engine.state import INSERT_JOURNAL, journal_upkeep

    async def story() -> tuple[list[str], set[str], int]:
        sender, link, progress = _sender(tmp_path)
        link.hello = {"journal_id": "journal", "received_seq": 0}
        db = sender.db

        def spill(*paths: str) -> None:
            for path in paths:
                db.execute(INSERT_JOURNAL, ("attr", json.dumps({"path": path}), b"", 0, 0.0))
            journal_upkeep(db, "journal", {"secondary": (0, 0)}, limit=-1)

        spill("srv/data/a")
        resynced: list[str] = []

        async def resync(paths: list[str], head: int, *, reason: str) -> list[Any]:
            resynced.extend(paths)
            spill("srv/data/a", "srv/data/b")  # changed again, and spilled again, meanwhile
            return []

        async def stream(cursor: int) -> None:
            return None

        sender.sync, sender.stream = resync, stream  # type: ignore[method-assign]
        await sender.run()
        left = {row[0] for row in db.execute("SELECT path FROM dirty WHERE node='secondary'")}
        return resynced, left, progress.dirty_paths

    resynced, left, counted = asyncio.run(story())
    assert "srv/data/a" in resynced
    assert left == {"srv/data/a", "srv/data/b"} and counted == 2


def test_a_passive_whose_records_were_truncated_from_an_empty_journal_is_not_streamed_from_nothing(
        tmp_path: Path) -> None:
    """With every record after the passive's position spilled and the journal truncated empty,
    streaming from that position sent nothing, for ever: it needs a sync, or its dirty list."""
    import json

    from engine.state import INSERT_JOURNAL

    sender, _, progress = _sender(tmp_path)
    for _ in range(10):
        sender.db.execute(INSERT_JOURNAL, ("attr", json.dumps({"path": "srv/data/a"}), b"", 0, 0.0))
    assert sender._start_position(5, "journal") == 5  # the journal still holds 6..10
    sender.db.execute("DELETE FROM journal")
    assert sender._start_position(10, "journal") == 10  # level: nothing missing
    assert sender._start_position(5, "journal") is None  # 6..10 are gone: a sync
    sender.db.execute("INSERT INTO dirty(node, path) VALUES('secondary', 'srv/data/a')")
    progress.acked_applied = 10
    assert sender._start_position(5, "journal") == 10  # its dirty list is resynced first


def _level_sent(link: RecordingLink) -> dict[str, Any] | None:
    for type_, fields in link.sent:
        for head in fields.get("records", []) if type_ == "recs" else []:
            if head["op"] == "level":
                return head["meta"]
    return None


async def _until(check: Any) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.01)


def _resync_ships_nothing(sender: Sender) -> None:
    async def nothing(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    sender._compare = sender.ship_repairs = nothing  # type: ignore[method-assign]


def test_a_resync_ends_when_its_own_level_record_is_applied_not_on_an_older_acks_word(tmp_path: Path) -> None:
    """A passive level since an earlier sync says so (`source`) on every ack, also on acks of
    what it queued before this resync's `level` record: the resync took the first such ack for
    its end, dropped the dirty list, and a spill that closed the link then lost what was still
    on its way (a renamed directory's old name stayed on the passive)."""
    async def story() -> tuple[bool, bool]:
        sender, link, progress = _sender(tmp_path)
        link.hello = {"features": ["level_ack"]}
        _resync_ships_nothing(sender)
        resync = asyncio.ensure_future(sender.sync(["srv/data"], 7, reason="dirty-path resync"))
        await _until(lambda: _level_sent(link) is not None)
        progress.source = "journal"  # an ack of records queued before the level record
        progress.ack_event.set()
        await asyncio.sleep(0.05)
        waited = not resync.done()
        progress.level = _level_sent(link)["sync"]  # type: ignore[index]
        progress.ack_event.set()
        await _until(resync.done)
        return waited, resync.exception() is None

    waited, ended = asyncio.run(story())
    assert waited, "an ack from before the level record must not end the resync"
    assert ended


def test_a_passive_without_level_tokens_is_level_once_it_names_the_journal(tmp_path: Path) -> None:
    async def story() -> None:
        sender, link, progress = _sender(tmp_path)
        link.hello = {"features": ["manifest_paths"]}  # an older passive
        _resync_ships_nothing(sender)
        resync = asyncio.ensure_future(sender.sync(["srv/data"], 7, reason="dirty-path resync"))
        await _until(lambda: _level_sent(link) is not None)
        progress.source = "journal"
        progress.ack_event.set()
        await _until(resync.done)
        resync.result()

    asyncio.run(story())


def test_a_resync_cut_off_before_its_level_record_was_applied_keeps_the_dirty_list(tmp_path: Path) -> None:
    """The link closes (a spill, a network fault) with repairs still in its send buffer: the
    resync is not done, and the paths it was repairing must stay listed for the next one."""
    async def story() -> tuple[BaseException | None, set[str]]:
        sender, link, progress = _sender(tmp_path)
        link.hello = {"journal_id": "journal", "received_seq": 0, "features": ["level_ack"]}
        sender.db.execute("INSERT INTO dirty(node, path) VALUES('secondary', 'srv/data/old-name')")
        _resync_ships_nothing(sender)
        run = asyncio.ensure_future(sender.run())
        await _until(lambda: _level_sent(link) is not None)
        link.closed = True  # the passive's last ack arrives after the close
        progress.ack_event.set()
        await _until(run.done)
        left = {row[0] for row in sender.db.execute("SELECT path FROM dirty WHERE node='secondary'")}
        return run.exception(), left

    failure, left = asyncio.run(story())
    assert isinstance(failure, ConnectionResetError)
    assert left == {"srv/data/old-name"}


def test_records_journaled_while_a_sync_read_are_synced_again_where_they_touch_it_and_sent_where_not(
        tmp_path: Path) -> None:
    """The sync read `a` after `a/l` had been renamed to `b/r`, but the rename was journaled
    after the sync's head: replayed, it found no source, and `b/r` never reached the passive.
    Such records are not replayed: their paths are synced again, read after the rename."""
    import json

    from engine.state import INSERT_JOURNAL

    async def story() -> tuple[list[list[str]], list[tuple[Any, str]], dict[str, Any] | None]:
        sender, link, progress = _sender(tmp_path)
        link.hello = {"features": ["level_ack", "manifest_paths"]}
        compared: list[list[str]] = []

        def journal(op: str, **meta: Any) -> None:
            sender.db.execute(INSERT_JOURNAL, (op, json.dumps(meta), b"", 64, 0.0))

        async def compare(paths: list[str], **kwargs: Any) -> list[Any]:
            compared.append(paths)
            if len(compared) == 1:  # journaled while the first pass read the tree
                journal("rename", path="srv/data/a/l", dst="srv/data/b/r")
                journal("attr", path="srv/data/other", mode=0o644, mtime_ns=0)
                journal("attr", path="srv/data/b/r", mode=0o600, mtime_ns=0)  # builds on the rename
            return []

        async def nothing(*args: Any, **kwargs: Any) -> list[Any]:
            return []

        sender._compare, sender.ship_repairs = compare, nothing  # type: ignore[method-assign]
        resync = asyncio.ensure_future(sender.sync(["srv/data/a"], sender.state.journal_head(), reason="resync"))
        await _until(lambda: _level_sent(link) is not None)
        progress.level = _level_sent(link)["sync"]  # type: ignore[index]
        progress.ack_event.set()
        await _until(resync.done)
        resync.result()
        sent = [(head["seq"], head["op"]) for type_, fields in link.sent if type_ == "recs"
                for head in fields["records"]]
        return compared, sent, _level_sent(link)

    compared, sent, level = asyncio.run(story())
    assert compared == [["srv/data/a"], ["srv/data/a/l", "srv/data/b/r"]]
    assert sent == [(None, "attr"), (None, "level")]  # the rename, and what builds on it, are not replayed
    assert level is not None and level["head"] == 3


def test_a_path_touches_what_is_synced_below_it_above_it_or_as_it_is() -> None:
    from engine.replication import _Touching

    touches = _Touching(["srv/data/a/b", "srv/data/c"])
    assert [x for x in ["srv/data/a/b", "srv/data/a/b/f", "srv/data/a", "srv/data", "srv/data/c/d/e"] if touches(x)] \
        == ["srv/data/a/b", "srv/data/a/b/f", "srv/data/a", "srv/data", "srv/data/c/d/e"]
    assert not any(touches(x) for x in ["srv/data/a/bb", "srv/data/a/x", "srv/data/cc", "srv/other"])


def test_a_compare_whose_request_never_left_leaves_no_failure_unread(tmp_path: Path) -> None:
    """The link closed while the manifest request was being queued: the compare failed, but its
    request stayed pending, and the link's end failed it again with no one left to read it
    (asyncio logged "Future exception was never retrieved" at ERROR, now and then in a hunt)."""
    async def story() -> tuple[type, list[dict[str, Any]]]:
        unread: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unread.append(context))
        sender, link, _ = _sender(tmp_path)

        async def closed(*args: Any, **kwargs: Any) -> None:
            raise ConnectionResetError("channel is closed")

        link.send = closed  # type: ignore[method-assign]
        [failure] = await asyncio.gather(sender.compare(["srv/data"]), return_exceptions=True)
        kind = type(failure)
        del failure  # its traceback holds the compare's frame, and so its request
        sender.manifests.fail_all(ConnectionError("channel to secondary closed"))  # as the link's end does
        gc.collect()
        return kind, unread

    kind, unread = asyncio.run(story())
    assert kind is ConnectionResetError
    assert unread == []


def test_streaming_stops_at_a_hole_a_spill_cut_in_the_journal(tmp_path: Path) -> None:
    """A spill truncates the journal past the passive's place, then closes its link: a read in
    between found the records after the hole, and the passive refused them as a sequence gap
    (a warning in its log for a spill that is routine)."""
    import json

    from engine.state import INSERT_JOURNAL

    async def story() -> list[tuple[str, dict[str, Any]]]:
        sender, link, _ = _sender(tmp_path)
        for _ in range(5):
            sender.db.execute(INSERT_JOURNAL, ("attr", json.dumps({"path": "srv/data/a"}), b"", 0, 0.0))
        sender.db.execute("DELETE FROM journal WHERE seq <= 3")  # this passive had applied 1
        async with asyncio.timeout(10):
            await asyncio.gather(sender.stream(1), return_exceptions=True)  # it ends, and the link with it
        return link.sent

    assert asyncio.run(story()) == []
