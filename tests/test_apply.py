"""The passive applies records: every op, replays, forged paths, no torn files, manifests.

An `Active` here ships changes from a primary root the way the journaler does (block hashes,
changed blocks only, data records then a file record), and the passive's `Applier` applies
them under a secondary root. The story each test tells ends with both trees compared by
`scan_tree` + `same`.
"""
from __future__ import annotations

import fnmatch
import itertools
import os
import random
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import require_root, wait_for
from engine.apply import Applier
from engine.blocks import INLINE_BYTES, changed_blocks, hash_bytes, hash_file, read_ranges
from engine.capture import Change
from engine.config import ReplicationSettings
from engine.errors import PathError, ProtocolError
from engine.journaler import Journaler
from engine.manifest import Entry, same, scan_tree, split_identity_dirs
from engine.paths import check_rel_path, open_parent
from engine.state import State, read_journal
from engine.sync import GROUP_FILES, diff, repair_records

BS = 4096
CHUNK = 16 * BS
GIB = 1 << 30
Record = tuple[str, dict[str, Any], bytes]


@dataclass(frozen=True)
class Tree:
    """Stand-in for engine.config.ProtectedTree (same attributes, simple name patterns)."""

    path: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def rel(self) -> str:
        return self.path.lstrip("/")

    def wants(self, rel_in_tree: str, is_dir: bool) -> bool:
        if not rel_in_tree:
            return True
        parts = rel_in_tree.split("/")
        if parts[0] == ".nf-stage":
            return False
        for i, part in enumerate(parts):
            part_is_dir = is_dir or i < len(parts) - 1
            for pat in self.exclude:
                if fnmatch.fnmatchcase(part, pat.rstrip("/")) and (part_is_dir or not pat.endswith("/")):
                    return False
        return is_dir or not self.include or any(fnmatch.fnmatchcase(parts[-1], p) for p in self.include)


TREE = Tree("/srv/data")
TREES = (TREE, Tree("/etc/app"))


