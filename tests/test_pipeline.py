"""The active's whole path in one process: real inotify, the coalescer, the journaler, and the
passive's applier, with the watcher read and the queue journaled at random points.

What the agent adds on top (threads, the channel, the durable queues) is covered by the tests
with real agents; here a random story can run thousands of times a minute, and the journaler
reads the tree late, as it does under load: after renames, deletes and new files its events
have not told it about yet.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from conftest import require_root
from engine import blocks
from engine.apply import Applier
from engine.capture import Change, Coalescer, Watcher
from engine.config import ReplicationSettings
from engine.errors import PathError, ProtocolError
from engine.journaler import Journaler
from engine.state import State, read_journal
from test_apply import BS, TREES, Active, _random_story, assert_level


class Pipeline:
    """An active's capture and journal, and a passive applying what it journals."""

    def __init__(self, base: Path) -> None:
        self.active, self.passive = base / "active", base / "passive"
        for root in (self.active, self.passive):
            (root / "srv/data").mkdir(parents=True)
        self.watcher = Watcher(self.active, TREES[:1])
        assert self.watcher.start() == []
        self.coalescer = Coalescer()
        self.state = State(base / "state")
        self.journaler = Journaler(self.state.connect(), self.active, TREES[:1], ReplicationSettings(block_size=BS))
        self.applier = Applier(self.passive, TREES)
        self.applied = 0
        self.refused: list[str] = []

    def read(self) -> None:
        for change in self.watcher.read():
            self.coalescer.add(change)

    def journal(self) -> None:
        """One flush, as the agent's flush loop does it."""
        done = self.journaler.process(self.coalescer.drain())
        self.coalescer.put_back(done.again)

    def apply(self) -> None:
        for r in read_journal(self.state.db, self.applied, 1_000_000, 1 << 40):
            try:
                self.applier.apply(r.op, r.meta, bytes(r.data))
            except (PathError, ProtocolError) as exc:
                self.refused.append(f"{r.seq} {r.op}: {exc}")
            self.applied = r.seq
        self.applier.end_batch()

    def settle(self) -> None:
        """Everything the watcher has seen, journaled and applied, with nothing left over."""
        self.read()
        while len(self.coalescer):
            self.journal()
        self.apply()

    def close(self) -> None:
        self.watcher.close()


@pytest.mark.parametrize("seed", range(80))
def test_random_changes_reach_the_passive_exactly_however_late_the_journaler_reads(tmp_path: Path, seed: int) -> None:
    """Each record is applied without a refusal, and the passive ends level with the active.

    On the code before this test, 7 of 300 such stories failed: 3 ended with the passive
    missing a file or holding an old version, 2 had records refused as symlink escapes, and 2
    stopped the journaler with ENOTDIR or ELOOP on a path through a file or a link. None of
    1,000 fail now.
    """
    rng = random.Random(seed)
    p = Pipeline(tmp_path)
    read_often, journal_often = rng.choice([0.2, 0.5, 0.8]), rng.choice([0.3, 0.5, 0.8])
    try:
        active = Active(p.active)
        for _ in range(60):
            _random_story(p.active, active, rng, steps=rng.choice([1, 2, 5, 10]))
            if rng.random() < read_often:
                p.read()
            if rng.random() < journal_often:
                p.journal()
                p.apply()
        p.settle()
        assert p.refused == []
        assert_level(p.active, p.passive)
    finally:
        p.close()


def test_every_name_of_a_hard_linked_file_changed_in_place_follows(tmp_path: Path) -> None:
    """inotify reports a change only under the name it was made through; the other names of
    the file hold the same new content and mode, and the passive gets them too."""
    p = Pipeline(tmp_path)
    try:
        data = p.active / "srv/data"
        (data / "sub").mkdir()
        (data / "a").write_bytes(b"x" * 100)
        p.settle()
        os.link(data / "a", data / "b")
        os.link(data / "a", data / "sub/c")
        p.settle()
        assert_level(p.active, p.passive)
        for name in ("a", "b", "sub/c"):  # through each name in turn
            with open(data / name, "r+b") as f:
                f.seek(10)
                f.write(name.encode() * 3)
            p.settle()
            assert_level(p.active, p.passive)
        os.chmod(data / "b", 0o600)
        p.settle()
        assert_level(p.active, p.passive)
        assert (p.passive / "srv/data/sub/c").read_bytes() == (data / "a").read_bytes()
        assert p.refused == []
    finally:
        p.close()


