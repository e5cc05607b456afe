"""The agent's durable state: one SQLite file under the node's state directory.

WAL with synchronous=FULL: a commit that returned is on disk, which is what lets the active
promise that journaled records survive its crash and the passive that acked-applied records
survive its own. Each thread opens its own connection (`State.connect`); nothing outside the
engine opens this file.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Blobs go last in every row: SQLite reads a row's columns in order, so a column after a blob
# would make every COUNT/SUM over the queue walk the blob's overflow pages.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL, meta TEXT NOT NULL, size INTEGER NOT NULL, ts REAL NOT NULL, data BLOB NOT NULL,
    upto INTEGER);
CREATE TABLE IF NOT EXISTS shipped (
    path TEXT PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, target TEXT, hashes BLOB, uid INTEGER NOT NULL DEFAULT -1,
    gid INTEGER NOT NULL DEFAULT -1);
CREATE TABLE IF NOT EXISTS peers (
    node TEXT PRIMARY KEY, journal_id TEXT, acked_received INTEGER NOT NULL DEFAULT 0,
    acked_applied INTEGER NOT NULL DEFAULT 0, resync INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS dirty (node TEXT NOT NULL, path TEXT NOT NULL, PRIMARY KEY (node, path));
CREATE TABLE IF NOT EXISTS recvq (
    id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER, op TEXT NOT NULL, meta TEXT NOT NULL,
    size INTEGER NOT NULL, ts REAL NOT NULL, data BLOB NOT NULL, upto INTEGER);
CREATE TABLE IF NOT EXISTS divergences (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, epoch INTEGER NOT NULL, fork_seq INTEGER NOT NULL,
    paths TEXT NOT NULL);
"""

#: Events live in a database of their own. They are written from the event loop, and the
#: journaler's groups hold state.db's write lock back to back (SQLite's busy wait rarely finds
#: the gap between two): an event written there stalled the loop, heartbeats included, for over
#: a second while 20,000 new files were journaled, and a passive promoted.
EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, level TEXT NOT NULL,
    kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
