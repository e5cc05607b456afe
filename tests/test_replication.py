"""Replication between real agents: every kind of change reaches both passives intact."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import hashlib
from pathlib import Path

import pytest

from conftest import Demo, nf, require_root, tree_diff, wait_for


def test_demo_up_reports_every_node_connected(demo: Demo) -> None:
    doc = demo.up(nodes=3)
    roles = {n["id"]: n["role"] for n in doc["nodes"]}
    assert roles == {"primary": "active", "secondary": "passive", "tertiary": "passive"}
    for node in ("primary", "secondary", "tertiary"):
        pid = int((demo.workdir / node / "agent.pid").read_text())
        assert Path(f"/proc/{pid}").exists()
    status = demo.status()
    for n in status["nodes"]:
        assert n["connected"] is True
        for key in ("send_queue_bytes", "receive_queue_bytes", "applied_seq", "lag_seconds"):
            assert isinstance(n[key], (int, float)), key


def test_every_kind_of_change_replicates_to_two_passives(demo: Demo) -> None:
    demo.up(nodes=3)
    d = demo.data("primary")
    outside = demo.workdir / "outside"
    outside.mkdir()
    (d / "a.txt").write_text("hello\n")
    (d / "empty").touch()
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "dir" / "sub" / "deep.bin").write_bytes(os.urandom(300_000))
    (d / "to-delete").write_text("bye")
    (d / "rmdir-me").mkdir()
    os.symlink("a.txt", d / "link-in")
    os.symlink(str(outside), d / "link-out")
    with open(d / "sparse.img", "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(b"middle" * 1000)
    demo.wait_equal(120)

    # modify in the middle, extend, truncate, rename file and dir, delete, rmdir, chmod, mtime
    with open(d / "dir" / "sub" / "deep.bin", "r+b") as f:
        f.seek(100_000)
        f.write(b"X" * 5000)
    with open(d / "a.txt", "a") as f:
        f.write("more\n")
    os.truncate(d / "dir" / "sub" / "deep.bin", 200_000)
    os.rename(d / "a.txt", d / "b.txt")
    os.rename(d / "dir", d / "renamed-dir")
    (d / "to-delete").unlink()
    (d / "rmdir-me").rmdir()
    os.chmod(d / "b.txt", 0o600)
    owned = os.geteuid() == 0  # a clone's files keep their numeric owners (the agent runs as root)
    if owned:
        os.chown(d / "b.txt", 1234, 5678)
        os.chown(d / "renamed-dir", 70, 70)
    os.utime(d / "empty", ns=(1_000_000_000, 1_000_000_000))
    (d / "renamed-dir" / "sub" / "new-in-renamed").write_text("x")
    demo.wait_equal(60)

    for node in ("secondary", "tertiary"):
        p = demo.data(node)
        assert (p / "b.txt").read_text() == "hello\nmore\n"
        assert (p / "b.txt").stat().st_mode & 0o777 == 0o600
        if owned:
            assert ((p / "b.txt").stat().st_uid, (p / "b.txt").stat().st_gid) == (1234, 5678)
            assert (p / "renamed-dir").stat().st_uid == 70
        assert not (p / "a.txt").exists() and not (p / "dir").exists()
        assert os.readlink(p / "link-out") == str(outside)
        assert (p / "empty").stat().st_mtime_ns == 1_000_000_000
        sparse = p / "sparse.img"
        assert sparse.stat().st_size == 1 << 30
        assert sparse.stat().st_blocks * 512 < 64 << 20, "the sparse file must stay sparse on the passive"


@pytest.mark.slow
def test_twenty_thousand_small_files(demo: Demo) -> None:
    demo.up(nodes=3)
    d = demo.data("primary")
    for i in range(200):
        sub = d / f"d{i:03d}"
        sub.mkdir()
        for j in range(100):
            (sub / f"f{j:03d}").write_bytes(f"{i}-{j}\n".encode() * (1 + j % 7))
    demo.wait_equal(600)
    assert sum(1 for _ in demo.data("tertiary").rglob("f*")) == 20_000


def _self_checking(path: Path, size: int) -> None:
    """A file whose first 32 bytes are the digest of the rest: a torn copy cannot pass."""
    body = os.urandom(size)
    path.write_bytes(hashlib.blake2b(body, digest_size=32).digest() + body)


def _intact(path: Path) -> bool:
    raw = path.read_bytes()
    return hashlib.blake2b(raw[32:], digest_size=32).digest() == raw[:32]


def test_a_new_passive_gets_a_mixed_tree_whole_with_small_and_large_files_side_by_side(demo: Demo) -> None:
    """The initial sync ships small and large files in two lanes at once (engine.sync.lanes)."""
    from nftui.demo import create

    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 2)
    d = demo.data("primary")
    for i in range(30):
        sub = d / f"dir{i:02d}" / "nested"
        sub.mkdir(parents=True)
        for j in range(40):
            (sub / f"s{j:02d}").write_bytes(os.urandom(j * 97))  # empty to a few KiB
        _self_checking(sub.parent / f"big{i:02d}", (1 << 20) + i * 4099)  # unaligned tails
        os.symlink(f"nested/s{i:02d}", sub.parent / "link")
        os.chmod(sub / "s01", 0o600)
    with open(d / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(os.urandom(3 << 20))
    demo.up(nodes=2)  # the secondary joins a primary that already holds everything
    demo.wait_equal(300, nodes=("secondary",))
    assert all(_intact(f) for f in demo.data("secondary").glob("dir*/big*"))
    assert any(e["kind"] == "sync_done" for e in demo.events("primary"))


def test_passive_killed_mid_transfer_restarts_without_torn_or_lost_files(demo: Demo) -> None:
    demo.up(nodes=2)
    d = demo.data("primary")
    for i in range(40):
        _self_checking(d / f"f{i:02d}", 4 << 20)
    # kill while the secondary is still receiving: some, not all, files arrived
    wait_for(lambda: any((demo.data("secondary") / f"f{i:02d}").exists() for i in range(40)), 60,
             "the first files to arrive on the secondary")
    demo.kill("secondary")
    for f in demo.data("secondary").glob("f*"):
        assert _intact(f), f"{f.name} is torn on the killed passive"
    for i in range(40, 50):
        _self_checking(d / f"f{i:02d}", 1 << 20)
    demo.start("secondary")
    demo.wait_equal(120, nodes=("secondary",))
    assert all(_intact(f) for f in demo.data("secondary").glob("f*"))


def test_active_killed_with_sigkill_loses_nothing_it_journaled(demo: Demo) -> None:
    from nftui.demo import create

    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 2)  # a restart, not a failover: the primary comes back before anyone promotes
    demo.config.write_text(re.sub(r"(?m)^\[heartbeat\].*$", "[heartbeat]\nfailover_timeout = 60",
                                  demo.config.read_text()))
    demo.up(nodes=2)
    # after the new journal's baseline: a file written during that walk is in the baseline, not a record
    wait_for(lambda: any(e["kind"] == "baseline" for e in demo.events("primary")), 60, "the primary's baseline")
    d = demo.data("primary")
    for i in range(300):
        (d / f"j{i:03d}").write_text(f"record {i}\n")
    # a new small file is one record (its content inline), so 300 records cover them all
    journaled = wait_for(lambda: demo.node_status("primary")["applied_seq"] >= 300 and
                         demo.node_status("primary")["applied_seq"], 60, "300 files journaled")
    demo.kill("primary")
    (d / "written-while-down").write_text("the restart rescan picks this up\n")
    demo.start("primary")
    wait_for(lambda: demo.node_status("primary")["applied_seq"] >= journaled, 60, "journal head restored")
    demo.wait_equal(120, nodes=("secondary",))
    assert (demo.data("secondary") / "j299").read_text() == "record 299\n"
    assert (demo.data("secondary") / "written-while-down").exists()


def test_inotify_overflow_ends_with_equal_trees(demo: Demo) -> None:
    require_root()
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    old = knob.read_text()
    try:
        knob.write_text("64\n")
        demo.up(nodes=2)  # the queue limit is taken when the agent creates its inotify instance
    finally:
        knob.write_text(old)
    d = demo.data("primary")
    for i in range(3000):
        (d / f"burst{i:04d}").write_text(str(i))
    demo.wait_equal(180, nodes=("secondary",))
    kinds = {e["kind"] for e in demo.events("primary")}
    assert "rescan" in kinds, "the overflow must be recorded as a rescan event"


def test_verify_finds_and_repairs_a_difference_made_behind_the_engines_back(demo: Demo) -> None:
    demo.up(nodes=3)
    d = demo.data("primary")
    (d / "config.ini").write_text("[main]\nvalue = 1\n")
    (d / "keep").mkdir()
    demo.wait_equal(60)
    ok = nf("verify", "--config", str(demo.config), "--json")
    assert json.loads(ok.stdout)["differences"] == 0

    (demo.data("secondary") / "config.ini").write_text("[main]\nvalue = 2\n")
    (demo.data("tertiary") / "stray-file").write_text("not on the active")
    found = nf("verify", "--config", str(demo.config), "--json", check=False)
    assert found.returncode == 4, found.stderr
    doc = json.loads(found.stdout)
    by_node = {n["id"]: {x["path"]: x["kind"] for x in n["differences"]} for n in doc["nodes"]}
    assert by_node["secondary"] == {"srv/data/config.ini": "content"}
    assert by_node["tertiary"] == {"srv/data/stray-file": "extra"}

    fixed = nf("verify", "--config", str(demo.config), "--json", "--repair", check=False)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["remaining"] == 0
    assert tree_diff(d, demo.data("secondary")) == []
    assert tree_diff(d, demo.data("tertiary")) == []


def test_the_smallest_frames_carry_a_sync_a_burst_and_a_verify_of_a_large_disk_image(demo: Demo) -> None:
    """With max_frame_bytes at its least (1 MiB), batches of records, grouped small files and
    the passive's manifest of a disk image whose block hashes alone take 3 MiB all fit."""
    from nftui.demo import create

    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 2)
    demo.config.write_text(re.sub(r"(?m)^\[replication\].*$", "[replication]\nmax_frame_bytes = 1048576",
                                  demo.config.read_text()))
    d = demo.data("primary")
    d.mkdir(parents=True, exist_ok=True)
    for i in range(80):
        (d / f"small-{i}").write_bytes(os.urandom(60 << 10))
    for i in range(6):
        (d / f"medium-{i}").write_bytes(os.urandom(700 << 10))
    with open(d / "disk.img", "wb") as f:
        f.truncate(768 << 20)
        f.write(os.urandom(1 << 20))
    demo.up(nodes=2)
    demo.wait_equal(120, nodes=("secondary",))
    for i in range(12):
        (d / f"burst-{i}").write_bytes(os.urandom(700 << 10))
    demo.wait_equal(60, nodes=("secondary",))

    with open(demo.data("secondary") / "disk.img", "r+b") as f:  # behind the engine's back
        f.seek(500 << 20)
        f.write(b"corrupted")
    fixed = nf("verify", "--config", str(demo.config), "--json", "--repair", check=False)
    doc = json.loads(fixed.stdout)
    assert [x["path"] for n in doc["nodes"] for x in n["differences"]] == ["srv/data/disk.img"], fixed.stdout
    assert fixed.returncode == 0 and doc["remaining"] == 0, fixed.stdout + fixed.stderr
    assert tree_diff(d, demo.data("secondary")) == []


