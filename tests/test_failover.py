"""Failover in the local demo: real agents, the public identity moves, the old active steps down."""
from __future__ import annotations

import json
import sqlite3
import time

from conftest import Demo, assert_kept_aside, nf, wait_for
from engine.config import load_cluster
from engine.identity import probe


def _holder(demo: Demo) -> str | None:
    import asyncio

    cluster = load_cluster(demo.config)
    answer = asyncio.run(probe(cluster.name, cluster.public.addresses))
    return answer.node if answer else None


def test_killing_the_primary_makes_the_secondary_active(demo: Demo) -> None:
    demo.up(nodes=2)
    wait_for(lambda: _holder(demo) == "primary", 15, "the primary to hold the public identity")
    (demo.data("primary") / "acked").write_text("applied before the kill\n")
    demo.wait_equal(30, nodes=("secondary",))
    demo.kill("primary")
    wait_for(lambda: demo.node_status("secondary")["role"] == "active", 20, "the secondary to be active")
    assert _holder(demo) == "secondary"
    assert (demo.data("secondary") / "acked").read_text() == "applied before the kill\n"
    why = json.loads(nf("why", "--config", str(demo.config), "--json").stdout)
    sentences = [d["sentence"] for n in why["nodes"] for d in n.get("decisions", [])]
    assert any(s.startswith("promoted secondary: primary silent for") for s in sentences), sentences

    # the old active comes back: it sees the higher epoch, stays passive and resyncs
    (demo.data("secondary") / "after-failover").write_text("written on the new active\n")
    demo.start("primary")
    wait_for(lambda: demo.node_status("primary")["role"] == "passive", 20, "the old primary to step down")
    wait_for(lambda: (demo.data("primary") / "after-failover").exists(), 30, "the old primary to resync")
    assert _holder(demo) == "secondary"
    assert demo.status()["epoch"] == 2


def test_three_nodes_promote_exactly_one_passive(demo: Demo) -> None:
    demo.up(nodes=3)
    (demo.data("primary") / "f").write_text("x")
    demo.wait_equal(30)
    demo.kill("primary")
    wait_for(lambda: sum(n["role"] == "active" for n in demo.status()["nodes"]) == 1
             and demo.status()["epoch"] == 2, 20, "one new active at epoch 2")
    roles = {n["id"]: n["role"] for n in demo.status()["nodes"]}
    assert sorted(roles[n] for n in ("secondary", "tertiary")) == ["active", "passive"]


def test_forced_failover_to_a_named_node(demo: Demo) -> None:
    demo.up(nodes=3)
    refused = nf("failover", "--to", "tertiary", "--config", str(demo.config), "--json", check=False)
    assert refused.returncode == 1 and "--force" in json.loads(refused.stdout)["error"]["message"]
    demo.kill("primary")
    out = json.loads(nf("failover", "--force", "--to", "tertiary", "--config", str(demo.config), "--json").stdout)
    assert out["outcome"] == "promoted"
    wait_for(lambda: demo.node_status("tertiary")["role"] == "active", 10, "tertiary active")
    wait_for(lambda: demo.node_status("secondary")["role"] == "passive", 10, "secondary following it")


def _checksums(root) -> dict[str, str]:  # type: ignore[no-untyped-def]
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".nf-stage" not in p.parts}


def test_switchover_there_and_back_loses_nothing(demo: Demo) -> None:
    import os

    demo.up(nodes=2)
    d = demo.data("primary")
    for i in range(200):
        (d / f"s{i:03d}").write_bytes(os.urandom(2000 + i))
    out = json.loads(nf("switchover", "--config", str(demo.config), "--json").stdout)
    assert out["to"] == "secondary" and out["took_over"] and out["lost_records"] == 0
    assert out["unavailable_seconds"] < 5
    assert _checksums(demo.data("secondary")) == _checksums(d)
    wait_for(lambda: demo.node_status("secondary")["role"] == "active"
             and demo.node_status("primary")["role"] == "passive", 10, "roles swapped")

    wait_for(lambda: not demo.node_status("primary").get("syncing", True), 30, "the old primary to be level")
    (demo.data("secondary") / "written-on-secondary").write_bytes(os.urandom(5000))
    back = json.loads(nf("switchover", "--to", "primary", "--config", str(demo.config), "--json").stdout)
    assert back["to"] == "primary" and back["took_over"]
    assert _checksums(d) == _checksums(demo.data("secondary"))
    assert (d / "written-on-secondary").exists()
    assert _holder(demo) == "primary"