class Active:
    """Ships changes under `root` as records, remembering the block hashes it shipped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shipped: dict[str, bytes] = {}
        self._gids = itertools.count(1)

    def file(self, rel: str) -> list[Record]:
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            hashes = hash_file(fd, BS)
            old = self.shipped.get(rel)
            fresh = old is None
            blocks = changed_blocks(old, hashes)
            gid = next(self._gids) if blocks else None
            out: list[Record] = [("data", {"path": rel, "gid": gid, "offset": off, "fresh": fresh}, data)
                                 for off, data in read_ranges(fd, blocks, BS, st.st_size, CHUNK)]
            out.append(("file", {"path": rel, "gid": gid, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
                                 "mtime_ns": st.st_mtime_ns, "fresh": fresh}, b""))
        finally:
            os.close(fd)
        self.shipped[rel] = hashes
        return out

    def whole(self, rel: str) -> list[Record]:
        """A small file with its content in its "file" record, as the journaler ships a new one."""
        content = (self.root / rel).read_bytes()
        st = os.lstat(self.root / rel)
        fresh = rel not in self.shipped
        self.shipped[rel] = hash_bytes(content, BS)
        return [("file", {"path": rel, "gid": None, "size": len(content), "mode": stat.S_IMODE(st.st_mode),
                          "mtime_ns": st.st_mtime_ns, "fresh": fresh}, content)]

    def mkdir(self, rel: str) -> list[Record]:
        st = os.lstat(self.root / rel)
        return [("mkdir", {"path": rel, "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}, b"")]

    def symlink(self, rel: str) -> list[Record]:
        st = os.lstat(self.root / rel)
        return [("symlink", {"path": rel, "target": os.readlink(self.root / rel), "mtime_ns": st.st_mtime_ns}, b"")]

    def attr(self, rel: str) -> list[Record]:
        st = os.lstat(self.root / rel)
        return [("attr", {"path": rel, "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}, b"")]

    def delete(self, rel: str) -> list[Record]:
        self.shipped = {p: h for p, h in self.shipped.items() if p != rel and not p.startswith(rel + "/")}
        return [("delete", {"path": rel}, b"")]

    def rename(self, src: str, dst: str) -> list[Record]:
        moved = {}
        for p in list(self.shipped):
            if p == src or p.startswith(src + "/"):
                moved[dst + p[len(src):]] = self.shipped.pop(p)
        self.shipped = {p: h for p, h in self.shipped.items() if p != dst and not p.startswith(dst + "/")}
        self.shipped.update(moved)
        return [("rename", {"path": src, "dst": dst}, b"")]


@pytest.fixture
def nodes(tmp_path: Path) -> tuple[Path, Path, Active, Applier]:
    primary, secondary = tmp_path / "primary", tmp_path / "secondary"
    (primary / "srv/data").mkdir(parents=True)
    (secondary / "srv/data").mkdir(parents=True)
    return primary, secondary, Active(primary), Applier(secondary, TREES)


def apply_all(applier: Applier, records: list[Record]) -> list[bool]:
    return [applier.apply(op, meta, data) for op, meta, data in records]


def manifest(root: Path, tree: Tree = TREE) -> dict[str, Entry]:
    return {e.path: e for e in scan_tree(root, tree, block_size=BS, with_hashes=True)}


def assert_level(primary: Path, secondary: Path) -> None:
    a, b = manifest(primary), manifest(secondary)
    assert sorted(a) == sorted(b)
    for path, entry in a.items():
        assert same(entry, b[path]), f"{path}: active {entry} passive {b[path]}"


def write(path: Path, data: bytes, *, at: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if at is None:
        path.write_bytes(data)
        return
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)


# -- files -------------------------------------------------------------------------------

def test_a_file_created_modified_extended_and_truncated_arrives_whole_each_time(nodes) -> None:
    primary, secondary, active, applier = nodes
    f = primary / "srv/data/dir/file.bin"
    write(f, os.urandom(10 * BS + 100))
    assert apply_all(applier, active.mkdir("srv/data/dir") + active.file("srv/data/dir/file.bin"))[-1] is True
    assert_level(primary, secondary)

    write(f, b"middle", at=5 * BS + 7)
    records = active.file("srv/data/dir/file.bin")
    assert [r[0] for r in records] == ["data", "file"], "only the changed block ships"
    assert records[0][1]["offset"] == 5 * BS and records[0][1]["fresh"] is False
    assert apply_all(applier, records) == [False, True]
    assert (secondary / "srv/data/dir/file.bin").read_bytes() == f.read_bytes()

    with open(f, "ab") as fh:
        fh.write(os.urandom(3 * BS))
    apply_all(applier, active.file("srv/data/dir/file.bin"))
    assert_level(primary, secondary)

    os.truncate(f, 2 * BS + 1)
    records = active.file("srv/data/dir/file.bin")
    assert [r[0] for r in records] == ["data", "file"]  # the short last block
    apply_all(applier, records)
    os.truncate(f, 2 * BS)
    records = active.file("srv/data/dir/file.bin")
    assert [r[0] for r in records] == ["file"], "a truncation at a block edge ships no data"
    apply_all(applier, records)
    assert_level(primary, secondary)
    assert (secondary / "srv/data/dir/file.bin").read_bytes() == f.read_bytes()


def test_a_small_new_file_arrives_whole_in_one_record_and_replaces_what_was_there(nodes) -> None:
    primary, secondary, _, applier = nodes
    write(primary / "srv/data/d/small", os.urandom(3000))
    os.chmod(primary / "srv/data/d/small", 0o640)
    (secondary / "srv/data/d/small").mkdir(parents=True)  # a directory in its place goes
    st = os.stat(primary / "srv/data/d/small")
    data = (primary / "srv/data/d/small").read_bytes()
    meta = {"path": "srv/data/d/small", "gid": None, "size": len(data), "mode": 0o640,
            "mtime_ns": st.st_mtime_ns, "fresh": True}
    assert applier.apply("file", meta, data) is True
    applier.end_batch()
    assert (secondary / "srv/data/d/small").read_bytes() == data
    got = os.stat(secondary / "srv/data/d/small")
    assert (stat.S_IMODE(got.st_mode), got.st_mtime_ns) == (0o640, st.st_mtime_ns)
    assert os.listdir(secondary / "srv/data/.nf-stage") == []


def test_a_small_new_file_left_half_written_by_a_crash_is_whole_after_replay(nodes, tmp_path: Path) -> None:
    """A new small file is written under its own name (no stage); replay must still mend it."""
    _, secondary, _, applier = nodes
    data = os.urandom(5000)
    meta = {"path": "srv/data/d/new", "gid": None, "size": len(data), "mode": 0o644, "mtime_ns": 10**18,
            "fresh": True}
    assert applier.apply("file", meta, data) is True
    applier.end_batch()
    assert (secondary / "srv/data/d/new").read_bytes() == data
    assert not (secondary / "srv/data/.nf-stage").exists(), "a new small file needs no stage"

    torn = secondary / "srv/data/d/torn"  # what a crash between create and write leaves
    torn.write_bytes(data[:100])
    torn.chmod(0o600)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    (secondary / "srv/data/d/link").symlink_to(outside)
    for name in ("torn", "link"):
        assert applier.apply("file", dict(meta, path=f"srv/data/d/{name}"), data) is True
        applier.end_batch()
        got = secondary / "srv/data/d" / name
        assert not got.is_symlink() and got.read_bytes() == data
        st = os.stat(got)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o644, 10**18)
    assert outside.read_bytes() == b"not ours"
    assert os.listdir(secondary / "srv/data/.nf-stage") == []


def test_inline_content_that_is_not_the_whole_file_is_refused(nodes) -> None:
    _, secondary, _, applier = nodes
    meta = {"path": "srv/data/x", "gid": None, "size": 10, "mode": 0o644, "mtime_ns": 0, "fresh": True}
    with pytest.raises(ProtocolError, match=r"file: 4 bytes of content for a file of 10 bytes"):
        applier.apply("file", meta, b"abcd")
    with pytest.raises(ProtocolError, match="no gid"):
        applier.apply("file", dict(meta, size=4, gid=7), b"abcd")
    assert not (secondary / "srv/data/x").exists()


def test_an_empty_file_and_its_mode_and_mtime_arrive(nodes) -> None:
    primary, secondary, active, applier = nodes
    f = primary / "srv/data/empty"
    f.touch()
    os.chmod(f, 0o640)
    os.utime(f, ns=(1_000_000_000_123, 1_000_000_000_123))
    records = active.file("srv/data/empty")
    assert [r[0] for r in records] == ["file"]
    apply_all(applier, records)
    st = os.stat(secondary / "srv/data/empty")
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0, 0o640, 1_000_000_000_123)
    assert_level(primary, secondary)


def test_a_1_gib_sparse_file_arrives_sparse(nodes) -> None:
    primary, secondary, active, applier = nodes
    f = primary / "srv/data/disk.img"
    with open(f, "wb") as fh:
        fh.truncate(GIB)
        for at in (0, 300 << 20, GIB - (512 << 10)):
            fh.seek(at)
            fh.write(os.urandom(256 << 10))
    records = active.file("srv/data/disk.img")
    assert sum(len(r[2]) for r in records) == 3 * (256 << 10), "holes are not shipped"
    apply_all(applier, records)
    st = os.stat(secondary / "srv/data/disk.img")
    assert st.st_size == GIB
    assert st.st_blocks * 512 < 8 << 20, f"the replica is not sparse: {st.st_blocks * 512} bytes allocated"
    assert hash_file(secondary / "srv/data/disk.img", BS) == hash_file(f, BS)

    write(f, b"changed", at=600 << 20)
    apply_all(applier, active.file("srv/data/disk.img"))  # staged as a sparse copy, then renamed
    st = os.stat(secondary / "srv/data/disk.img")
    assert st.st_blocks * 512 < 8 << 20
    assert hash_file(secondary / "srv/data/disk.img", BS) == hash_file(f, BS)


def test_a_half_written_stage_never_shows_in_the_target(nodes) -> None:
    primary, secondary, active, applier = nodes
    f = primary / "srv/data/report.txt"
    write(f, b"A" * (8 * BS))
    apply_all(applier, active.file("srv/data/report.txt"))
    old = (secondary / "srv/data/report.txt").read_bytes()

    write(f, b"B" * (8 * BS))
    records = active.file("srv/data/report.txt")
    data_records = [r for r in records if r[0] == "data"]
    assert len(data_records) == 1 and len(data_records[0][2]) == 8 * BS
    half = ("data", data_records[0][1], data_records[0][2][: 4 * BS])
    assert apply_all(applier, [half]) == [False]
    assert (secondary / "srv/data/report.txt").read_bytes() == old, "the target shows a torn version"

    applier.discard_stages()  # a crash: the stage goes, replay starts at the group's first record
    assert os.listdir(secondary / "srv/data/.nf-stage") == []
    assert (secondary / "srv/data/report.txt").read_bytes() == old
    apply_all(applier, records)
    assert (secondary / "srv/data/report.txt").read_bytes() == b"B" * (8 * BS)


def test_the_stage_dir_is_private_and_not_in_the_manifest(nodes) -> None:
    primary, secondary, active, applier = nodes
    write(primary / "srv/data/a", b"x" * BS)
    apply_all(applier, active.file("srv/data/a"))
    st = os.stat(secondary / "srv/data/.nf-stage")
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert "srv/data/.nf-stage" not in manifest(secondary)
    with pytest.raises(PathError, match="stage"):
        applier.apply("delete", {"path": "srv/data/.nf-stage"})
    with pytest.raises(PathError, match="stage"):
        applier.apply("file", {"path": "srv/data/.nf-stage/1", "gid": None, "size": 0, "mode": 0o644,
                               "mtime_ns": 0, "fresh": True})


def test_a_file_replaces_a_directory_and_a_directory_replaces_a_file(nodes) -> None:
    primary, secondary, active, applier = nodes
    (secondary / "srv/data/x/deep").mkdir(parents=True)
    (secondary / "srv/data/x/deep/f").write_text("old")
    write(primary / "srv/data/x", b"now a file")
    apply_all(applier, active.file("srv/data/x"))
    assert (secondary / "srv/data/x").read_bytes() == b"now a file"

    os.unlink(primary / "srv/data/x")
    (primary / "srv/data/x").mkdir()
    apply_all(applier, active.mkdir("srv/data/x"))
    assert (secondary / "srv/data/x").is_dir()
    assert_level(primary, secondary)


# -- directories, renames, deletes, attributes --------------------------------------------

def test_renames_of_files_and_directories_replay_cleanly(nodes) -> None:
    primary, secondary, active, applier = nodes
    records: list[Record] = []
    (primary / "srv/data/d1/sub").mkdir(parents=True)
    write(primary / "srv/data/d1/sub/f", b"f" * 3000)
    write(primary / "srv/data/g", b"g")
    records += active.mkdir("srv/data/d1") + active.mkdir("srv/data/d1/sub")
    records += active.file("srv/data/d1/sub/f") + active.file("srv/data/g")
    apply_all(applier, records)

    moves: list[Record] = []
    os.rename(primary / "srv/data/g", primary / "srv/data/g2")
    moves += active.rename("srv/data/g", "srv/data/g2")
    os.rename(primary / "srv/data/d1", primary / "srv/data/d2")
    moves += active.rename("srv/data/d1", "srv/data/d2")
    (primary / "srv/data/d3").mkdir()
    moves += active.mkdir("srv/data/d3")
    os.rename(primary / "srv/data/d2/sub", primary / "srv/data/d3/sub")  # over nothing, into a new dir
    moves += active.rename("srv/data/d2/sub", "srv/data/d3/sub")
    apply_all(applier, moves)
    assert_level(primary, secondary)
    apply_all(applier, moves)  # replay after a crash before the applied position was saved
    assert_level(primary, secondary)


def test_a_directory_renamed_over_a_directory_replaces_it(nodes) -> None:
    primary, secondary, active, applier = nodes
    for d in ("a", "b"):
        (primary / "srv/data" / d).mkdir()
        write(primary / "srv/data" / d / "f", d.encode())
        apply_all(applier, active.mkdir(f"srv/data/{d}") + active.file(f"srv/data/{d}/f"))
    os.unlink(primary / "srv/data/b/f")
    records = active.delete("srv/data/b/f")
    os.rename(primary / "srv/data/a", primary / "srv/data/b")
    records += active.rename("srv/data/a", "srv/data/b")
    apply_all(applier, records)
    assert (secondary / "srv/data/b/f").read_bytes() == b"a"
    assert_level(primary, secondary)


def test_deletes_remove_files_and_whole_trees_without_following_symlinks(nodes, tmp_path: Path) -> None:
    primary, secondary, active, applier = nodes
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (secondary / "srv/data/t/u").mkdir(parents=True)
    (secondary / "srv/data/t/u/f").write_text("x")
    (secondary / "srv/data/t/link").symlink_to(outside)
    (secondary / "srv/data/lone").write_text("y")
    (secondary / "srv/data/empty").mkdir()

    for rel in ("srv/data/t", "srv/data/lone", "srv/data/empty", "srv/data/never-there"):
        assert applier.apply("delete", {"path": rel}) is True
        applier.apply("delete", {"path": rel})  # twice: a no-op
    assert [n for n in os.listdir(secondary / "srv/data") if n != ".nf-stage"] == []
    assert (outside / "precious").read_text() == "keep me"


def test_mkdir_creates_parents_and_attr_sets_mode_and_mtime(nodes) -> None:
    primary, secondary, active, applier = nodes
    applier.apply("mkdir", {"path": "srv/data/a/b/c", "mode": 0o750, "mtime_ns": 5})
    assert stat.S_IMODE(os.stat(secondary / "srv/data/a/b/c").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(secondary / "srv/data/a").st_mode) == 0o755

    write(primary / "srv/data/f", b"data")
    apply_all(applier, active.file("srv/data/f"))
    os.chmod(primary / "srv/data/f", 0o600)
    os.utime(primary / "srv/data/f", ns=(7_000_000_000, 7_000_000_000))
    apply_all(applier, active.attr("srv/data/f"))
    st = os.stat(secondary / "srv/data/f")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 7_000_000_000)

    applier.apply("attr", {"path": "srv/data/gone", "mode": 0o600, "mtime_ns": 1})  # missing: no-op
    assert not (secondary / "srv/data/gone").exists()
    applier.apply("attr", {"path": "srv/data", "mode": 0o711, "mtime_ns": 9})
    assert stat.S_IMODE(os.stat(secondary / "srv/data").st_mode) == 0o711


def test_symlinks_are_stored_verbatim_and_never_followed(nodes, tmp_path: Path) -> None:
    primary, secondary, active, applier = nodes
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("outside")
    os.symlink(outside / "target", primary / "srv/data/ln")
    os.utime(primary / "srv/data/ln", ns=(3_000_000_000, 3_000_000_000), follow_symlinks=False)
    apply_all(applier, active.symlink("srv/data/ln"))
    assert os.readlink(secondary / "srv/data/ln") == str(outside / "target")
    assert os.lstat(secondary / "srv/data/ln").st_mtime_ns == 3_000_000_000

    applier.apply("attr", {"path": "srv/data/ln", "mode": 0o600, "mtime_ns": 4_000_000_000})
    assert stat.S_IMODE(os.stat(outside / "target").st_mode) != 0o600, "attr followed the symlink"
    assert os.stat(outside / "target").st_mtime_ns != 4_000_000_000

    os.unlink(primary / "srv/data/ln")
    write(primary / "srv/data/ln", b"now a file")
    apply_all(applier, active.file("srv/data/ln"))  # replaces the link, not what it points at
    assert (outside / "target").read_text() == "outside"
    assert (secondary / "srv/data/ln").read_bytes() == b"now a file"

    os.unlink(primary / "srv/data/ln")
    os.symlink("../relative/elsewhere", primary / "srv/data/ln")
    apply_all(applier, active.symlink("srv/data/ln"))
    assert os.readlink(secondary / "srv/data/ln") == "../relative/elsewhere"
    assert_level(primary, secondary)


# -- replay ------------------------------------------------------------------------------

def test_replaying_a_whole_session_twice_gives_the_same_tree(nodes) -> None:
    primary, secondary, active, applier = nodes
    records: list[Record] = []
    (primary / "srv/data/docs").mkdir()
    records += active.mkdir("srv/data/docs")
    write(primary / "srv/data/docs/a.txt", os.urandom(5 * BS))
    records += active.file("srv/data/docs/a.txt")
    write(primary / "srv/data/docs/a.txt", b"edit", at=2 * BS)
    records += active.file("srv/data/docs/a.txt")
    os.symlink("a.txt", primary / "srv/data/docs/latest")
    records += active.symlink("srv/data/docs/latest")
    write(primary / "srv/data/b.bin", os.urandom(BS + 1))
    records += active.file("srv/data/b.bin")
    os.rename(primary / "srv/data/b.bin", primary / "srv/data/docs/b.bin")
    records += active.rename("srv/data/b.bin", "srv/data/docs/b.bin")
    os.chmod(primary / "srv/data/docs/b.bin", 0o600)
    records += active.attr("srv/data/docs/b.bin")
    (primary / "srv/data/tmp").mkdir()
    records += active.mkdir("srv/data/tmp")
    os.rmdir(primary / "srv/data/tmp")
    records += active.delete("srv/data/tmp")

    apply_all(applier, records)
    first = manifest(secondary)
    assert_level(primary, secondary)
    applier.discard_stages()
    apply_all(applier, records)
    assert_level(primary, secondary)
    assert all(same(first[p], e) for p, e in manifest(secondary).items())
    # a replay from the middle of the session (the first record after the last applied unit)
    apply_all(applier, records[3:])
    assert_level(primary, secondary)


def apply_then_crash(applier: Applier, records: list[Record]) -> int:
    """Apply `records` as the receiver does, committing only where the applier asks to, then
    crash before the final commit and replay everything after the last one; the number of
    commits made on the way."""
    start = done = commits = 0  # first record not committed; one past the last whole unit
    for i, (op, meta, data) in enumerate(records):
        if done > start and applier.needs_commit_before(op, meta):
            applier.committed()
            start, commits = done, commits + 1
        if applier.apply(op, meta, data):
            done = i + 1
    applier.discard_stages()  # the crash
    apply_all(applier, records[start:])
    return commits


def _random_story(primary: Path, active: Active, rng: random.Random, steps: int) -> list[Record]:
    """`steps` random changes on the active, over a few names so that paths come and go, each
    shipped as records once it succeeded (an impossible one, like renaming a directory into
    itself, is skipped as the file system refuses it)."""
    top = primary / "srv/data"
    records: list[Record] = []
    recent: list[str] = []  # half the time a change names a path one of the last few named

    def pick() -> str:
        if recent and rng.random() < 0.5:
            return rng.choice(recent[-4:])
        rel = "/".join(rng.choice("abcd") for _ in range(rng.randint(1, 3)))
        recent.append(rel)
        return rel

    def real_dir(rel: str) -> bool:  # no symlink on the way: the active writes there, not through one
        path = top
        for part in [p for p in rel.split("/") if p]:
            path = path / part
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        return True

    for _ in range(steps):
        rel = pick()
        path, name = top / rel, f"srv/data/{rel}"
        kind = rng.choice(["write", "write", "edit", "rename", "rename", "delete", "mkdir", "symlink", "chmod"])
        try:
            if not real_dir(rel.rpartition("/")[0]):
                continue
            exists = os.path.lexists(path)
            st = os.lstat(path) if exists else None
            if kind == "write" and (st is None or stat.S_ISREG(st.st_mode)):
                small = rng.random() < 0.5
                path.write_bytes(os.urandom(rng.choice([0, 100]) if small else INLINE_BYTES + rng.randrange(3 * BS)))
                records += active.whole(name) if small else active.file(name)
            elif kind == "edit" and st is not None and stat.S_ISREG(st.st_mode) and st.st_size:
                write(path, b"edit", at=rng.randrange(st.st_size))
                records += active.file(name)
            elif kind == "rename" and exists:
                dst = pick()
                if not real_dir(dst.rpartition("/")[0]):
                    continue
                os.rename(path, top / dst)
                records += active.rename(name, f"srv/data/{dst}")
            elif kind == "delete" and exists:
                shutil.rmtree(path) if stat.S_ISDIR(st.st_mode) else os.unlink(path)
                records += active.delete(name)
            elif kind == "mkdir" and not exists:
                path.mkdir(mode=rng.choice([0o755, 0o700]))
                records += active.mkdir(name)
            elif kind == "symlink" and not exists:
                os.symlink(rng.choice(["a", "../b", "c/d"]), path)
                records += active.symlink(name)
            elif kind == "chmod" and st is not None and not stat.S_ISLNK(st.st_mode):
                os.chmod(path, rng.choice([0o600, 0o644, 0o755]))
                records += active.attr(name)
        except OSError:
            continue  # refused by the file system: nothing changed, nothing to ship
    return records


def apply_with_crashes(secondary: Path, records: list[Record], rng: random.Random,
                       local_files: tuple[str, ...] = ()) -> int:
    """Apply `records` as the receiver does: batches end where the applier asks and at random
    unit ends (long ones, so that a replay has much to repeat), and the passive dies about once
    in ten records and replays from its last commit. Returns the number of crashes."""
    applier = Applier(secondary, TREES, local_files=local_files)
    i = start = done = crashes = 0  # next record; first not committed; one past the last whole unit
    first = rng.randrange(max(1, len(records)))  # one crash at least, anywhere
    while i < len(records):
        op, meta, data = records[i]
        if done > start and (rng.random() < 0.05 or applier.needs_commit_before(op, meta)):
            applier.committed()
            start = done
        # The passive dies before this record; a new process starts again at the last commit.
        if (i == first and not crashes) or rng.random() < 0.1:
            applier.discard_stages()
            applier = Applier(secondary, TREES, local_files=local_files)
            applier.discard_stages()
            i = done = start
            crashes += 1
            continue
        if apply_or_refuse(applier, op, meta, data):
            done = i + 1
        i += 1
    return crashes


def apply_or_refuse(applier: Applier, op: str, meta: dict[str, Any], data: bytes) -> bool:
    """As the receiver applies a record: a refused one (it changed nothing) is done with."""
    try:
        return applier.apply(op, meta, data)
    except (PathError, ProtocolError):
        return True


@pytest.mark.parametrize("seed", range(60))
def test_random_changes_end_level_however_often_the_passive_dies(nodes, seed: int) -> None:
    primary, secondary, active, _ = nodes
    rng = random.Random(seed)
    records = _random_story(primary, active, rng, steps=400)
    assert apply_with_crashes(secondary, records, rng) > 0
    assert_level(primary, secondary)


@pytest.mark.parametrize("seed", range(40))
def test_with_identity_files_a_passive_that_dies_ends_where_one_that_never_died_does(tmp_path: Path, seed: int) -> None:
    """The directories above this clone's identity files are deleted, renamed, renamed onto and
    replaced at random (some of it refused); crashes and replays change nothing of the outcome,
    and no identity file is ever lost."""
    local = ("/srv/data/*/id", "/srv/data/*/*/id")
    own = ("a/id", "b/c/id", "d/id")
    rng = random.Random(seed)
    primary = tmp_path / "primary"
    (primary / "srv/data").mkdir(parents=True)
    records = _random_story(primary, Active(primary), rng, steps=400)
    for clone in ("straight", "crashing"):
        for rel in own:
            write(tmp_path / clone / "srv/data" / rel, f"this clone's {rel}".encode())
            os.utime(tmp_path / clone / "srv/data" / rel, ns=(10**18, 10**18))
    straight = Applier(tmp_path / "straight", TREES, local_files=local)
    for op, meta, data in records:
        apply_or_refuse(straight, op, meta, data)
    assert apply_with_crashes(tmp_path / "crashing", records, rng, local) > 0
    a, b = manifest(tmp_path / "straight"), manifest(tmp_path / "crashing")
    assert sorted(a) == sorted(b)
    assert all(same(a[p], b[p]) for p in a), [p for p in a if not same(a[p], b[p])]
    for clone in ("straight", "crashing"):
        for rel in own:
            assert (tmp_path / clone / "srv/data" / rel).read_text() == f"this clone's {rel}", (clone, rel)


def _gone_and_back(primary: Path, active: Active, story: str) -> list[Record]:
    """The active's changes of one story, made on `primary`, as records."""
    d = primary / "srv/data"
    if story == "directory renamed, then made again":
        os.rename(d / "a", d / "b")
        (d / "a").mkdir()
        return active.rename("srv/data/a", "srv/data/b") + active.mkdir("srv/data/a")
    if story == "editor save (file renamed to a backup, then written anew)":
        os.rename(d / "log", d / "log~")
        write(d / "log", b"new version")
        return active.rename("srv/data/log", "srv/data/log~") + active.file("srv/data/log")
    if story == "log rotation":
        os.rename(d / "log.1", d / "log.2")
        os.rename(d / "log", d / "log.1")
        write(d / "log", os.urandom(INLINE_BYTES + 1))  # staged, in data records then a file record
        return (active.rename("srv/data/log.1", "srv/data/log.2") + active.rename("srv/data/log", "srv/data/log.1")
                + active.file("srv/data/log"))
    if story == "file deleted, another renamed into its place":
        os.unlink(d / "log")
        os.rename(d / "log.1", d / "log")
        return active.delete("srv/data/log") + active.rename("srv/data/log.1", "srv/data/log")
    if story == "a directory renamed over the parent of a file renamed away":
        os.rename(d / "a/f", d / "f")
        os.rmdir(d / "a")
        os.rename(d / "c", d / "a")
        return (active.rename("srv/data/a/f", "srv/data/f") + active.delete("srv/data/a")
                + active.rename("srv/data/c", "srv/data/a"))
    if story == "file edited in place, then renamed":
        write(d / "big", b"edit", at=BS)
        records = active.file("srv/data/big")
        assert records[0][1]["fresh"] is False  # changed blocks only, onto a copy of the old file
        os.rename(d / "big", d / "big.old")
        return records + active.rename("srv/data/big", "srv/data/big.old")
    if story == "file written, then another renamed over it":
        write(d / "log", b"written just before")
        records = active.file("srv/data/log")  # read before the rename, as the journaler does
        os.rename(d / "log.1", d / "log")
        return records + active.rename("srv/data/log.1", "srv/data/log")
    raise AssertionError(story)


