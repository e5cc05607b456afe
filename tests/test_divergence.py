"""Keeping a divergence copies what the stale active wrote, and nothing from outside its trees."""
from __future__ import annotations

import os
from pathlib import Path

from engine.capture import Change
from engine.config import ProtectedTree, ReplicationSettings
from engine.divergence import keep_divergence, show_divergence
from engine.journaler import Journaler
from engine.state import State

TREES = (ProtectedTree("/srv/data"),)


def test_kept_copies_never_follow_a_symlink_out_of_the_tree(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    data = root / "srv" / "data"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("not the replica's\n")
    (data / "sub" / "secret").write_text("journaled while sub was a directory\n")
    (data / "mine").write_text("written after the fork\n")
    os.chmod(data / "mine", 0o640)
    state = State(tmp_path / "state")
    Journaler(state.connect(), root, TREES, ReplicationSettings()).process(
        [Change("examine", "srv/data/sub/secret"), Change("examine", "srv/data/mine")])
    (data / "sub" / "secret").unlink()
    (data / "sub").rmdir()
    (data / "sub").symlink_to(outside)  # the same path now leads out of the tree

    kept = keep_divergence(state.db, root, TREES, tmp_path / "state", epoch=2)
    assert kept is not None
    shown = {p["path"]: p for p in show_divergence(state.db, tmp_path / "state", kept.id)["paths"]}
    assert shown["srv/data/sub/secret"]["kind"] == "other" and "copy" not in shown["srv/data/sub/secret"]
    assert not list(kept.directory.rglob("secret")), "nothing was copied from outside the tree"
    copy = Path(shown["srv/data/mine"]["copy"])
    assert copy.read_text() == "written after the fork\n" and (copy.stat().st_mode & 0o777) == 0o640