def test_a_paused_active_steps_down_when_it_resumes_and_never_answers_beside_the_new_one(demo: Demo) -> None:
    import os
    import signal

    demo.up(nodes=2)
    (demo.data("primary") / "before-pause").write_text("x")
    demo.wait_equal(30, nodes=("secondary",))
    pid = int((demo.workdir / "primary" / "agent.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: demo.node_status("secondary")["role"] == "active", 30,
                 "the secondary to promote while the primary is frozen")
        assert _holder(demo) is None, "the frozen primary's socket answers nothing, and the new active waits for it"
        # an application on the frozen node's machine keeps writing: after the fork, so a divergence
        (demo.data("primary") / "written-after-fork").write_text("only the old active has this\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: _holder(demo) == "secondary", 30, "the public identity to move once the old active lets go")
    wait_for(lambda: demo.node_status("primary")["role"] == "passive", 30, "the old active to step down")
    events = [e["message"] for e in demo.events("primary")]
    assert any("stepping down" in m for m in events), events

    # its post-fork write is kept aside, listed, and never merged into the new active
    assert_kept_aside(demo.config, "primary", "srv/data/written-after-fork", "only the old active has this\n")
    wait_for(lambda: not (demo.data("primary") / "written-after-fork").exists(), 30,
             "the old active to resync to the new active's tree")
    assert not (demo.data("secondary") / "written-after-fork").exists()
    missing = nf("divergence", "show", "--config", str(demo.config), "--node", "primary", "99", check=False)
    assert missing.returncode == 1 and "no divergence 99" in missing.stdout + missing.stderr


def test_an_active_killed_right_after_its_writes_were_applied_keeps_no_divergence_when_it_returns(demo: Demo) -> None:
    """What the new active had applied is not a divergence, even if the old active died before it
    persisted the acks: the new active says where it forked from the old journal."""
    demo.up(nodes=2)
    for i in range(30):
        (demo.data("primary") / f"f{i:02d}").write_text(f"acked {i}\n")
    demo.wait_equal(30, nodes=("secondary",))
    demo.kill("primary")  # within a second of the last ack: the persisted acks may lag behind
    wait_for(lambda: demo.node_status("secondary")["role"] == "active", 30, "the secondary to promote")
    demo.start("primary")
    wait_for(lambda: demo.node_status("primary")["role"] == "passive", 30, "the old active to step down")
    assert any("stepping down" in e["message"] for e in demo.events("primary"))
    listed = json.loads(nf("divergence", "list", "--config", str(demo.config), "--json").stdout)
    assert next(n for n in listed["nodes"] if n["node"] == "primary")["divergences"] == [], listed


def test_a_busy_state_database_on_the_active_stalls_neither_its_heartbeats_nor_its_answers(demo: Demo) -> None:
    """Under a burst of new files the journaler's groups hold the state database's write lock
    back to back. Held here for three failover timeouts, nothing the active's event loop does
    may wait for it: a wait of a second once made a passive promote in the middle of a burst."""
    demo.up(nodes=2)
    timeout = load_cluster(demo.config).heartbeat.failover_timeout
    db = sqlite3.connect(demo.workdir / "primary/state/state.db", isolation_level=None, timeout=10)
    db.execute("BEGIN IMMEDIATE")
    try:
        (demo.data("primary") / "written-while-busy").write_text("journaled once the lock is free\n")
        end = time.monotonic() + 3 * timeout
        while time.monotonic() < end:
            roles = {n["id"]: (n["role"], n["connected"]) for n in demo.status()["nodes"]}
            assert roles == {"primary": ("active", True), "secondary": ("passive", True)}, roles
    finally:
        db.execute("ROLLBACK")
        db.close()
    demo.wait_equal(30, nodes=("secondary",))
    assert [e["kind"] for e in demo.events("secondary") if e["kind"] == "role_changed"] == []