@pytest.mark.parametrize("story, commits", [
    ("directory renamed, then made again", 1),
    ("editor save (file renamed to a backup, then written anew)", 1),
    ("log rotation", 2),  # log.1 comes back, then log
    ("file deleted, another renamed into its place", 1),
    ("a directory renamed over the parent of a file renamed away", 1),
    ("file edited in place, then renamed", 1),
    ("file written, then another renamed over it", 1),
])
def test_replay_after_a_crash_never_acts_on_what_came_to_a_path_later(
        nodes, story: str, commits: int) -> None:
    """Replay repeats every record after the last commit. Repeating "rename log to log.1"
    after a new log was written would move the new log over log.1: the applier asks for a
    commit before anything comes back to a path deleted or renamed away since the last one."""
    primary, secondary, active, applier = nodes
    d = primary / "srv/data"
    for name in ("a", "c"):
        (d / name).mkdir()
        write(d / name / "f", f"{name}'s content, committed before".encode())
    for name in ("log", "log.1"):
        write(d / name, f"{name}, committed before".encode())
    write(d / "big", os.urandom(INLINE_BYTES + 4 * BS))
    apply_all(applier, active.mkdir("srv/data/a") + active.mkdir("srv/data/c") + active.file("srv/data/a/f")
              + active.file("srv/data/c/f") + active.file("srv/data/log") + active.file("srv/data/log.1")
              + active.file("srv/data/big"))
    applier.committed()

    assert apply_then_crash(applier, _gone_and_back(primary, active, story)) == commits
    assert_level(primary, secondary)


