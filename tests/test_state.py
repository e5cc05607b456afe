"""The state database's queue accessors: the journal on the active, the receive queue on a passive."""
from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from engine.state import EVENTS_KEPT, EVENTS_SCHEMA, INSERT_JOURNAL, INSERT_RECVQ, State, journal_backlog

QUEUES = {  # table: (its key, how a record is appended)
    "journal": ("seq", lambda db, size, ts: db.execute(INSERT_JOURNAL, ("data", "{}", b"", size, ts))),
    "recvq": ("id", lambda db, size, ts: db.execute(INSERT_RECVQ, (None, "data", "{}", b"", size, ts))),
}


def _after(state: State, table: str, key: int) -> tuple[int, int, float | None]:
    if table == "journal":
        return journal_backlog(state.db, key)
    assert key == 0  # the receive queue is read whole: its applied records are deleted
    return state.recvq_stats()


def _summed(db: sqlite3.Connection, table: str, key: int) -> tuple[int, int, float | None]:
    """The backlog summed over every row, as it was read before `upto` was kept."""
    column = QUEUES[table][0]
    n, size, ts = db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(ts) FROM {table} WHERE {column} > ?",
                             (key,)).fetchone()
    return n, size, ts


@pytest.mark.parametrize("table", QUEUES)
@pytest.mark.parametrize("seed", range(6))
def test_the_backlog_read_from_two_rows_equals_the_sum_over_all_of_them(tmp_path: Path, table: str, seed: int) -> None:
    rng = random.Random(seed)
    state = State(tmp_path / "state")
    db = state.db
    column, append = QUEUES[table]
    ts = 0.0
    for _ in range(40):
        if rng.random() < 0.7:
            db.execute("BEGIN IMMEDIATE")
            for _ in range(rng.randint(1, 30)):
                ts += rng.random()
                append(db, rng.randint(64, 1 << 20), ts)
            db.execute("ROLLBACK" if rng.random() < 0.2 else "COMMIT")  # a group that failed
        else:
            head = db.execute(f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()[0]
            db.execute(f"DELETE FROM {table} WHERE {column} <= ?", (rng.randint(0, head),))  # truncated, or applied
        head = db.execute(f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()[0]
        low = db.execute(f"SELECT COALESCE(MIN({column}), 1) FROM {table}").fetchone()[0] - 1
        for key in (range(low, head + 2) if table == "journal" else [0]):
            assert _after(state, table, key) == _summed(db, table, key), (key, low, head)


@pytest.mark.parametrize("table", QUEUES)
def test_records_of_a_version_that_kept_no_running_total_are_summed(tmp_path: Path, table: str) -> None:
    state = State(tmp_path / "state")
    column, append = QUEUES[table]
    state.db.executemany(f"INSERT INTO {table}(op, meta, data, size, ts) VALUES('data', '{{}}', x'', ?, ?)",
                         [(100, 1.0), (200, 2.0)])  # as an older version wrote them
    append(state.db, 300, 3.0)
    assert _after(state, table, 0) == (3, 600, 1.0)
    if table == "journal":
        assert journal_backlog(state.db, 2) == (1, 300, 3.0)
        assert journal_backlog(state.db, 3) == (0, 0, None)


OLD_EVENTS = ("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, level TEXT NOT NULL, "
              "kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT)")


def test_events_of_a_version_that_kept_them_in_state_db_are_adopted_once(tmp_path: Path) -> None:
    """Until 199ea93 events lived in state.db: a node upgraded past it keeps its history."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    old = sqlite3.connect(state_dir / "state.db")
    old.execute(OLD_EVENTS)
    old.executemany("INSERT INTO events(ts, level, kind, message, data) VALUES(?,?,?,?,?)",
                    [(1.0, "info", "agent_started", "first", None),
                     (2.0, "warning", "role_changed", "second", '{"epoch": 2}')])
    old.commit()
    old.close()
    newer = sqlite3.connect(state_dir / "events.db")  # what the version that made events.db wrote
    newer.executescript(EVENTS_SCHEMA)
    newer.execute("INSERT INTO events(ts, level, kind, message) VALUES(3.0, 'info', 'link_up', 'third')")
    newer.commit()
    newer.close()

    state = State(state_dir)
    state.event("info", "agent_started", "fourth")
    assert [(e["message"], e["data"]) for e in state.events()] == [("fourth", {}), ("third", {}),
                                                                  ("second", {"epoch": 2}), ("first", {})]
    assert state.db.execute("SELECT name FROM sqlite_master WHERE name='events'").fetchone() is None
    state.db.execute(OLD_EVENTS)  # as if the agent had died after the move, before the drop
    state.db.execute("INSERT INTO events(ts, level, kind, message) VALUES(1.0, 'info', 'agent_started', 'first')")
    assert [e["message"] for e in State(state_dir).events()] == ["fourth", "third", "second", "first"]


def test_the_newest_events_are_kept_and_the_oldest_dropped(tmp_path: Path) -> None:
    state = State(tmp_path / "state")
    for i in range(EVENTS_KEPT + 2_500):
        state.event("info", "link_up", f"event {i}")
    (count,) = state._events.execute("SELECT COUNT(*) FROM events").fetchone()
    assert EVENTS_KEPT <= count < EVENTS_KEPT * 1.2
    assert state.events(1)[0]["message"] == f"event {EVENTS_KEPT + 2_499}"
    assert state.events(EVENTS_KEPT)[-1]["message"] == "event 2500"


@pytest.mark.parametrize("table", QUEUES)
def test_the_backlog_of_a_queue_emptied_while_it_is_read_is_never_half_of_each(tmp_path: Path, table: str) -> None:
    """The apply thread empties the receive queue (upkeep truncates the journal) on a connection
    of its own at any moment; the heartbeat loop reading the backlog died of finding the queue
    full in one statement and empty in the next."""
    state = State(tmp_path / "state")
    column, append = QUEUES[table]
    for i in range(5):
        append(state.db, 100, float(i))
    other = state.connect()
    statements = 0

    def empty_after_the_first(_sql: str) -> None:
        nonlocal statements
        statements += 1
        if statements == 2:
            other.execute(f"DELETE FROM {table}")

    state.db.set_trace_callback(empty_after_the_first)
    try:
        backlog = _after(state, table, 0)
    finally:
        state.db.set_trace_callback(None)
    assert backlog in ((5, 500, 0.0), (0, 0, None))
