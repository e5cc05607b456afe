"""A passive keeps the block hashes of what it applies, so that once promoted it ships deltas.

Real parts on both sides: the active's journaler turns real file changes into records, the
passive's applier applies them to its own tree, and the hashes the passive keeps must equal a
fresh hash of its files. Promoted, its journal then ships the changed block, not the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine import held
from engine.apply import Applier
from engine.blocks import hash_file
from engine.capture import Change
from engine.config import ProtectedTree, ReplicationSettings
from engine.errors import ProtocolError
from engine.held import Held
from engine.journaler import Journaler, shipped_under
from engine.manifest import scan_tree
from engine.state import State, read_journal
from engine.sync import diff, repair_records

BS = 4096
SETTINGS = ReplicationSettings(block_size=BS)
TREES = (ProtectedTree("/srv/data"),)


class Pair:
    """An active (journaler) and a passive (applier with kept hashes), each with its own state."""

    def __init__(self, base: Path) -> None:
        self.active_root, self.passive_root = base / "a", base / "p"
        for root in (self.active_root, self.passive_root):
            (root / "srv" / "data").mkdir(parents=True)
        self.active = State(base / "a-state")
        self.passive = State(base / "p-state")
        self.journaler = Journaler(self.active.connect(), self.active_root, TREES, SETTINGS)
        self.held = Held(self.passive.db)
        self.applier = Applier(self.passive_root, TREES, held=self.held, block_size=BS)
        self.cursor = 0

    def a(self, rel: str) -> Path:
        return self.active_root / "srv" / "data" / rel

    def p(self, rel: str) -> Path:
        return self.passive_root / "srv" / "data" / rel

    def ship(self, *changes: Change) -> int:
        """Journal the changes on the active and apply every new record on the passive."""
        self.journaler.process(changes)
        records = read_journal(self.active.db, self.cursor, 100_000, 1 << 40)
        for r in records:
            self.applier.apply(r.op, r.meta, bytes(r.data))
        self.applier.end_batch()
        self.held.flush()
        self.cursor = records[-1].seq if records else self.cursor
        return sum(len(r.data) for r in records)

    def kept(self) -> dict[str, bytes | None]:
        return {p: e.hashes for p, e in shipped_under(self.passive.db, "srv/data").items() if e.kind == "file"}

    def actual(self) -> dict[str, bytes]:
        out = {}
        for dirpath, dirs, files in os.walk(self.passive_root / "srv" / "data"):
            dirs[:] = [d for d in dirs if d != ".nf-stage"]
            for name in files:
                full = Path(dirpath) / name
                out[str(full.relative_to(self.passive_root))] = hash_file(full, BS)
        return out


def _examine(*rels: str) -> list[Change]:
    return [Change("examine", f"srv/data/{r}") for r in rels]


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def test_the_passive_keeps_exact_hashes_through_every_kind_of_change(pair: Pair) -> None:
    big = os.urandom(40 * BS + 123)  # a short last block
    pair.a("big").write_bytes(big)
    with open(pair.a("sparse"), "wb") as f:  # holes and a zero block the sender skips
        f.write(os.urandom(BS))
        f.seek(20 * BS)
        f.write(os.urandom(100))
    pair.a("d").mkdir()
    pair.a("d/small").write_bytes(b"inline content\n")
    pair.a("empty").write_bytes(b"")
    pair.ship(*_examine("big", "sparse", "d", "d/small", "empty"))
    assert pair.kept() == pair.actual()

    with open(pair.a("big"), "r+b") as f:  # one block in the middle, then grow by a short piece
        f.seek(17 * BS)
        f.write(os.urandom(BS))
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(2000))
    os.truncate(pair.a("sparse"), 5 * BS + 7)  # shrink into a block it never sent
    os.chmod(pair.a("d/small"), 0o600)
    pair.ship(*_examine("big", "sparse", "d/small"))
    assert pair.kept() == pair.actual()

    os.rename(pair.a("d"), pair.a("moved"))
    pair.a("empty").unlink()
    pair.ship(Change("move", "srv/data/d", "srv/data/moved"), Change("delete", "srv/data/empty"))
    assert pair.kept() == pair.actual()
    assert set(pair.kept()) == {"srv/data/big", "srv/data/sparse", "srv/data/moved/small"}


def test_once_promoted_the_passive_ships_only_the_changed_block(pair: Pair) -> None:
    pair.a("big").write_bytes(os.urandom(256 * BS))  # 1 MiB
    pair.ship(*_examine("big"))
    with open(pair.a("big"), "r+b") as f:
        f.seek(100 * BS)
        f.write(os.urandom(BS))
    pair.ship(*_examine("big"))

    # Promotion: the passive's journaler starts from a metadata baseline of its own tree.
    promoted = Journaler(pair.passive.connect(), pair.passive_root, TREES, SETTINGS)
    promoted.baseline()
    assert shipped_under(pair.passive.db, "srv/data/big")["srv/data/big"].hashes == hash_file(pair.p("big"), BS)
    with open(pair.p("big"), "r+b") as f:
        f.seek(7 * BS)
        f.write(os.urandom(BS))
    promoted.process(_examine("big"))
    records = read_journal(pair.passive.db, 0, 1000, 1 << 40)
    assert sum(len(r.data) for r in records if r.op == "data") == BS, [(r.op, r.meta) for r in records]


def test_the_baseline_drops_hashes_of_a_file_changed_behind_the_engine(pair: Pair) -> None:
    pair.a("f").write_bytes(os.urandom(8 * BS))
    pair.ship(*_examine("f"))
    pair.p("f").write_bytes(os.urandom(8 * BS + 1))  # a new size: not the version the hashes describe
    Journaler(pair.passive.connect(), pair.passive_root, TREES, SETTINGS).baseline()
    assert shipped_under(pair.passive.db, "srv/data/f")["srv/data/f"].hashes is None


@pytest.mark.parametrize("seed", range(40))
def test_staged_digests_equal_a_fresh_hash_after_any_aligned_writes_and_resize(seed: int) -> None:
    """Random versions of one file: the digests derived from what was written (plus the base's)
    must equal hashing the result, for fresh stages and for copies of a hashed target."""
    import random

    from engine.blocks import hash_bytes
    from engine.held import StagedDigests
    from engine.manifest import Entry

    rng = random.Random(seed)
    bs = 64
    fresh = rng.random() < 0.4
    old = b"" if fresh else rng.randbytes(rng.randrange(0, 20 * bs))
    content = bytearray(old)
    staged = StagedDigests(bs)
    for _ in range(rng.randrange(0, 6)):
        offset = rng.randrange(0, 20) * bs
        data = rng.randbytes(rng.choice([bs, 3 * bs, rng.randrange(1, 4 * bs)]))
        if len(content) < offset:
            content.extend(bytes(offset - len(content)))
        content[offset : offset + len(data)] = data
        staged.add(offset, data)
    size = rng.choice([len(content), rng.randrange(0, 25 * bs)])
    content = content[:size] + bytes(max(0, size - len(content)))
    base = None if fresh else Entry("f", "file", 0o644, len(old), 1, None, hash_bytes(old, bs))
    got = staged.final(size, fresh=fresh, base=base, read_block=lambda i: bytes(content[i * bs : (i + 1) * bs]))
    assert got == hash_bytes(bytes(content), bs)


def test_a_sync_brings_the_digests_the_passive_keeps_without_hashing_again(pair: Pair, monkeypatch) -> None:
    data = os.urandom(3 << 20)
    pair.a("big").write_bytes(data[: 1 << 20] + bytes(3 * BS) + data[(1 << 20) + 3 * BS :] + b"tail")  # zeros mid-file
    pair.a("small").write_bytes(b"x" * 100)
    mine = {e.path: e for e in scan_tree(pair.active_root, TREES[0], block_size=BS, with_hashes=False)}

    def no_hashing(*args: object) -> bytes:
        raise AssertionError("the passive hashed data whose digests came along")

    monkeypatch.setattr(held, "hash_bytes", no_hashing)
    for op, meta, payload in repair_records(pair.active_root, diff(mine, {}), trees=TREES, block_size=BS,
                                            chunk=1 << 20):
        pair.applier.apply(op, meta, payload)
    pair.applier.end_batch()
    pair.held.flush()
    assert pair.p("big").read_bytes() == pair.a("big").read_bytes()
    assert pair.kept() == pair.actual()


@pytest.mark.parametrize("digests", ["zz" * 16, "00" * 15, 7])
def test_digests_that_do_not_fit_the_data_are_refused_naming_the_field(pair: Pair, digests: object) -> None:
    with pytest.raises(ProtocolError, match=r"data\.digests: expected 32 hex digits"):
        pair.applier.apply("data", {"path": "srv/data/f", "gid": 1, "offset": 0, "fresh": True,
                                    "digests": digests}, b"x" * 100)
    assert not list((pair.passive_root / "srv" / "data").rglob("*")), "a refused record left something behind"