def test_temp_files_renamed_into_place_and_other_changes_are_one_unit_of_replay(nodes) -> None:
    """No commit where replay is safe: a temp file (or symlink) written whole and renamed into
    place is made again by replay, and a rename of what no record touched moves nothing new."""
    primary, secondary, active, applier = nodes
    d = primary / "srv/data"
    for name in ("x", "conf", "large"):
        write(d / name, f"{name}, committed before".encode())
    os.symlink("x", d / "current")
    apply_all(applier, active.file("srv/data/x") + active.file("srv/data/conf") + active.file("srv/data/large")
              + active.symlink("srv/data/current"))
    applier.committed()
    records: list[Record] = []
    os.rename(d / "x", d / "y")
    records += active.rename("srv/data/x", "srv/data/y")
    write(d / "y", b"y, edited")
    records += active.file("srv/data/y")
    write(d / ".conf.tmp", b"saved atomically")
    records += active.file("srv/data/.conf.tmp")
    os.rename(d / ".conf.tmp", d / "conf")
    records += active.rename("srv/data/.conf.tmp", "srv/data/conf")
    write(d / ".large.tmp", os.urandom(INLINE_BYTES + 1))  # staged, from data records
    records += active.file("srv/data/.large.tmp")
    os.rename(d / ".large.tmp", d / "large")
    records += active.rename("srv/data/.large.tmp", "srv/data/large")
    os.symlink("y", d / ".current.tmp")
    records += active.symlink("srv/data/.current.tmp")
    os.rename(d / ".current.tmp", d / "current")
    records += active.rename("srv/data/.current.tmp", "srv/data/current")
    assert apply_then_crash(applier, records) == 0
    assert_level(primary, secondary)


# -- refused input -----------------------------------------------------------------------

@pytest.mark.parametrize("path, reason", [
    ("../x", "'..' component"),
    ("/etc/passwd", "absolute path"),
    ("srv/data/../../x", "'..' component"),
    ("srv/other/x", "outside the protected set"),
    ("srv/data/./x", "'.' component"),
    ("srv/data//x", "empty component"),
    ("srv/data/x/", "empty component"),
    ("srv/data", "tree's root"),
    ("srv/data\x00/x", "NUL"),
    ("", "empty path"),
    (42, "expected a string"),
])
def test_forged_paths_are_refused(nodes, path: object, reason: str) -> None:
    _, secondary, _, applier = nodes
    with pytest.raises(PathError, match=reason):
        applier.apply("file", {"path": path, "gid": None, "size": 1, "mode": 0o644, "mtime_ns": 0, "fresh": True})
    with pytest.raises(PathError, match=reason):
        check_rel_path(path, TREES)


@pytest.mark.parametrize("op, meta, data", [
    ("data", {"path": "srv/data/link/x", "gid": 1, "offset": 0, "fresh": False}, b"evil"),
    ("file", {"path": "srv/data/link/x", "gid": None, "size": 4, "mode": 0o644, "mtime_ns": 0, "fresh": True}, b""),
    ("mkdir", {"path": "srv/data/link/d", "mode": 0o755, "mtime_ns": 0}, b""),
    ("symlink", {"path": "srv/data/link/s", "target": "/", "mtime_ns": 0}, b""),
    ("delete", {"path": "srv/data/link/victim"}, b""),
    ("attr", {"path": "srv/data/link/victim", "mode": 0o777, "mtime_ns": 0}, b""),
    ("rename", {"path": "srv/data/link/victim", "dst": "srv/data/stolen"}, b""),
    ("rename", {"path": "srv/data/mine", "dst": "srv/data/link/planted"}, b""),
])
def test_a_symlinked_directory_in_the_replica_is_never_written_through(nodes, tmp_path: Path, op, meta, data) -> None:
    _, secondary, _, applier = nodes
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    os.chmod(outside / "victim", 0o644)
    (secondary / "srv/data/link").symlink_to(outside)
    (secondary / "srv/data/mine").write_text("mine")
    with pytest.raises(PathError, match="symlink escape"):
        applier.apply(op, meta, data)
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "keep me"
    assert stat.S_IMODE(os.stat(outside / "victim").st_mode) == 0o644
    assert (secondary / "srv/data/mine").read_text() == "mine"


