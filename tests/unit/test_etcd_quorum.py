"""Telling a lost quorum from other etcd failures, from the members' own answers."""

from __future__ import annotations

from vmha.etcd.quorum import Answer, quorum_lost

E1, E2, E3 = (f"https://198.18.1.{i}:2379" for i in (2, 3, 4))


def test_members_up_without_a_leader_is_quorum_lost() -> None:
    answers: dict[str, Answer] = {E1: (0xA, 0), E2: "connection refused", E3: "connection refused"}
    text = quorum_lost(answers)
    assert text is not None
    assert text.startswith("etcd lost quorum: up without a leader: https://198.18.1.2:2379 (member a)")
    assert "not answering: https://198.18.1.3:2379 (connection refused)" in text


def test_a_member_that_knows_a_leader_means_no_quorum_loss() -> None:
    # One member cut from the others (it has no leader) while the other two have one: no quorum loss.
    assert quorum_lost({E1: (0xA, 0), E2: (0xB, 0xC), E3: (0xC, 0xC)}) is None


def test_nobody_answering_says_nothing_about_quorum() -> None:
    # This process's own path is down: the cluster may be fine.
    assert quorum_lost({E1: "timeout", E2: "timeout", E3: "timeout"}) is None
    assert quorum_lost({}) is None
