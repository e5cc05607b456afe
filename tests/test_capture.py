"""Capture: real inotify on a temporary root, and the coalescer's replay order."""
from __future__ import annotations

import errno
import os
import select
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

from engine.capture import Change, Coalescer, Watcher

TREE = "srv/data"


@dataclass(frozen=True)
class Tree:
    """Stand-in for engine.config.ProtectedTree: excludes any path with a component matching
    a pattern. Unlike the real one it does not exclude ".nf-stage", so the tests show that the
    watcher refuses the stage directory by itself."""

    path: str
    exclude: tuple[str, ...] = ("*.tmp", "cache")

    @property
    def rel(self) -> str:
        return self.path.strip("/")

    def wants(self, rel_in_tree: str, is_dir: bool) -> bool:
        return not any(fnmatch(part, pat) for part in rel_in_tree.split("/") for pat in self.exclude)


@dataclass
class Node:
    root: Path
    data: Path  # the protected tree, root / "srv/data"
    outside: Path  # a directory on the same filesystem, not protected
    watcher: Watcher


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    data = tmp_path / TREE
    data.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    watcher = Watcher(tmp_path, [Tree("/srv/data")])
    try:
        assert watcher.start() == []
        yield Node(tmp_path, data, outside, watcher)
    finally:
        watcher.close()


def require_root(what: str) -> None:
    """Skip a test that needs root, or fail it when NF_REQUIRE_ALL=1 says nothing may skip."""
    if os.geteuid() == 0:
        return
    reason = f"needs root: {what}"
    if os.environ.get("NF_REQUIRE_ALL") == "1":
        pytest.fail(reason + " (NF_REQUIRE_ALL=1)")
    pytest.skip(reason)


