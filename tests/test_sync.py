"""The repair list of a sync: what goes first, and which files may travel side by side."""
from __future__ import annotations

from engine.manifest import Entry
from engine.sync import LARGE_FILE, diff, lanes


def test_parents_and_extras_go_first_and_files_split_by_size_in_walk_order() -> None:
    active = {e.path: e for e in [
        Entry("d", "dir", 0o755),
        Entry("d/big1", "file", 0o644, LARGE_FILE),
        Entry("d/small1", "file", 0o644, 10),
        Entry("d/sub", "dir", 0o700),
        Entry("d/sub/link", "symlink", 0o777, target="../small1"),
        Entry("d/sub/big2", "file", 0o644, 5 * LARGE_FILE),
        Entry("d/sub/small2", "file", 0o600, LARGE_FILE - 1),
    ]}
    passive = {"d": Entry("d", "dir", 0o755), "d/gone": Entry("d/gone", "file", 0o644, 1)}
    first, small, large = lanes(diff(active, passive))
    assert [(d.path, d.kind) for d in first] == [("d/gone", "extra"), ("d/sub", "missing"), ("d/sub/link", "missing")]
    assert [d.path for d in small] == ["d/small1", "d/sub/small2"]
    assert [d.path for d in large] == ["d/big1", "d/sub/big2"]