def test_open_parent_walks_without_following_symlinks(tmp_path: Path) -> None:
    (tmp_path / "srv/data/d").mkdir(parents=True)
    (tmp_path / "srv/data/ln").symlink_to(tmp_path / "srv/data/d")
    fd, name = open_parent(tmp_path, "srv/data/d/f")
    os.close(fd)
    assert name == "f"
    with pytest.raises(PathError, match="symlink escape"):
        open_parent(tmp_path, "srv/data/ln/f")
    with pytest.raises(FileNotFoundError):
        open_parent(tmp_path, "srv/data/missing/f")


@pytest.mark.parametrize("op, meta, message", [
    ("explode", {"path": "srv/data/x"}, "unknown op 'explode'"),
    ("data", {"path": "srv/data/x", "gid": "1", "offset": 0, "fresh": True}, r"data\.gid: expected an integer"),
    ("data", {"path": "srv/data/x", "gid": 1, "offset": -1, "fresh": True}, r"data\.offset: expected an integer in"),
    ("data", {"path": "srv/data/x", "gid": 1, "offset": 0, "fresh": 1}, r"data\.fresh: expected true or false"),
    ("file", {"path": "srv/data/x", "gid": None, "size": 0, "mode": 0o10000, "mtime_ns": 0, "fresh": True},
     r"file\.mode: expected an integer in"),
    ("file", {"path": "srv/data/x", "gid": None, "size": 0, "mode": 0o644, "fresh": True},
     r"file\.mtime_ns: expected an integer"),
    ("symlink", {"path": "srv/data/x", "target": "", "mtime_ns": 0}, r"symlink\.target: expected a non-empty"),
    ("rename", {"path": "srv/data/x"}, r"rename\.dst: expected a path"),
    ("mkdir", {"path": "srv/data/x", "mode": True, "mtime_ns": 0}, r"mkdir\.mode: expected an integer"),
])
def test_malformed_records_are_refused_naming_the_field(nodes, op, meta, message) -> None:
    _, secondary, _, applier = nodes
    with pytest.raises(ProtocolError, match=message):
        applier.apply(op, meta)
    assert not (secondary / "srv/data/x").exists()


def test_renaming_a_directory_into_itself_is_refused(nodes) -> None:
    _, secondary, _, applier = nodes
    (secondary / "srv/data/a").mkdir()
    with pytest.raises(PathError, match="being renamed"):
        applier.apply("rename", {"path": "srv/data/a", "dst": "srv/data/a/b"})
    assert (secondary / "srv/data/a").is_dir()


# -- manifests ---------------------------------------------------------------------------

def test_equal_trees_are_equal_and_one_changed_byte_is_found(nodes) -> None:
    primary, secondary, active, applier = nodes
    records: list[Record] = []
    (primary / "srv/data/d").mkdir()
    records += active.mkdir("srv/data/d")
    for i in range(5):
        write(primary / f"srv/data/d/f{i}", os.urandom(3 * BS + i))
        records += active.file(f"srv/data/d/f{i}")
    apply_all(applier, records)
    assert_level(primary, secondary)

    victim = secondary / "srv/data/d/f3"
    st = os.stat(victim)
    write(victim, b"\x00" if victim.read_bytes()[BS] != 0 else b"\x01", at=BS)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only hashes tell
    a, b = manifest(primary), manifest(secondary)
    differing = [p for p in a if not same(a[p], b[p])]
    assert differing == ["srv/data/d/f3"]
    assert same(a["srv/data/d/f3"], b["srv/data/d/f3"], mtime=False) is False


def test_scan_tree_filters_walks_subtrees_and_reuses_known_hashes(tmp_path: Path) -> None:
    tree = Tree("/srv/data", exclude=("cache/", "*.tmp"))
    base = tmp_path / "srv/data"
    (base / "cache/x").mkdir(parents=True)
    (base / "keep/in").mkdir(parents=True)
    (base / "cache/x/big").write_bytes(b"c")
    (base / "keep/in/a").write_bytes(b"a" * 10)
    (base / "keep/in/b.tmp").write_bytes(b"b")
    (base / "keep/ln").symlink_to("/etc")
    (base / ".nf-stage").mkdir()
    (base / ".nf-stage/1").write_bytes(b"half")

    entries = list(scan_tree(tmp_path, tree, block_size=BS, with_hashes=False))
    assert [(e.path, e.kind) for e in entries] == [
        ("srv/data", "dir"), ("srv/data/keep", "dir"), ("srv/data/keep/in", "dir"),
        ("srv/data/keep/in/a", "file"), ("srv/data/keep/ln", "symlink"),
    ]
    assert entries[-1].target == "/etc"
    assert entries[3].hashes is None and entries[3].size == 10

    only = [e.path for e in scan_tree(tmp_path, tree, block_size=BS, with_hashes=True, only="keep/in")]
    assert only == ["srv/data/keep/in", "srv/data/keep/in/a"]
    assert list(scan_tree(tmp_path, tree, block_size=BS, with_hashes=True, only="keep/ln/passwd")) == []
    assert list(scan_tree(tmp_path, tree, block_size=BS, with_hashes=True, only="cache/x")) == []
    assert list(scan_tree(tmp_path, Tree("/nowhere"), block_size=BS, with_hashes=True)) == []

    st = os.stat(base / "keep/in/a")
    known = Entry("srv/data/keep/in/a", "file", 0o644, 10, st.st_mtime_ns, None, b"K" * 16)
    reused = {e.path: e for e in scan_tree(tmp_path, tree, block_size=BS, with_hashes=True,
                                           reuse={known.path: known}.get)}
    assert reused["srv/data/keep/in/a"].hashes == b"K" * 16
    stale = Entry(known.path, "file", 0o644, 10, st.st_mtime_ns - 1, None, b"K" * 16)
    rehashed = {e.path: e for e in scan_tree(tmp_path, tree, block_size=BS, with_hashes=True,
                                             reuse={stale.path: stale}.get)}
    assert rehashed["srv/data/keep/in/a"].hashes == hash_file(base / "keep/in/a", BS)


def test_the_real_protected_tree_filters_the_same_way(tmp_path: Path) -> None:
    config = pytest.importorskip("engine.config")
    tree = config.ProtectedTree("/srv/data", exclude=("cache/", "*.tmp"))
    base = tmp_path / "srv/data"
    (base / "cache").mkdir(parents=True)
    (base / "cache/f").write_text("c")
    (base / "a.tmp").write_text("t")
    (base / "a").write_text("a")
    (base / ".nf-stage").mkdir()
    assert [e.path for e in scan_tree(tmp_path, tree, block_size=BS, with_hashes=True)] == ["srv/data", "srv/data/a"]


