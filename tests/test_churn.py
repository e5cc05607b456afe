"""Replication under churn: a passive down and rejoining while writers churn the active's tree,
with a send queue small enough that both passives spill to their dirty lists over and over.

This is the story that found five bugs the unit tests had missed (a resync ended on a stale
ack, a renamed directory carried new content, a sync read "from the future" of the journal,
a replaced link's frames were applied, a verify drained too early): most of them ended with a
passive that said it was level and was not. So the test asks for what an operator
relies on: once the cluster says level, every tree is the active's, and `nf verify` agrees.

`NF_CHURN_SEEDS` runs more stories, for a soak outside CI: `NF_CHURN_SEEDS=1-30
./scripts/test.sh tests/test_churn.py` (about 45 s and 1 GB of disk per story, freed once it
passes).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from churn import Churn
from conftest import Demo, nf, tree_diff, wait_for

QUEUE_BYTES = 4 << 20  # a passive that lags by a few batches spills
FRAME_BYTES = 1 << 20  # at most the queue's size (the config refuses more)


def _seeds() -> list[int]:
    spec = os.environ.get("NF_CHURN_SEEDS", "1")
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", _seeds())
def test_trees_end_equal_after_churn_with_a_passive_down_and_both_spilling(demo: Demo, seed: int) -> None:
    demo.up(nodes=3)
    demo.down()
    text = demo.config.read_text()
    text, n = re.subn(r"(?m)^\[replication\].*$",
                      f"[replication]\nmax_frame_bytes = {FRAME_BYTES}\nsend_queue_max_bytes = {QUEUE_BYTES}", text)
    assert n == 1, text
    demo.config.write_text(text)
    demo.up(nodes=3)
    demo.kill("secondary")

    churn = Churn(demo.data("primary"), seed, total_bytes=300 << 20, seconds=24)
    churn.start()
    wait_for(lambda: churn.elapsed() >= 8, 60, "the writers' eighth second", interval=0.1)
    demo.start("secondary")  # rejoins mid-churn: a dirty-path resync while the tree keeps changing
    churn.join()

    doc = _wait_level(demo)
    active = doc["answered_by"]
    assert active == "primary", doc
    for node in ("secondary", "tertiary"):
        assert tree_diff(demo.data("primary"), demo.data(node)) == [], f"{node} after {churn.summary()}"
    verify = json.loads(nf("verify", "--config", str(demo.config), "--json", check=False).stdout)
    assert verify["differences"] == 0, verify
    spills = [e for e in demo.events("primary") if e["kind"] == "send_queue_overflow"]
    assert {e["message"].split()[3] for e in spills} == {"secondary", "tertiary"}, (
        f"the story must spill both passives to test their resyncs: {len(spills)} spill(s), "
        f"{churn.written >> 20} MiB written")
    demo.down()
    shutil.rmtree(demo.workdir)  # a passed story's gigabyte is not kept (a soak plays dozens)


def _wait_level(demo: Demo) -> dict:
    """The active's status once every passive is connected and level at its journal head, with
    nothing queued, dirty or syncing, in two answers a second apart (a head that moved between
    them was not the end)."""
    seen: list[int] = []

    def level() -> dict | None:
        doc = demo.status()
        active = [n for n in doc["nodes"] if n["role"] == "active"]
        if len(active) != 1 or doc["answered_by"] != active[0]["id"]:
            return None
        head = active[0]["applied_seq"]
        for n in doc["nodes"]:
            if n is active[0]:
                continue
            busy = (n["role"] != "passive" or not n["connected"] or n.get("syncing") or n.get("sync")
                    or n.get("dirty_paths") or n["applied_seq"] != head
                    or any(n.get(k) for k in ("send_queue_records", "send_queue_bytes",
                                              "receive_queue_records", "receive_queue_bytes")))
            if busy:
                seen.clear()
                return None
        seen.append(head)
        return doc if len(seen) >= 2 and seen[-2] == head else None

    return wait_for(level, 300, "every passive level with the active", interval=1.0)
