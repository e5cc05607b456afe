"""The role state machine, decided on snapshots: every outcome and its sentence."""
from __future__ import annotations

from engine.ha import Decision, PeerView, Snapshot, decide

TIMEOUT = 3.0


def passive(**kw: object) -> Snapshot:
    base: dict[str, object] = dict(node="secondary", role="passive", epoch=1, failover_timeout=TIMEOUT,
                                   peers=(PeerView("primary", "active", 1, 0.2, 10, True),))
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_a_passive_follows_a_live_active() -> None:
    assert decide(passive()) == Decision("none", "following primary at epoch 1")


def test_a_passive_promotes_when_every_check_holds() -> None:
    d = decide(passive(peers=(PeerView("primary", "active", 1, 3.1, 10, False),), active_answers=False))
    assert d.action == "promote" and d.epoch == 2
    assert d.sentence == ("promoted secondary: primary silent for 3.1 s, address unreachable, queue applied "
                          "(applied 0), epoch 2")


def test_no_promotion_before_the_receive_queue_is_applied() -> None:
    d = decide(passive(peers=(PeerView("primary", "active", 1, 5.0),), queue_records=7))
    assert d.action == "none" and "7 received record(s) are not applied yet" in d.sentence


def test_no_promotion_while_the_actives_address_answers() -> None:
    d = decide(passive(peers=(PeerView("primary", "active", 1, 5.0),), active_answers=True))
    assert d.action == "none" and "split-brain avoidance" in d.sentence


def test_three_nodes_need_a_majority() -> None:
    d = decide(passive(peers=(PeerView("primary", "active", 1, 9.0), PeerView("tertiary", "passive", 1, 8.0)),
                       active_answers=False))
    assert d.action == "none" and "only 1 of 3 nodes reachable (no majority)" in d.sentence


def test_the_most_up_to_date_passive_wins() -> None:
    peers = (PeerView("primary", "active", 1, 9.0), PeerView("tertiary", "passive", 1, 0.1, 50, True))
    behind = decide(passive(peers=peers, applied_seq=40, active_answers=False))
    assert behind.action == "none" and behind.sentence.startswith("deferring to tertiary")
    ahead = decide(passive(peers=peers, applied_seq=60, active_answers=False))
    assert ahead.action == "promote"


def test_equal_passives_break_the_tie_by_node_order() -> None:
    peers = (PeerView("primary", "active", 1, 9.0), PeerView("secondary", "passive", 1, 0.1, 50, True))
    tertiary = decide(passive(node="tertiary", peers=peers, applied_seq=50, active_answers=False))
    assert tertiary.sentence.startswith("deferring to secondary")
    peers = (PeerView("primary", "active", 1, 9.0), PeerView("tertiary", "passive", 1, 0.1, 50, True))
    assert decide(passive(peers=peers, applied_seq=50, active_answers=False)).action == "promote"


def test_an_active_that_sees_a_higher_epoch_steps_down() -> None:
    s = Snapshot("primary", "active", 1, (PeerView("secondary", "active", 2, 0.1, 0, True),), TIMEOUT)
    assert decide(s) == Decision("step_down", "stepping down: secondary is at epoch 2, above ours (1)", epoch=2)


def test_an_isolated_active_demotes_itself() -> None:
    s = Snapshot("primary", "active", 3, (PeerView("secondary", "passive", 3, 9.0),), TIMEOUT, public_ok=False)
    d = decide(s)
    assert d.action == "demote" and "self-isolation" in d.sentence


def test_an_active_with_silent_peers_but_public_network_holds() -> None:
    s = Snapshot("primary", "active", 3, (PeerView("secondary", "passive", 3, 9.0),), TIMEOUT, public_ok=True)
    assert decide(s).action == "none"


def test_a_passive_follows_the_active_with_the_highest_epoch() -> None:
    peers = (PeerView("primary", "active", 1, 4.0), PeerView("secondary", "active", 2, 0.1, 3, True))
    d = decide(passive(node="tertiary", peers=peers))
    assert d == Decision("adopt", "following secondary at epoch 2 (adopted; was 1)", epoch=2)


def test_a_passive_that_was_never_level_does_not_promote() -> None:
    d = decide(passive(peers=(PeerView("primary", "active", 1, 9.0),), active_answers=False, level=False))
    assert d.action == "none" and "never level" in d.sentence