def read_until(watcher: Watcher, done: Callable[[list[Change]], bool], timeout: float = 5.0) -> list[Change]:
    """Read changes until `done(changes so far)` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen: list[Change] = []
    while True:
        seen += watcher.read()
        if done(seen):
            return seen
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"gave up after {timeout} s; changes seen: {seen}")
        select.select([watcher], [], [], min(left, 0.1))


def read_until_has(watcher: Watcher, *wanted: Change) -> list[Change]:
    return read_until(watcher, lambda seen: all(c in seen for c in wanted))


def examine(path: str, is_dir: bool = False) -> Change:
    return Change("examine", f"{TREE}/{path}" if path else TREE, is_dir=is_dir)


def delete(path: str, is_dir: bool = False) -> Change:
    return Change("delete", f"{TREE}/{path}", is_dir=is_dir)


def move(src: str, dst: str, is_dir: bool = False) -> Change:
    return Change("move", f"{TREE}/{src}", f"{TREE}/{dst}", is_dir)


def rescan(path: str = "") -> Change:
    return Change("rescan", f"{TREE}/{path}" if path else TREE, is_dir=True)


# -- watcher: files --------------------------------------------------------------------------


def test_a_file_written_changed_chmodded_and_removed_is_examined_then_deleted(node: Node) -> None:
    f = node.data / "report.txt"
    f.write_text("v1")
    read_until_has(node.watcher, examine("report.txt"))

    with f.open("a") as out:
        out.write("v2")
    read_until_has(node.watcher, examine("report.txt"))

    f.chmod(0o600)
    read_until_has(node.watcher, examine("report.txt"))

    f.unlink()
    seen = read_until_has(node.watcher, delete("report.txt"))
    assert seen[-1] == delete("report.txt")


def test_a_new_symlink_is_examined_and_not_followed(node: Node) -> None:
    (node.outside / "target").mkdir()
    os.symlink(node.outside / "target", node.data / "link")
    read_until_has(node.watcher, examine("link"))
    assert f"{TREE}/link" not in node.watcher.watched


def test_files_written_in_a_fresh_directory_before_its_watch_exists_are_not_missed(node: Node) -> None:
    # mkdir -p a/b/c && touch a/b/c/f, faster than the watcher can add watches.
    os.makedirs(node.data / "a/b/c")
    (node.data / "a/b/c/f").write_text("early")
    read_until_has(
        node.watcher,
        examine("a", is_dir=True),
        examine("a/b", is_dir=True),
        examine("a/b/c", is_dir=True),
        examine("a/b/c/f"),
    )
    assert {f"{TREE}/a", f"{TREE}/a/b", f"{TREE}/a/b/c"} <= node.watcher.watched.keys()

    (node.data / "a/b/c/g").write_text("later")
    read_until_has(node.watcher, examine("a/b/c/g"))


# -- watcher: renames ------------------------------------------------------------------------


def test_a_renamed_file_is_a_move(node: Node) -> None:
    (node.data / "old.txt").write_text("x")
    read_until_has(node.watcher, examine("old.txt"))
    (node.data / "old.txt").rename(node.data / "new.txt")
    assert read_until_has(node.watcher, move("old.txt", "new.txt")) == [move("old.txt", "new.txt")]


def test_after_a_directory_rename_writes_inside_report_the_new_path(node: Node) -> None:
    (node.data / "d/sub").mkdir(parents=True)
    read_until_has(node.watcher, examine("d/sub", is_dir=True))

    (node.data / "d").rename(node.data / "e")
    read_until_has(node.watcher, move("d", "e", is_dir=True))
    assert f"{TREE}/d" not in node.watcher.watched
    assert {f"{TREE}/e", f"{TREE}/e/sub"} <= node.watcher.watched.keys()

    (node.data / "e/sub/x").write_text("x")
    seen = read_until_has(node.watcher, examine("e/sub/x"))
    assert not [c for c in seen if c.path.startswith(f"{TREE}/d/")]


def test_a_directory_swapped_for_a_symlink_before_its_watch_is_added_is_not_watched_through_it(node: Node) -> None:
    """mkdir c/d, then c renamed away and a symlink to another tree put in its place, all before
    the watcher reads the mkdir: the watch for c/d must not land on what the symlink leads to,
    which would report changes outside the tree as changes in it."""
    (node.data / "c").mkdir()
    read_until_has(node.watcher, examine("c", is_dir=True))
    (node.outside / "d").mkdir()
    (node.data / "c/d").mkdir()
    (node.data / "c").rename(node.data / "c.old")
    os.symlink(node.outside, node.data / "c")
    read_until_has(node.watcher, move("c", "c.old", is_dir=True), examine("c"))

    (node.outside / "d/secret").write_text("outside the tree")
    (node.data / "sentinel").write_text("after it")
    seen = read_until_has(node.watcher, examine("sentinel"))
    assert not [c for c in seen if "secret" in c.path], seen


def test_a_directory_made_in_one_renamed_before_the_watcher_reads_the_mkdir_is_watched(node: Node) -> None:
    """Unpack into a temporary directory, then rename it into place, faster than the watcher
    reads: the new subdirectory is watched at its new path, and what is written in it later is
    reported."""
    (node.data / "tmp").mkdir()
    read_until_has(node.watcher, examine("tmp", is_dir=True))
    (node.data / "tmp/sub").mkdir()
    (node.data / "tmp/sub/early").write_text("before the watch")
    (node.data / "tmp").rename(node.data / "final")
    read_until_has(node.watcher, move("tmp", "final", is_dir=True), examine("final/sub/early"))
    assert f"{TREE}/final/sub" in node.watcher.watched

    (node.data / "final/sub/later").write_text("after the rename")
    read_until_has(node.watcher, examine("final/sub/later"))


def test_a_watched_directory_renamed_onto_the_name_of_one_made_and_gone_keeps_its_own_events(node: Node) -> None:
    """mkdir a; rmdir a; ln -s x d/b; mv d a, all before the watcher reads the mkdir: by then
    "a" is the directory watched as d. The link was made in d, before the rename, and once the
    changes are coalesced the rename carries it to a/b (taking d for the new a early would
    report it as a/b before the rename, which then drops it as part of what it replaced)."""
    (node.data / "d").mkdir()
    read_until_has(node.watcher, examine("d", is_dir=True))
    (node.data / "a").mkdir()
    (node.data / "a").rmdir()
    os.symlink("x", node.data / "d/b")
    (node.data / "d").rename(node.data / "a")
    seen = read_until_has(node.watcher, move("d", "a", is_dir=True))
    assert examine("d/b") in seen and examine("a/b") not in seen[: seen.index(move("d", "a", is_dir=True))]
    coalescer = Coalescer()
    for change in seen:
        coalescer.add(change)
    pending = coalescer.drain()
    assert pending.index(examine("a/b")) > pending.index(move("d", "a", is_dir=True)), pending


def test_moving_out_of_the_tree_is_a_delete_and_the_watches_go(node: Node) -> None:
    (node.data / "f").write_text("x")
    (node.data / "d/sub").mkdir(parents=True)
    read_until_has(node.watcher, examine("f"), examine("d/sub", is_dir=True))

    (node.data / "f").rename(node.outside / "f")
    (node.data / "d").rename(node.outside / "d")
    read_until_has(node.watcher, delete("f"), delete("d", is_dir=True))
    assert not [p for p in node.watcher.watched if p.startswith(f"{TREE}/d")]

    # What happens out there is none of the tree's business.
    (node.outside / "d/sub/later").write_text("x")
    (node.data / "sentinel").write_text("x")
    seen = read_until_has(node.watcher, examine("sentinel"))
    assert [c for c in seen if "later" in c.path] == []


def test_moving_in_from_outside_is_examined_and_a_directory_is_scanned(node: Node) -> None:
    (node.outside / "f").write_text("x")
    (node.outside / "d/sub").mkdir(parents=True)
    (node.outside / "d/sub/deep.txt").write_text("x")

    (node.outside / "f").rename(node.data / "f")
    (node.outside / "d").rename(node.data / "d")
    read_until_has(
        node.watcher,
        examine("f"),
        examine("d", is_dir=True),
        examine("d/sub", is_dir=True),
        examine("d/sub/deep.txt"),
    )
    (node.data / "d/sub/new.txt").write_text("x")
    read_until_has(node.watcher, examine("d/sub/new.txt"))


# -- watcher: filters ------------------------------------------------------------------------


def test_excluded_paths_and_the_stage_directory_produce_nothing(node: Node) -> None:
    (node.data / "scratch.tmp").write_text("x")
    (node.data / "cache").mkdir()
    (node.data / "cache/blob").write_text("x")
    (node.data / ".nf-stage/0001").mkdir(parents=True)
    (node.data / ".nf-stage/0001/part").write_text("x")
    (node.data / ".nf-stage/0001/part").rename(node.data / ".nf-stage/done")
    (node.data / "sentinel").write_text("x")

    seen = read_until_has(node.watcher, examine("sentinel"))
    assert set(seen) == {examine("sentinel")}
    assert not [p for p in node.watcher.watched if "cache" in p or ".nf-stage" in p]


def test_a_rename_across_the_filter_is_a_delete_or_an_examine(node: Node) -> None:
    (node.data / "keep.txt").write_text("x")
    (node.data / "drop.tmp").write_text("x")
    (node.data / "dir").mkdir()
    (node.data / "sentinel1").write_text("x")
    read_until_has(node.watcher, examine("sentinel1"))

    (node.data / "keep.txt").rename(node.data / "keep.tmp")  # wanted -> excluded
    (node.data / "drop.tmp").rename(node.data / "drop.txt")  # excluded -> wanted
    (node.data / "dir").rename(node.data / "cache")  # a watched directory becomes excluded
    read_until_has(node.watcher, delete("keep.txt"), examine("drop.txt"), delete("dir", is_dir=True))

    (node.data / "cache/inside").write_text("x")  # no longer watched
    (node.data / "sentinel2").write_text("x")
    seen = read_until_has(node.watcher, examine("sentinel2"))
    assert set(seen) == {examine("sentinel2")}


# -- watcher: when the kernel gives up -------------------------------------------------------


def _set_sysctl(name: str, value: int) -> int:
    path = Path("/proc/sys/fs/inotify") / name
    old = int(path.read_text())
    path.write_text(f"{value}\n")
    return old


def test_a_queue_overflow_asks_for_a_rescan_of_the_protected_set(tmp_path: Path) -> None:
    require_root("lowers fs.inotify.max_queued_events")
    data = tmp_path / TREE
    data.mkdir(parents=True)
    watcher = Watcher(tmp_path, [Tree("/srv/data")])
    watcher.close()  # the queue size is fixed when the inotify instance is created
    old = _set_sysctl("max_queued_events", 16)
    try:
        watcher = Watcher(tmp_path, [Tree("/srv/data")])
    finally:
        _set_sysctl("max_queued_events", old)
    try:
        assert watcher.start() == []
        for i in range(200):
            (data / f"f{i}").write_text("x")
        read_until_has(watcher, rescan())
        # Watching goes on after the overflow.
        (data / "after").write_text("x")
        read_until_has(watcher, examine("after"))
    finally:
        watcher.close()


def test_running_out_of_watches_degrades_to_a_rescan_instead_of_crashing(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    (node.data / "d0").mkdir()
    (node.data / "d1").mkdir()
    if os.geteuid() == 0:
        old = _set_sysctl("max_user_watches", 1)
        try:
            seen = read_until(node.watcher, lambda seen: rescan("d1") in seen)
        finally:
            _set_sysctl("max_user_watches", old)
    else:
        real_add_watch = node.watcher._inotify.add_watch

        def add_watch(path: str, mask: int) -> int:
            if path.endswith("/d1"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_add_watch(path, mask)

        monkeypatch.setattr(node.watcher._inotify, "add_watch", add_watch)
        seen = read_until(node.watcher, lambda seen: rescan("d1") in seen)
    assert examine("d1", is_dir=True) in seen
    assert node.watcher.degraded
    # Everything already watched still reports.
    (node.data / "still.txt").write_text("x")
    read_until_has(node.watcher, examine("still.txt"))


def test_start_reports_unwatchable_subtrees_as_rescans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / TREE / "a/big").mkdir(parents=True)
    (tmp_path / TREE / "b").mkdir()
    watcher = Watcher(tmp_path, [Tree("/srv/data"), Tree("/srv/missing")])
    real_add_watch = watcher._inotify.add_watch

    def add_watch(path: str, mask: int) -> int:
        if os.path.realpath(path).endswith("/a/big"):  # the watcher names the directory by its fd
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_add_watch(path, mask)

    monkeypatch.setattr(watcher._inotify, "add_watch", add_watch)
    try:
        assert sorted(watcher.start(), key=lambda c: c.path) == [
            Change("rescan", "srv/data/a/big", is_dir=True),
            Change("rescan", "srv/missing", is_dir=True),
        ]
        assert watcher.degraded
        assert watcher.watched.keys() == {"srv/data", "srv/data/a", "srv/data/b"}

        monkeypatch.undo()
        (tmp_path / "srv/missing").mkdir()
        assert watcher.start() == []  # a second start re-walks and retries
        assert not watcher.degraded
        assert "srv/data/a/big" in watcher.watched and "srv/missing" in watcher.watched
    finally:
        watcher.close()


def test_a_removed_tree_root_asks_for_a_rescan(node: Node) -> None:
    shutil.rmtree(node.data)
    read_until_has(node.watcher, rescan())
    assert node.watcher.degraded


# -- coalescer -------------------------------------------------------------------------------


def ex(path: str, is_dir: bool = False) -> Change:
    return Change("examine", path, is_dir=is_dir)


def coalesce(*changes: Change) -> list[Change]:
    c = Coalescer()
    for change in changes:
        c.add(change)
    return c.drain()


def test_examines_of_one_path_collapse_at_the_latest_add() -> None:
    assert coalesce(ex("a"), ex("b"), ex("a")) == [ex("b"), ex("a")]


def test_an_examine_after_a_move_stays_after_it() -> None:
    assert coalesce(ex("b"), Change("move", "a", "b"), ex("b")) == [Change("move", "a", "b"), ex("b")]


def test_a_delete_drops_pending_examines_of_the_path_and_below() -> None:
    got = coalesce(ex("d/x"), ex("d/y/z"), ex("dx"), ex("d", True), Change("delete", "d", is_dir=True))
    assert got == [ex("dx"), Change("delete", "d", is_dir=True)]


def test_a_move_carries_pending_examines_to_the_new_path_after_it() -> None:
    got = coalesce(ex("s/a"), ex("other"), ex("s", True), Change("move", "s", "t", is_dir=True))
    assert got == [ex("other"), Change("move", "s", "t", is_dir=True), ex("t/a"), ex("t", True)]


def test_a_move_drops_pending_examines_of_what_it_replaces() -> None:
    got = coalesce(ex("t/old"), ex("t", True), ex("tt"), Change("move", "s", "t", is_dir=True))
    assert got == [ex("tt"), Change("move", "s", "t", is_dir=True)]


def test_a_chain_of_moves_replays_in_order() -> None:
    got = coalesce(ex("a"), Change("move", "a", "b"), Change("move", "b", "c"))
    assert got == [Change("move", "a", "b"), Change("move", "b", "c"), ex("c")]


def test_a_rescan_absorbs_examines_below_it_but_keeps_deletes_and_moves() -> None:
    got = coalesce(
        ex("p/x"),
        Change("delete", "p/y"),
        ex("q"),
        Change("move", "p/m", "p/n"),
        ex("p", True),
        Change("rescan", "p", is_dir=True),
    )
    assert got == [
        Change("delete", "p/y"),
        ex("q"),
        Change("move", "p/m", "p/n"),
        Change("rescan", "p", is_dir=True),
    ]


def test_rescans_collapse_and_a_parent_absorbs_its_children() -> None:
    r = lambda p: Change("rescan", p, is_dir=True)  # noqa: E731
    assert coalesce(r("p"), r("p")) == [r("p")]
    assert coalesce(r("p/a"), r("p/b"), r("q"), r("p")) == [r("q"), r("p")]
    assert coalesce(r("p"), r("p/a")) == [r("p")]


def test_a_pending_rescan_runs_after_later_changes_below_it() -> None:
    r = Change("rescan", "p", is_dir=True)
    m = Change("move", "q/a", "p/a")
    assert coalesce(r, m, ex("p/a")) == [m, r]
    assert coalesce(r, Change("delete", "p/b")) == [Change("delete", "p/b"), r]
    assert coalesce(r, ex("q")) == [r, ex("q")]


def test_a_move_carries_pending_rescans_below_it() -> None:
    got = coalesce(Change("rescan", "s/sub", is_dir=True), Change("move", "s", "t", is_dir=True))
    assert got == [Change("move", "s", "t", is_dir=True), Change("rescan", "t/sub", is_dir=True)]


def test_a_rescan_of_the_whole_root_covers_everything() -> None:
    r = Change("rescan", "", is_dir=True)
    assert coalesce(ex("a"), ex("b/c"), r, ex("d")) == [r]


def test_drain_empties_and_len_counts_pending() -> None:
    c = Coalescer()
    c.add(ex("a"))
    c.add(ex("a"))
    c.add(Change("delete", "b"))
    assert len(c) == 2
    assert c.drain() == [ex("a"), Change("delete", "b")]
    assert len(c) == 0 and c.drain() == []
    c.add(ex("a"))
    assert c.drain() == [ex("a")]


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown change kind"):
        Coalescer().add(Change("truncate", "a"))  # type: ignore[arg-type]


def test_removing_a_big_fresh_tree_costs_its_size_not_its_square() -> None:
    c = Coalescer()
    paths = [f"big/d{i // 100}/f{i}" for i in range(50_000)]
    started = time.monotonic()
    for p in paths:
        c.add(ex(p))
    for p in reversed(paths):
        c.add(Change("delete", p))
    c.add(Change("delete", "big", is_dir=True))
    assert len(c) == 50_001
    assert time.monotonic() - started < 3
