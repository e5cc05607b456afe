"""Failover in the local demo: real agents, the public identity moves, the old active steps down."""
from __future__ import annotations

import json

from conftest import Demo, nf, wait_for
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