def test_entries_round_trip_through_json_and_bad_fields_are_named() -> None:
    e = Entry("srv/data/a", "file", 0o644, 5, 123, None, b"\x01" * 32)
    assert Entry.from_json(e.to_json()) == e
    s = Entry("srv/data/s", "symlink", 0o777, 0, 1, "/etc")
    assert Entry.from_json(s.to_json()) == s
    for field, value, message in [
        ("kind", "fifo", "entry.kind"), ("mode", "644", "entry.mode"), ("size", -1, "entry.size"),
        ("hashes", "abc", "entry.hashes"), ("hashes", "zz" * 16, "entry.hashes"), ("target", "/x", "entry.target"),
        ("path", None, "entry.path"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            Entry.from_json({**e.to_json(), field: value})


def test_records_for_node_local_identity_files_are_refused(tmp_path: Path) -> None:
    """Defence in depth: the active never ships them, and the passive refuses them anyway."""
    secondary = tmp_path / "secondary"
    (secondary / "srv/data").mkdir(parents=True)
    applier = Applier(secondary, TREES, local_files=("/srv/data/machine-id", "/srv/data/keys/*"))
    meta = {"gid": None, "size": 2, "mode": 0o644, "mtime_ns": 0, "fresh": True}
    for path in ("srv/data/machine-id", "srv/data/keys/host_key"):
        with pytest.raises(PathError, match="node-local identity file"):
            applier.apply("file", dict(meta, path=path), b"no")
        assert not (secondary / path).exists()
    for path in ("srv/data/machine-id.bak", "srv/data/keysx"):
        assert applier.apply("file", dict(meta, path=path), b"ok") is True
        assert (secondary / path).read_bytes() == b"ok"


LOCAL = ("/srv/data/conf/machine-id", "/srv/data/conf/ssh/*_key")
IDENTITY_TREE = Tree("/srv/data", exclude=("machine-id", "*_key"))  # as local_trees adds them


def _clone_with_identity(tmp_path: Path) -> tuple[Path, Applier]:
    """A passive whose conf/ holds two identity files among replicated ones."""
    root = tmp_path / "secondary"
    conf = root / "srv/data/conf"
    (conf / "ssh").mkdir(parents=True)
    (conf / "app").mkdir()
    (conf / "machine-id").write_text("secondary's id\n")
    (conf / "ssh/host_key").write_text("secondary's key\n")
    (conf / "ssh/known_hosts").write_text("replicated\n")
    (conf / "app/settings").write_text("replicated\n")
    (conf / "top").write_text("replicated\n")
    return root, Applier(root, TREES, local_files=LOCAL)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_deleting_a_directory_keeps_the_identity_files_below_it(tmp_path: Path) -> None:
    root, applier = _clone_with_identity(tmp_path)
    assert applier.apply("delete", {"path": "srv/data/conf"}) is True
    assert _files(root) == {"srv/data/conf/machine-id", "srv/data/conf/ssh/host_key"}
    assert (root / "srv/data/conf/ssh/host_key").read_text() == "secondary's key\n"
    assert not (root / "srv/data/conf/app").exists()  # nothing of its own below: gone
    # What stays is no difference for verify: the passive's manifest keeps apart directories that
    # hold only identity files, while an empty directory of the tree's own is still listed.
    (root / "srv/data/empty").mkdir()
    entries = list(scan_tree(root, IDENTITY_TREE, block_size=BS, with_hashes=False))
    assert "srv/data/conf/ssh" in [e.path for e in entries]
    listed, kept = split_identity_dirs(root, "srv/data", entries, LOCAL)
    assert [e.path for e in listed] == ["srv/data", "srv/data/empty"]
    assert sorted(e.path for e in kept) == ["srv/data/conf", "srv/data/conf/ssh"]
    assert diff({e.path: e for e in listed}, {e.path: e for e in listed}, kept=kept) == []


def test_renaming_a_directory_leaves_the_identity_files_where_they_were(tmp_path: Path) -> None:
    root, applier = _clone_with_identity(tmp_path)
    assert applier.apply("rename", {"path": "srv/data/conf", "dst": "srv/data/conf.old"}) is True
    assert _files(root) == {
        "srv/data/conf/machine-id", "srv/data/conf/ssh/host_key",
        "srv/data/conf.old/ssh/known_hosts", "srv/data/conf.old/app/settings", "srv/data/conf.old/top",
    }
    assert (root / "srv/data/conf/machine-id").read_text() == "secondary's id\n"


def test_renaming_a_directory_with_identity_files_again_after_a_crash_keeps_every_file(tmp_path: Path) -> None:
    """Replay repeats the rename: what already moved stays moved and nothing is lost, whether
    the crash came after the whole rename or part-way through it."""
    root, applier = _clone_with_identity(tmp_path)
    rename = {"path": "srv/data/conf", "dst": "srv/data/conf.old"}
    applier.apply("rename", rename)
    done = {p: (root / p).read_bytes() for p in _files(root)}
    applier.apply("rename", rename)
    assert {p: (root / p).read_bytes() for p in _files(root)} == done

    root, applier = _clone_with_identity(tmp_path / "part-way")
    (root / "srv/data/conf.old/ssh").mkdir(parents=True, mode=0o700)  # the crash came after these
    os.rename(root / "srv/data/conf/ssh/known_hosts", root / "srv/data/conf.old/ssh/known_hosts")
    os.rename(root / "srv/data/conf/top", root / "srv/data/conf.old/top")
    applier.apply("rename", rename)
    assert {p: (root / p).read_bytes() for p in _files(root)} == done
    assert stat.S_IMODE((root / "srv/data/conf.old/ssh").stat().st_mode) == \
        stat.S_IMODE((root / "srv/data/conf/ssh").stat().st_mode)


def test_a_directory_renamed_onto_one_that_kept_identity_files_joins_them(tmp_path: Path) -> None:
    """`mv conf conf.old; mv conf.new conf` on the active (a package upgrade): on the clone,
    conf kept its identity files, and what conf.new brings goes in around them."""
    root, applier = _clone_with_identity(tmp_path)
    applier.apply("rename", {"path": "srv/data/conf", "dst": "srv/data/conf.old"})
    new = root / "srv/data/conf.new"
    (new / "ssh").mkdir(parents=True)
    (new / "ssh/sshd_config").write_text("new\n")
    (new / "top").write_text("new top\n")
    (new / "machine-id").write_text("the active's id, at an identity path\n")
    rename = {"path": "srv/data/conf.new", "dst": "srv/data/conf"}
    assert applier.apply("rename", rename) is True
    after = {p: (root / p).read_text() for p in _files(root)}
    assert {p: t for p, t in after.items() if p.startswith("srv/data/conf/")} == {
        "srv/data/conf/machine-id": "secondary's id\n", "srv/data/conf/ssh/host_key": "secondary's key\n",
        "srv/data/conf/ssh/sshd_config": "new\n", "srv/data/conf/top": "new top\n"}
    assert not new.exists()
    applier.apply("rename", rename)  # replayed
    assert {p: (root / p).read_text() for p in _files(root)} == after


def test_after_a_refused_record_the_passive_commits_before_the_tree_changes(tmp_path: Path) -> None:
    """Refused once, a record might apply when replayed onto a tree changed since: here a link
    renamed onto conf (which kept identity files) is refused, but renamed again once `new` is
    a directory it would merge into conf and give conf its mode. Found by the random test."""
    root, applier = _clone_with_identity(tmp_path)
    os.chmod(root / "srv/data/conf", 0o755)
    applier.apply("symlink", {"path": "srv/data/new", "target": "x", "mtime_ns": 0})
    applier.committed()
    with pytest.raises(PathError, match="srv/data/conf"):
        applier.apply("rename", {"path": "srv/data/new", "dst": "srv/data/conf"})
    mkdir = {"path": "srv/data/new", "mode": 0o700, "mtime_ns": 0}
    assert applier.needs_commit_before("mkdir", mkdir)
    applier.committed()
    assert applier.apply("mkdir", mkdir) and not applier.needs_commit_before("mkdir", {"path": "srv/data/x"})
    assert stat.S_IMODE((root / "srv/data/conf").stat().st_mode) == 0o755


def test_a_merge_that_would_put_a_file_where_identity_files_are_is_refused_whole(tmp_path: Path) -> None:
    root, applier = _clone_with_identity(tmp_path)
    applier.apply("rename", {"path": "srv/data/conf", "dst": "srv/data/conf.old"})
    (root / "srv/data/conf.new/app").mkdir(parents=True)
    (root / "srv/data/conf.new/app/settings").write_text("new\n")
    (root / "srv/data/conf.new/ssh").write_text("a file where conf/ssh keeps a host key\n")
    before = {p: (root / p).read_bytes() for p in _files(root)}
    with pytest.raises(PathError, match="srv/data/conf/ssh.*node-local identity file"):
        applier.apply("rename", {"path": "srv/data/conf.new", "dst": "srv/data/conf"})
    assert {p: (root / p).read_bytes() for p in _files(root)} == before


@pytest.mark.parametrize("op, meta, data", [
    ("file", {"path": "srv/data/conf", "gid": None, "size": 2, "mode": 0o644, "mtime_ns": 0, "fresh": True}, b"no"),
    ("symlink", {"path": "srv/data/conf", "target": "elsewhere", "mtime_ns": 0}, b""),
    ("rename", {"path": "srv/data/other", "dst": "srv/data/conf"}, b""),
])
def test_replacing_a_directory_that_holds_identity_files_is_refused_whole(
        tmp_path: Path, op: str, meta: dict[str, Any], data: bytes) -> None:
    root, applier = _clone_with_identity(tmp_path)
    (root / "srv/data/other").write_text("would replace conf\n")
    before = {p: (root / p).read_bytes() for p in _files(root)}
    with pytest.raises(PathError, match="srv/data/conf/.*node-local identity file"):
        applier.apply(op, meta, data)
    applier.end_batch()
    assert {p: (root / p).read_bytes() for p in _files(root)} == before


def test_without_identity_files_a_directory_goes_whole(tmp_path: Path) -> None:
    root, _ = _clone_with_identity(tmp_path)
    assert Applier(root, TREES).apply("delete", {"path": "srv/data/conf"}) is True
    assert not (root / "srv/data/conf").exists()


def _listing(root: Path, local: tuple[str, ...]) -> tuple[dict[str, Entry], list[Entry]]:
    """A passive's manifest as it answers an active: entries listed, and identity-only
    directories kept apart."""
    entries = list(scan_tree(root, Tree("/srv/data", exclude=("id", "machine-id", "*_key")), block_size=BS,
                             with_hashes=True))
    listed, kept = split_identity_dirs(root, "srv/data", entries, local)
    return {e.path: e for e in listed}, kept


def test_a_directory_that_holds_only_identity_files_on_the_clone_matches_the_actives(tmp_path: Path) -> None:
    """The active's conf/ is empty (or holds only its own identity files), the clone's holds its
    identity files: the same directory, so no difference, while its mode still counts."""
    primary, _ = _clone_with_identity(tmp_path / "p")
    secondary, applier = _clone_with_identity(tmp_path / "s")
    for rel in ("ssh/known_hosts", "app/settings", "top"):
        (primary / "srv/data/conf" / rel).unlink()
        applier.apply("delete", {"path": f"srv/data/conf/{rel}"})
    (primary / "srv/data/conf/app").rmdir()
    applier.apply("delete", {"path": "srv/data/conf/app"})
    (primary / "srv/data/conf/machine-id").unlink()  # the active's own: not replicated
    active = manifest(primary, IDENTITY_TREE)
    assert {"srv/data/conf", "srv/data/conf/ssh"} <= set(active)
    listed, kept = _listing(secondary, LOCAL)
    assert "srv/data/conf" not in listed and "srv/data/conf/ssh" in {e.path for e in kept}
    assert diff(active, listed, kept=kept) == []
    assert [d.kind for d in diff(active, listed)] == ["missing", "missing"]  # what verify used to report
    # A directory the active no longer has at all is none either: the clone keeps it for its files.
    shutil.rmtree(primary / "srv/data/conf")
    assert diff(manifest(primary, IDENTITY_TREE), listed, kept=kept) == []
    # Where the active has the directory, its mode is compared, and the repair makes it so.
    (primary / "srv/data/conf/ssh").mkdir(parents=True, mode=0o700)
    os.chmod(primary / "srv/data/conf/ssh", 0o700)
    differences = diff(manifest(primary, IDENTITY_TREE), listed, kept=kept)
    assert [(d.path, d.kind) for d in differences] == [("srv/data/conf/ssh", "mode")]
    apply_all(applier, list(repair_records(primary, differences, trees=TREES, block_size=BS, chunk=CHUNK)))
    listed, kept = _listing(secondary, LOCAL)
    assert diff(manifest(primary, IDENTITY_TREE), listed, kept=kept) == []
    assert (secondary / "srv/data/conf/ssh/host_key").read_text() == "secondary's key\n"


IDS = ("a/id", "b/c/id", "d/id")


@pytest.mark.parametrize("seed", range(150))
def test_a_sync_onto_a_clone_with_identity_files_ends_level_and_keeps_them(tmp_path: Path, seed: int) -> None:
    """Two random trees, identity files wherever the clone can hold them: the repair keeps every
    one of them, and unless it refused something (a file where they stand), nothing is left to
    report, however the directories around them differ."""
    rng = random.Random(seed)
    primary, secondary = tmp_path / "primary", tmp_path / "secondary"
    for root in (primary, secondary):
        (root / "srv/data").mkdir(parents=True)
        _random_story(root, Active(root), rng, steps=150)
    mine = []
    for rel in IDS:
        d = secondary / "srv/data"
        for part in rel.split("/")[:-1]:  # real directories all the way, made where nothing is
            d = d / part
            if not os.path.lexists(d):
                d.mkdir()
            elif not stat.S_ISDIR(os.lstat(d).st_mode):
                break
        else:
            if not os.path.lexists(d / "id"):
                (d / "id").write_text("the clone's own")
                mine.append(d / "id")
    local = ("/srv/data/*/id", "/srv/data/*/*/id")
    applier = Applier(secondary, TREES, local_files=local)
    refused = 0
    listed, kept = _listing(secondary, local)
    for op, meta, data in repair_records(primary, diff(manifest(primary, IDENTITY_TREE), listed, kept=kept),
                                         trees=TREES, block_size=BS, chunk=CHUNK):
        try:
            applier.apply(op, meta, data)
        except (PathError, ProtocolError):
            refused += 1
    assert all(p.read_text() == "the clone's own" for p in mine)
    if not refused:
        listed, kept = _listing(secondary, local)
        assert diff(manifest(primary, IDENTITY_TREE), listed, kept=kept) == []


def test_a_sync_ships_small_new_files_grouped_and_the_passive_ends_level(nodes) -> None:
    primary, secondary, _, applier = nodes
    for d in range(3):
        (primary / f"srv/data/d{d}").mkdir()
        for i in range(GROUP_FILES):
            (primary / f"srv/data/d{d}/f{i}").write_bytes(os.urandom(i * 7))  # empty ones too
    (primary / "srv/data/d1/big").write_bytes(os.urandom(INLINE_BYTES + 1))  # staged in data records
    differences = diff(manifest(primary), manifest(secondary))
    records = list(repair_records(primary, differences, trees=TREES, block_size=BS, chunk=CHUNK))
    grouped = [meta["files"] for op, meta, _ in records if op == "files"]
    assert sum(len(g) for g in grouped) == 3 * GROUP_FILES
    assert max(len(g) for g in grouped) == GROUP_FILES
    assert [op for op, _, _ in records].count("file") == 1  # the large one, after its data
    apply_all(applier, records)
    assert_level(primary, secondary)


def test_grouped_small_files_stay_within_a_chunk_so_a_batch_fits_a_frame(nodes) -> None:
    primary, secondary, _, applier = nodes
    for i in range(20):
        (primary / f"srv/data/f{i:02d}").write_bytes(os.urandom(INLINE_BYTES - 4096))
    chunk = 4 * INLINE_BYTES
    records = list(repair_records(primary, diff(manifest(primary), manifest(secondary)), trees=TREES, block_size=BS,
                                  chunk=chunk))
    assert all(op == "files" for op, _, _ in records)
    assert [len(meta["files"]) for _, meta, _ in records] == [4, 4, 4, 4, 4]
    assert max(len(data) for _, _, data in records) <= chunk
    apply_all(applier, records)
    assert_level(primary, secondary)


@pytest.mark.parametrize("seed", range(30))
def test_a_sync_between_two_random_trees_ends_level(tmp_path: Path, seed: int) -> None:
    """Whatever stands where on either side (a file where a directory is, a link where a file
    is, deep trees on one side only), the differences' repair records make the passive level."""
    rng = random.Random(seed)
    trees = {}
    for name in ("primary", "secondary"):
        root = tmp_path / name
        (root / "srv/data").mkdir(parents=True)
        _random_story(root, Active(root), rng, steps=150)
        trees[name] = root
    primary, secondary = trees["primary"], trees["secondary"]
    records = list(repair_records(primary, diff(manifest(primary), manifest(secondary)), trees=TREES, block_size=BS, chunk=CHUNK))
    apply_all(Applier(secondary, TREES), records)
    assert_level(primary, secondary)


@pytest.mark.parametrize("files, data, message", [
    ([], b"", r"files\.files: expected a non-empty list"),
    ([["srv/data/a", 1, 0o644]], b"x", r"files\.files\[0\]: expected \[path, size, mode, mtime_ns\]"),
    ([["srv/data/a", 1, 0o644, 0], ["srv/data/b", 2, 0o644, 0]], b"xy", r"files\.files\[1\]\.size: expected an integer in 0\.\.1"),
    ([["srv/data/a", 1, 0o644, 0], ["srv/data/b", 1, 0o644, "0"]], b"xy", r"files\.files\[1\]\.mtime_ns: expected an integer"),
    ([["srv/data/a", 1, 0o644, 0]], b"xy", r"files: 2 bytes of content for files of 1 bytes"),
])
def test_malformed_files_records_are_refused_whole_naming_the_entry(nodes, files, data, message) -> None:
    _, secondary, _, applier = nodes
    with pytest.raises(ProtocolError, match=message):
        applier.apply("files", {"files": files}, data)
    assert not (secondary / "srv/data/a").exists()


def test_a_forged_path_among_grouped_files_refuses_them_all(nodes) -> None:
    _, secondary, _, applier = nodes
    files = [["srv/data/a", 1, 0o644, 0], ["srv/data/../../etc/passwd", 1, 0o644, 0]]
    with pytest.raises(PathError):
        applier.apply("files", {"files": files}, b"xy")
    assert not (secondary / "srv/data/a").exists()


def test_a_repair_list_read_whole_or_abandoned_leaves_no_file_open(nodes) -> None:
    """Small files are opened ahead of their reading (to announce them to the kernel)."""
    primary, secondary, _, _ = nodes
    for i in range(200):
        (primary / f"srv/data/f{i}").write_bytes(b"x" * i)
    differences = diff(manifest(primary), manifest(secondary))
    before = len(os.listdir("/proc/self/fd"))
    assert sum(len(m["files"]) for _, m, _ in repair_records(primary, differences, trees=TREES, block_size=BS, chunk=CHUNK)) == 200
    assert len(os.listdir("/proc/self/fd")) == before
    records = repair_records(primary, differences, trees=TREES, block_size=BS, chunk=CHUNK)
    next(records)
    assert len(os.listdir("/proc/self/fd")) > before  # the next ones are open, announced
    records.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_passive_of_an_older_version_gets_small_files_one_record_each(nodes) -> None:
    """A passive whose hello lists no "files" op (before it existed) would refuse the group."""
    primary, secondary, _, applier = nodes
    (primary / "srv/data/d").mkdir()
    for i in range(GROUP_FILES + 3):
        (primary / f"srv/data/d/f{i}").write_bytes(os.urandom(i))
    differences = diff(manifest(primary), manifest(secondary))
    records = list(repair_records(primary, differences, trees=TREES, block_size=BS, chunk=CHUNK, grouped=False))
    assert "files" not in {op for op, _, _ in records}
    assert [op for op, _, _ in records].count("file") == GROUP_FILES + 3
    apply_all(applier, records)
    assert_level(primary, secondary)


# -- a rescan of what changed behind the watcher ----------------------------------------------

def _rescan_and_apply(primary: Path, state: State, journaler: Journaler, applier: Applier, after: int) -> int:
    """Rescan the active's tree and apply every record it journals; a refused one fails the test."""
    journaler.process([Change("rescan", "srv/data", is_dir=True)])
    records = read_journal(state.db, after, 1_000_000, 1 << 40)
    for r in records:
        applier.apply(r.op, r.meta, bytes(r.data))  # raises on a refusal
    applier.end_batch()
    return records[-1].seq if records else after


def test_a_rescan_deletes_below_a_directory_before_it_replaces_that_directory(nodes, tmp_path: Path) -> None:
    """A directory replaced by a symlink while the watcher was not looking (an agent restarted,
    a queue overflowed): the deletes of what it held come before the symlink, not after it,
    where the passive would refuse them as a way out of the tree."""
    primary, secondary, _, applier = nodes
    state = State(tmp_path / "state")
    journaler = Journaler(state.connect(), primary, TREES[:1], ReplicationSettings(block_size=BS))
    for name in "bcd":
        write(primary / f"srv/data/c/{name}", name.encode())
    seq = _rescan_and_apply(primary, state, journaler, applier, 0)
    assert_level(primary, secondary)
    shutil.rmtree(primary / "srv/data/c")
    os.symlink("c/d", primary / "srv/data/c")
    seq = _rescan_and_apply(primary, state, journaler, applier, seq)
    assert_level(primary, secondary)
    ops = [(r.op, r.meta["path"]) for r in read_journal(state.db, 0, 1000)][-4:]
    assert ops[-1] == ("symlink", "srv/data/c"), ops


@pytest.mark.parametrize("seed", range(40))
def test_rescans_of_random_changes_made_behind_the_watcher_bring_the_passive_level(nodes, tmp_path: Path,
                                                                                    seed: int) -> None:
    """Whatever changed between two rescans, the records of the second apply without a refusal
    and the passive ends level."""
    primary, secondary, active, applier = nodes
    state = State(tmp_path / "state")
    journaler = Journaler(state.connect(), primary, TREES[:1], ReplicationSettings(block_size=BS))
    rng = random.Random(seed)
    seq = 0
    for _ in range(4):
        _random_story(primary, active, rng, steps=40)  # its records are not shipped
        seq = _rescan_and_apply(primary, state, journaler, applier, seq)
        assert_level(primary, secondary)


def test_the_active_never_reads_through_a_symlink_put_on_the_way(nodes, tmp_path: Path) -> None:
    """A directory swapped for a symlink to somewhere else between the event (or the scan) that
    named a file below it and the read: neither the journal nor a repair ships what the symlink
    leads to under the tree's name."""
    primary, _, _, _ = nodes
    secret = tmp_path / "secret"
    (secret / "c").mkdir(parents=True)
    (secret / "c/f").write_text("outside the tree")
    write(primary / "srv/data/c/f", b"inside")
    differences = diff(manifest(primary), {})  # the scan sees the real directory
    shutil.rmtree(primary / "srv/data/c")
    os.symlink(secret / "c", primary / "srv/data/c")

    state = State(tmp_path / "state")
    journaler = Journaler(state.connect(), primary, TREES[:1], ReplicationSettings(block_size=BS))
    journaler.process([Change("examine", "srv/data/c/f")])  # the event of the write, read late
    assert read_journal(state.db, 0, 100) == []
    shipped = list(repair_records(primary, differences, trees=TREES, block_size=BS, chunk=CHUNK))
    assert all(b"outside" not in data for _, _, data in shipped)
    assert "srv/data/c/f" not in {m.get("path") for _, m, _ in shipped} | \
        {f[0] for op, m, _ in shipped if op == "files" for f in m["files"]}


def test_what_a_chain_of_renames_carries_before_its_first_examine_is_shipped_where_it_ends(nodes, tmp_path: Path) -> None:
    """A link made and renamed over a file before the journaler examines it, then its directory
    renamed too, in one batch: the passive, which never had the link, gets it where it ends
    (a/b/a) instead of keeping the old file there."""
    primary, secondary, _, applier = nodes
    state = State(tmp_path / "state")
    journaler = Journaler(state.connect(), primary, TREES[:1], ReplicationSettings(block_size=BS))
    write(primary / "srv/data/b/a", b"the old file")
    (primary / "srv/data/a").mkdir()
    (primary / "srv/data/d").mkdir()
    seq = _rescan_and_apply(primary, state, journaler, applier, 0)
    os.symlink("a", primary / "srv/data/d/b")
    os.rename(primary / "srv/data/d/b", primary / "srv/data/b/a")
    os.rename(primary / "srv/data/b", primary / "srv/data/a/b")
    assert journaler.process([Change("examine", "srv/data/d/b")]).again == []  # read late: gone, a move follows
    done = journaler.process([Change("move", "srv/data/d/b", "srv/data/b/a"),
                              Change("move", "srv/data/b", "srv/data/a/b", is_dir=True),
                              Change("examine", "srv/data/a", is_dir=True)])
    # where the link ended up, and the directory it came with (what was read below its old name)
    assert {c.path for c in done.again} == {"srv/data/a/b/a", "srv/data/a/b"}
    assert journaler.process(done.again).again == []
    for r in read_journal(state.db, seq, 1000, 1 << 30):
        applier.apply(r.op, r.meta, bytes(r.data))
    applier.end_batch()
    assert_level(primary, secondary)
    assert os.readlink(secondary / "srv/data/a/b/a") == "a"


def test_verify_finds_an_owner_changed_behind_the_engines_back_and_repair_sets_it(nodes) -> None:
    require_root()
    primary, secondary, _, applier = nodes
    write(primary / "srv/data/d/f", b"x" * 100)
    os.symlink("f", primary / "srv/data/d/l")
    apply_all(applier, list(repair_records(primary, diff(manifest(primary), manifest(secondary)), trees=TREES,
                                           block_size=BS, chunk=CHUNK)))
    assert_level(primary, secondary)
    for name in ("d", "d/f", "d/l"):
        os.chown(secondary / "srv/data" / name, 4321, 4321, follow_symlinks=False)
    differences = diff(manifest(primary), manifest(secondary))
    assert sorted((d.path, d.kind) for d in differences) == [
        ("srv/data/d", "owner"), ("srv/data/d/f", "owner"), ("srv/data/d/l", "owner")]
    apply_all(applier, list(repair_records(primary, differences, trees=TREES, block_size=BS, chunk=CHUNK)))
    assert diff(manifest(primary), manifest(secondary)) == []


@pytest.mark.parametrize("owner", [[1], [1, "2"], [-1, 0], [0, 1 << 32], "0:0", [True, 0]])
def test_a_malformed_owner_is_refused_naming_the_field(nodes, owner: object) -> None:
    _, secondary, _, applier = nodes
    with pytest.raises(ProtocolError, match=r"file\.owner: expected \[uid, gid\]"):
        applier.apply("file", {"path": "srv/data/a", "gid": None, "size": 1, "mode": 0o644, "mtime_ns": 0,
                               "fresh": True, "owner": owner}, b"x")
    with pytest.raises(ProtocolError, match=r"files\.owners\[0\]: expected \[uid, gid\]"):
        applier.apply("files", {"files": [["srv/data/a", 1, 0o644, 0]], "owners": [owner]}, b"x")
    with pytest.raises(ProtocolError, match=r"entry\.uid: expected an integer"):
        Entry.from_json({"path": "srv/data/a", "kind": "file", "mode": 0o644, "uid": "0"})
    assert not (secondary / "srv/data/a").exists()


def test_a_role_change_written_during_a_burst_waits_for_one_journal_group_not_the_burst(nodes, tmp_path: Path) -> None:
    """The journaler's groups follow each other as long as changes come; SQLite's busy wait
    rarely finds the gap between two. An urgent write (a step-down's role and epoch) makes the
    journaler pause at its next group's end, so the write lands while the burst goes on."""
    primary = nodes[0]
    state = State(tmp_path / "state")
    journaler = Journaler(state.connect(), primary, TREES[:1], ReplicationSettings(block_size=BS),
                          between_groups=state.let_urgent_writes_pass)
    for i in range(30_000):
        write(primary / f"srv/data/d{i // 500:02d}/f{i:05d}", b"x")
    changes = [Change("examine", f"srv/data/d{i // 500:02d}/f{i:05d}") for i in range(30_000)]
    burst = threading.Thread(target=journaler.process, args=(changes,))
    burst.start()
    try:
        wait_for(lambda: state.journal_head() > 0, 30, "the burst to commit its first group")
        state.put(role="passive", epoch=7)
        journaled = state.connect().execute("SELECT COUNT(*) FROM journal").fetchone()[0]
    finally:
        burst.join()
    assert state.get("epoch") == "7"
    assert journaled < 20_000, journaled  # two thirds of the burst was still to come
