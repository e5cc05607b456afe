"""The state database's journal accessors."""
from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from engine.state import INSERT_JOURNAL, State, journal_backlog


def _scan(db: sqlite3.Connection, seq: int) -> tuple[int, int, float | None]:
    """The backlog summed over every row, as it was read before `upto` was kept."""
    n, size, ts = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(ts) FROM journal WHERE seq > ?",
                             (seq,)).fetchone()
    return n, size, ts


@pytest.mark.parametrize("seed", range(10))
def test_the_backlog_read_from_two_rows_equals_the_sum_over_all_of_them(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    db = State(tmp_path / "state").db
    ts = 0.0
    for _ in range(40):
        if rng.random() < 0.7:
            db.execute("BEGIN IMMEDIATE")
            for _ in range(rng.randint(1, 30)):
                ts += rng.random()
                db.execute(INSERT_JOURNAL, ("data", "{}", b"", rng.randint(64, 1 << 20), ts))
            db.execute("ROLLBACK" if rng.random() < 0.2 else "COMMIT")  # a group that failed
        else:
            head = db.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
            db.execute("DELETE FROM journal WHERE seq <= ?", (rng.randint(0, head),))  # truncated up to a passive
        head = db.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
        low = db.execute("SELECT COALESCE(MIN(seq), 1) FROM journal").fetchone()[0] - 1
        for seq in range(low, head + 2):
            assert journal_backlog(db, seq) == _scan(db, seq), (seq, low, head)


def test_records_of_a_version_that_kept_no_running_total_are_summed(tmp_path: Path) -> None:
    db = State(tmp_path / "state").db
    db.executemany("INSERT INTO journal(op, meta, data, size, ts) VALUES('data', '{}', x'', ?, ?)",
                   [(100, 1.0), (200, 2.0)])  # as an older version wrote them
    db.execute(INSERT_JOURNAL, ("data", "{}", b"", 300, 3.0))
    assert journal_backlog(db, 0) == (3, 600, 1.0)
    assert journal_backlog(db, 2) == (1, 300, 3.0)
    assert journal_backlog(db, 3) == (0, 0, None)