"""

#: The newest events kept; older ones are dropped as new ones come (in steps of a tenth).
EVENTS_KEPT = 10_000
_EVENT_COLUMNS = "ts, level, kind, message, data"
_INSERT_EVENT = f"INSERT INTO events({_EVENT_COLUMNS}) VALUES(?,?,?,?,?)"


@dataclass(frozen=True)
class JournalRecord:
    seq: int | None
    op: str
    meta: dict[str, Any]
    data: bytes
    ts: float


class State:
    """Opens connections to the node's state database and holds the small typed accessors."""

    #: Meta keys read on every heartbeat, message and status call, and written only through
    #: `put` on this object: served from memory (a query releases the GIL, and getting it back
    #: behind busy worker threads costs milliseconds).
    CACHED = frozenset({"role", "epoch"})

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "state.db"
        self.db = self.connect()
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(shipped)")}
        for column in ("uid", "gid"):  # a state database from before owners were kept
            if column not in columns:
                self.db.execute(f"ALTER TABLE shipped ADD COLUMN {column} INTEGER NOT NULL DEFAULT -1")
        for table in ("journal", "recvq"):  # from before their sizes were summed as they grew
            if "upto" not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN upto INTEGER")
        self._cache: dict[str, str | None] = {}
        # Diagnostics, not state: a power loss may lose the last events (synchronous=NORMAL).
        self._events = sqlite3.connect(state_dir / "events.db", isolation_level=None, check_same_thread=False,
                                       timeout=30)
        self._events.execute("PRAGMA journal_mode=WAL")
        self._events.execute("PRAGMA synchronous=NORMAL")
        self._events.executescript(EVENTS_SCHEMA)
        self._events_lock = threading.Lock()  # written from the loop and from the apply thread
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='events'").fetchone():
            self._adopt_events()
        self._urgent = threading.Condition()
        self._urgent_count = 0

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    # -- meta -------------------------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        if key in self._cache:
            value = self._cache[key]
            return value if value is not None else default
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if key in self.CACHED:
            self._cache[key] = row[0] if row else None
        return row[0] if row else default

    def get_int(self, key: str, default: int = 0) -> int:
        value = self.get(key)
        return int(value) if value is not None else default

    def put(self, **values: object) -> None:
        with self.urgent_write(), self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                [(k, str(v)) for k, v in values.items()],
            )
        for k, v in values.items():
            if k in self.CACHED:
                self._cache[k] = str(v)

    # -- writers ----------------------------------------------------------------------
    @contextmanager
    def urgent_write(self) -> Iterator[None]:
        """Around a write the event loop cannot put off (a role or epoch change, as the node
        steps down): bulk writers pause between their groups until it is done.

        SQLite's busy wait rarely finds the gap between two of the journaler's groups, which
        follow each other as long as writes keep coming: left to it, a step-down would wait for
        the burst to end with the public identity still held, where this waits for one group.
        """
        with self._urgent:
            self._urgent_count += 1
        try:
            yield
        finally:
            with self._urgent:
                self._urgent_count -= 1
                self._urgent.notify_all()

    def let_urgent_writes_pass(self, timeout: float = 5.0) -> None:
        """Called by a bulk writer between groups, with no transaction open."""
        with self._urgent:
            self._urgent.wait_for(lambda: not self._urgent_count, timeout)

    # -- events -----------------------------------------------------------------------
    def event(self, level: str, kind: str, message: str, **data: object) -> None:
        with self._events_lock:
            added = self._events.execute(
                _INSERT_EVENT, (time.time(), level, kind, message, json.dumps(data) if data else None)
            ).lastrowid
            if added and added % (EVENTS_KEPT // 10) == 0:
                self._events.execute("DELETE FROM events WHERE id <= ?", (added - EVENTS_KEPT,))

    def _adopt_events(self) -> None:
        """Move the events that a version before events.db kept in state.db (the newest
        EVENTS_KEPT), ahead of any events.db already holds. events.db's user_version marks the
        move done, so one cut short by a crash before the old table is dropped is not repeated."""
        if self._events.execute("PRAGMA user_version").fetchone()[0] < 1:
            old = self.db.execute(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY id DESC LIMIT ?",
                                  (EVENTS_KEPT,)).fetchall()
            self._events.execute("BEGIN")
            newer = self._events.execute(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY id").fetchall()
            self._events.execute("DELETE FROM events")
            self._events.executemany(_INSERT_EVENT, old[::-1] + newer)
            self._events.execute("PRAGMA user_version = 1")
            self._events.execute("COMMIT")
        self.db.execute("DROP TABLE events")

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._events_lock:
            rows = self._events.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [
            {"ts": ts, "level": level, "kind": kind, "message": msg, "data": json.loads(d) if d else {}}
            for ts, level, kind, msg, d in rows
        ]

    # -- journal (active) -------------------------------------------------------------
    def journal_head(self) -> int:
        return journal_head(self.db)

    def journal_backlog(self, seq: int) -> tuple[int, int, float | None]:
        return journal_backlog(self.db, seq)

    def journal_paths_after(self, seq: int, upto: int | None = None) -> set[str]:
        return journal_paths_after(self.db, seq, upto)

    # -- receive queue (passive) ------------------------------------------------------
    def recvq_stats(self) -> tuple[int, int, float | None]:
        return _queued_after(self.db, "recvq", "id", 0)


def journal_head(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='journal'").fetchone()
    return int(row[0]) if row else 0


#: Append a journal or receive-queue record with `upto`, the bytes of the table's records up to
#: and including it: the bytes between two records are then a difference of two rows, not a
#: sum over the rows between.
INSERT_JOURNAL = ("INSERT INTO journal(op, meta, data, size, ts, upto) VALUES(?1, ?2, ?3, ?4, ?5, ?4 + "
                  "COALESCE((SELECT upto FROM journal ORDER BY seq DESC LIMIT 1), 0))")
INSERT_RECVQ = ("INSERT INTO recvq(seq, op, meta, data, size, ts, upto) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?5 + "
                "COALESCE((SELECT upto FROM recvq ORDER BY id DESC LIMIT 1), 0))")


def journal_backlog(db: sqlite3.Connection, seq: int) -> tuple[int, int, float | None]:
    """Records, bytes and timestamp of the oldest record of the journal after `seq`."""
    return _queued_after(db, "journal", "seq", seq)


def _queued_after(db: sqlite3.Connection, table: str, key: str, after: int) -> tuple[int, int, float | None]:
    """Records, bytes and timestamp of the oldest record after `after` in the journal or the
    receive queue.

    Read on every heartbeat and status call: summed over the rows, 1,000,000 records behind a
    passive that was down took 0.2 s of the event loop each time. Both tables lose records only
    from their start, so their keys are contiguous and this is two lookups. They are one
    statement, so one snapshot: the apply thread empties the receive queue (and upkeep truncates
    the journal) at any moment, and a second statement found the table empty, which killed the
    heartbeat loop that reads this.
    """
    row = db.execute(f"SELECT f.{key}, f.upto, f.size, f.ts, l.{key}, l.upto FROM "
                     f"(SELECT {key}, upto, size, ts FROM {table} WHERE {key} > ?1 ORDER BY {key} LIMIT 1) AS f, "
                     f"(SELECT {key}, upto FROM {table} ORDER BY {key} DESC LIMIT 1) AS l", (after,)).fetchone()
    if row is None:
        return 0, 0, None
    first, (last_key, last_upto) = row[:4], row[4:]
    if first[1] is None or last_upto is None:  # records of a version that did not keep `upto`
        n, size, ts = db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(ts) FROM {table} WHERE {key} > ?",
                                 (after,)).fetchone()
        return int(n), int(size), ts
    return last_key - first[0] + 1, last_upto - first[1] + first[2], first[3]


def journal_paths_after(db: sqlite3.Connection, seq: int, upto: int | None = None) -> set[str]:
    """The paths (and rename destinations) of the journal records after `seq`, up to `upto`."""
    paths: set[str] = set()
    rows = db.execute("SELECT meta FROM journal WHERE seq > ? AND seq <= ?", (seq, upto if upto is not None else 1 << 62))
    for (meta,) in rows:
        m = json.loads(meta)
        paths.add(m["path"])
        if m.get("dst"):
            paths.add(m["dst"])
    return paths


def journal_upkeep(db: sqlite3.Connection, journal_id: str | None, acked: dict[str, tuple[int, int]],
                   limit: int) -> dict[str, tuple[int, int, int]]:
    """Persist each passive's acked (received, applied) positions, move the backlog of any past
    `limit` bytes to its dirty list, and truncate the journal below every passive's applied
    position. Returns the passives spilled, each with the journal head, the paths its backlog
    named, and the paths in its dirty list now."""
    spilled: dict[str, tuple[int, int, int]] = {}
    kept: list[int] = []  # the applied positions persisted
    for node, (received, applied) in acked.items():
        _, size, _ = journal_backlog(db, applied)
        with db:
            db.execute("BEGIN IMMEDIATE")
            if size > limit:
                head = journal_head(db)
                paths = journal_paths_after(db, applied, upto=head)
                # Replaced, not ignored: a path listed again gets a new rowid, so a resync that
                # read the list before this spill keeps it (Sender.run deletes only what it read).
                db.executemany("INSERT OR REPLACE INTO dirty(node, path) VALUES(?, ?)", [(node, x) for x in paths])
                received = applied = head
                (listed,) = db.execute("SELECT COUNT(*) FROM dirty WHERE node=?", (node,)).fetchone()
                spilled[node] = (head, len(paths), listed)
            db.execute("INSERT INTO peers(node, journal_id, acked_received, acked_applied) VALUES(?,?,?,?) "
                       "ON CONFLICT(node) DO UPDATE SET acked_received=excluded.acked_received, "
                       "acked_applied=excluded.acked_applied", (node, journal_id, received, applied))
        kept.append(applied)
    low = min(kept, default=journal_head(db))
    db.execute("DELETE FROM journal WHERE seq <= ?", (low,))
    return spilled


def read_journal(db: sqlite3.Connection, after: int, limit: int = 512, max_bytes: int = 4 << 20) -> list[JournalRecord]:
    """Journal records after `after`, in order, up to `limit` records or about `max_bytes`."""
    out: list[JournalRecord] = []
    total = 0
    for s, op, meta, data, ts in db.execute(
        "SELECT seq, op, meta, data, ts FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    ):
        out.append(JournalRecord(s, op, json.loads(meta), bytes(data), ts))
        total += len(data)
        if total >= max_bytes:
            break
    return out