def test_owners_follow_a_chown_of_files_directories_and_links(tmp_path: Path) -> None:
    """Clones share their user ids, so owners travel as numbers: what an application's files
    are owned by on the active, they are owned by on the passive it fails over to."""
    require_root()
    p = Pipeline(tmp_path)
    try:
        data = p.active / "srv/data"
        (data / "db").mkdir()
        (data / "db/table").write_bytes(b"rows" * 100)
        (data / "db/big").write_bytes(os.urandom(3 * BS + 5))  # staged, in data records
        os.symlink("table", data / "db/current")
        p.settle()
        for name, (uid, gid) in {"db": (70, 70), "db/table": (70, 71), "db/big": (1234, 5678),
                                 "db/current": (70, 72)}.items():
            os.chown(data / name, uid, gid, follow_symlinks=False)
        p.settle()
        for name in ("db", "db/table", "db/big", "db/current"):
            a, b = os.lstat(data / name), os.lstat(p.passive / "srv/data" / name)
            assert (b.st_uid, b.st_gid) == (a.st_uid, a.st_gid), name
        assert_level(p.active, p.passive)
        (data / "db/new").write_bytes(b"made by the application")  # a new file keeps its owner too
        os.chown(data / "db/new", 70, 70)
        p.settle()
        assert os.stat(p.passive / "srv/data/db/new").st_uid == 70
        assert p.refused == []
    finally:
        p.close()


def test_stale_paths_that_no_event_clears_give_way_to_a_rescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Examines that find nothing wait for the event that says where the path went; where none
    comes (events lost), past a bound they are dropped for a rescan of the trees."""
    from engine import journaler

    monkeypatch.setattr(journaler, "STALE_MAX", 3)
    p = Pipeline(tmp_path)
    try:
        few = p.journaler.process([Change("examine", f"srv/data/gone{i}") for i in range(3)])
        assert few.again == []
        more = p.journaler.process([Change("examine", "srv/data/gone3")])
        assert more.again == [Change("rescan", "srv/data", is_dir=True)]
        assert p.journaler.process([Change("examine", "srv/data/gone4")]).again == []  # the count starts again
    finally:
        p.close()


def _racing_reads(monkeypatch: pytest.MonkeyPatch, path: Path,
                  writes: dict[int, tuple[str, int, bytes]]) -> None:
    """Make the n-th read of file data (1: the journaler hashing it, 2: reading what it ships)
    race a writer: ("before" or "after", offset, bytes) written to `path` around that read."""
    real = blocks.read_chunk
    count = 0

    def racing(fd: int, length: int, offset: int) -> bytes | memoryview:
        nonlocal count
        count += 1
        when, at, data = writes.get(count, ("", 0, b""))
        if when == "before":
            _pwrite(path, data, at)
        out = real(fd, length, offset)
        if when == "after":
            _pwrite(path, data, at)
        return out

    monkeypatch.setattr(blocks, "read_chunk", racing)


def _pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_a_file_that_grows_while_the_journaler_hashes_it_reaches_the_passive_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written as it is hashed (a copy in progress): its digests were taken of more than
    the size shipped, so the block that held the old end looked shipped whole. The passive kept
    zeros there for good (seen as one 4 KiB page of zeros in each 300 MB file copied in)."""
    p = Pipeline(tmp_path)
    try:
        f = p.active / "srv/data/f"
        f.write_bytes(b"a" * 4 * BS)
        p.settle()
        with open(f, "ab") as out:
            out.write(b"b" * (BS + BS // 2))  # ends half-way through block 5
        p.read()
        _racing_reads(monkeypatch, f, {1: ("before", 5 * BS + BS // 2, b"c" * (BS // 2))})
        p.journal()
        monkeypatch.undo()
        p.settle()
        assert (p.passive / "srv/data/f").read_bytes() == f.read_bytes()
        assert_level(p.active, p.passive)
    finally:
        p.close()


def test_a_block_changed_and_changed_back_while_the_journaler_reads_it_reaches_the_passive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashed as one version, shipped as a second, then back to the first: the digest kept
    must be the shipped one's, or the change back looks like no change and is never shipped."""
    p = Pipeline(tmp_path)
    try:
        f = p.active / "srv/data/f"
        f.write_bytes(b"a" * 4 * BS)
        p.settle()
        _pwrite(f, b"b" * BS, BS)
        p.read()
        _racing_reads(monkeypatch, f, {1: ("after", BS, b"c" * BS), 2: ("after", BS, b"b" * BS)})
        p.journal()
        monkeypatch.undo()
        p.settle()
        assert (p.passive / "srv/data/f").read_bytes() == b"a" * BS + b"b" * BS + b"a" * 2 * BS
        assert_level(p.active, p.passive)
    finally:
        p.close()


def test_files_read_at_a_directorys_old_name_after_it_was_renamed_and_made_again_are_looked_at_again(
        tmp_path: Path) -> None:
    """The journaler read `d/g` late, after `d` had been renamed to `r` and a new `d/g`
    written: the record carried the new file's content, and the rename then moved it to `r/g`
    on the passive, where the old content belongs (log rotation of a directory)."""
    p = Pipeline(tmp_path)
    try:
        data = p.active / "srv/data"
        (data / "d").mkdir()
        p.settle()
        (data / "d/g").write_bytes(b"old" * 100)
        p.read()  # its events are in, and the journaler gets to them only after:
        os.rename(data / "d", data / "r")
        (data / "d").mkdir()
        (data / "d/g").write_bytes(b"new" * 70)
        p.journal()
        p.settle()
        assert (p.passive / "srv/data/r/g").read_bytes() == b"old" * 100
        assert_level(p.active, p.passive)
    finally:
        p.close()