def test_hundreds_of_files_with_paths_of_thousands_of_characters_replicate(demo: Demo) -> None:
    """Each record's path travels in the frame's header, which the receiver caps at 1 MiB: 512
    records (a batch) of 2,800-character paths pass it, so such batches go in smaller frames."""
    deep = demo.data("primary").joinpath(*[f"{i:02d}" + "d" * 248 for i in range(11)])
    deep.mkdir(parents=True)
    for i in range(600):
        (deep / f"before-{i:03d}").write_text(f"{i}\n")
    demo.up(nodes=2)
    demo.wait_equal(120, nodes=("secondary",))
    for i in range(600):  # journaled and streamed this time
        (deep / f"after-{i:03d}").write_text(f"{i}\n")
    demo.wait_equal(120, nodes=("secondary",))
    assert len(list(demo.data("secondary").rglob("after-*"))) == 600


def test_status_shows_how_far_a_sync_has_come_and_how_long_it_has_left(demo: Demo) -> None:
    """The passive is stopped (SIGSTOP) in the middle of its initial sync, so the sync stands
    still where status can read it."""
    from engine.client import request
    from engine.config import load_cluster, load_node

    demo.up(nodes=2)
    demo.kill("secondary")
    shutil.rmtree(demo.workdir / "secondary" / "state")  # a passive with no state: an initial sync
    d = demo.data("primary")
    for i in range(8):
        (d / f"big-{i}").write_bytes(os.urandom(64 << 20))
    socket = load_node(demo.workdir / "primary" / "node.toml", load_cluster(demo.config)).socket

    def sync_seen() -> dict | None:
        peer = next(n for n in request(socket, "status")["nodes"] if n["id"] == "secondary")
        return peer["sync"] if peer.get("sync") and peer["sync"]["bytes_sent"] > 0 else None

    demo.start("secondary")
    wait_for(sync_seen, 60, "the initial sync to ship its first data", interval=0.005)
    pid = int((demo.workdir / "secondary" / "agent.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        first = wait_for(sync_seen, 30, "status while the passive is stopped")
        assert first["reason"] == "initial sync" and first["paths"] == 1
        assert 0 < first["percent"] < 100 and first["eta_seconds"] > 0, first
        shown = nf("status", "--config", str(demo.config)).stdout
        assert re.search(r"syncing \d+%", shown), shown  # and the time left, where the terminal is wide enough
    finally:
        os.kill(pid, signal.SIGCONT)
    demo.wait_equal(120, nodes=("secondary",))
    wait_for(lambda: next(n for n in request(socket, "status")["nodes"] if n["id"] == "secondary")["sync"] is None,
             30, "status to show the sync ended")


def test_status_json_while_a_passive_is_down(demo: Demo) -> None:
    demo.up(nodes=2)
    demo.kill("secondary")
    wait_for(lambda: not demo.node_status("secondary")["connected"], 30, "secondary shown disconnected")
    (demo.data("primary") / "queued").write_bytes(b"q" * 100_000)
    queued = wait_for(lambda: demo.node_status("secondary")["send_queue_bytes"] >= 100_000, 30,
                      "the send queue to hold the file")
    assert queued
    demo.start("secondary")
    demo.wait_equal(60, nodes=("secondary",))
    wait_for(lambda: demo.node_status("secondary")["send_queue_bytes"] == 0, 30, "the send queue to drain")


def test_agent_stops_cleanly_on_sigterm(demo: Demo) -> None:
    demo.up(nodes=2)
    pid = int((demo.workdir / "secondary" / "agent.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             30, "the agent to exit")
    log = (demo.workdir / "secondary" / "agent.log").read_text()
    assert "stopping on request" in log
    assert "Traceback" not in log


def test_full_send_queue_spills_to_a_dirty_list_and_resyncs_by_delta(demo: Demo) -> None:
    from nftui.demo import create

    demo.workdir.mkdir(parents=True)
    create(demo.workdir, 2)
    text = re.sub(r"(?m)^\[replication\].*$", "[replication]\nmax_frame_bytes = 1048576\n"
                  "send_queue_max_bytes = 1048576", demo.config.read_text())
    demo.config.write_text(text)
    demo.up(nodes=2)
    d = demo.data("primary")
    (d / "before").write_text("replicated before the outage\n")
    demo.wait_equal(30, nodes=("secondary",))
    demo.kill("secondary")
    for i in range(8):
        (d / f"while-down-{i}").write_bytes(os.urandom(512 * 1024))
    (d / "before").unlink()
    wait_for(lambda: any(e["kind"] == "send_queue_overflow" for e in demo.events("primary")), 30,
             "the send queue to spill to the dirty list")
    held = wait_for(lambda: demo.node_status("secondary").get("dirty_paths", 0) >= 8
                    and demo.node_status("secondary")["send_queue_bytes"] < 1 << 20, 30,
                    "the journal to be released and the paths kept as dirty")
    assert held
    # Written after the spill, below the limit: journaled, but in no dirty list.
    (d / "after-the-spill").write_text("journaled once the backlog was dropped\n")
    (d / "while-down-0").rename(d / "renamed-after-the-spill")
    wait_for(lambda: demo.node_status("secondary")["send_queue_records"] >= 2, 30,
             "the changes after the spill to be journaled")
    demo.start("secondary")
    demo.wait_equal(60, nodes=("secondary",))
    assert not (demo.data("secondary") / "before").exists()
    assert (demo.data("secondary") / "after-the-spill").exists()
    wait_for(lambda: demo.node_status("secondary").get("dirty_paths", 1) == 0, 30, "the dirty list to clear")
