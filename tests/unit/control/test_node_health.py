"""Node failure detection: deleted or NotReady past the grace, once per episode."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.control.node_health import (
    NODE_DELETED,
    NOT_READY,
    HealthState,
    NodeCondition,
    evaluate,
    has_failed,
    next_due,
    node_condition,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)
GRACE = 30 * S


def ready(name: str) -> NodeCondition:
    return NodeCondition(name, True, T0 - 100 * S)


def down(name: str, since: datetime | None = T0) -> NodeCondition:
    return NodeCondition(name, False, since)


def test_healthy_leased_nodes_do_not_fail() -> None:
    failures, state = evaluate({"a": ready("a")}, {"a"}, HealthState(), T0, GRACE)
    assert failures == ()
    assert state == HealthState()


def test_a_deleted_leased_node_fails_at_once_and_only_once() -> None:
    failures, state = evaluate({}, {"a"}, HealthState(), T0, GRACE)
    assert [(f.node, f.reason, f.since) for f in failures] == [("a", NODE_DELETED, T0)]
    again, state2 = evaluate({}, {"a"}, state, T0 + 5 * S, GRACE)
    assert again == ()
    assert state2.first_seen["a"] == T0


def test_not_ready_fails_only_after_the_grace() -> None:
    nodes = {"a": down("a", T0)}
    early, state = evaluate(nodes, {"a"}, HealthState(), T0 + 29 * S, GRACE)
    assert early == ()
    failures, state = evaluate(nodes, {"a"}, state, T0 + 30 * S, GRACE)
    assert [(f.node, f.reason, f.since) for f in failures] == [("a", NOT_READY, T0)]
    assert evaluate(nodes, {"a"}, state, T0 + 60 * S, GRACE)[0] == ()


def test_without_a_transition_time_the_grace_counts_from_first_sight() -> None:
    nodes = {"a": down("a", None)}
    none, state = evaluate(nodes, {"a"}, HealthState(), T0, GRACE)
    assert none == ()
    assert next_due(nodes, {"a"}, state, T0, GRACE) == T0 + GRACE
    failures, _ = evaluate(nodes, {"a"}, state, T0 + GRACE, GRACE)
    assert [f.since for f in failures] == [T0]


def test_nodes_without_open_leases_never_fail() -> None:
    failures, state = evaluate({"a": down("a", T0 - 99 * S)}, set(), HealthState(), T0, GRACE)
    assert failures == ()
    assert state.reported == frozenset()


def test_recovery_ends_the_episode_so_a_new_failure_is_reported_again() -> None:
    _, state = evaluate({}, {"a"}, HealthState(), T0, GRACE)
    assert state.reported == {"a"}
    _, state = evaluate({"a": ready("a")}, {"a"}, state, T0 + S, GRACE)
    assert state.reported == frozenset()
    failures, _ = evaluate({"a": down("a", T0 + 2 * S)}, {"a"}, state, T0 + 40 * S, GRACE)
    assert [f.reason for f in failures] == [NOT_READY]


def test_the_episode_ends_when_the_leases_are_gone() -> None:
    _, state = evaluate({}, {"a"}, HealthState(), T0, GRACE)
    _, state = evaluate({}, set(), state, T0 + S, GRACE)
    assert state.reported == frozenset()
    assert dict(state.first_seen) == {}


def test_several_nodes_fail_in_name_order() -> None:
    nodes = {"b": down("b", T0 - GRACE), "c": ready("c")}
    failures, _ = evaluate(nodes, {"a", "b", "c"}, HealthState(), T0, GRACE)
    assert [(f.node, f.reason) for f in failures] == [("a", NODE_DELETED), ("b", NOT_READY)]


def test_next_due_is_the_earliest_pending_grace_expiry() -> None:
    nodes = {"a": down("a", T0), "b": down("b", T0 - 10 * S), "c": ready("c")}
    assert next_due(nodes, {"a", "b", "c"}, HealthState(), T0, GRACE) == T0 + 20 * S
    reported = HealthState(reported=frozenset({"b"}))
    assert next_due(nodes, {"a", "b"}, reported, T0, GRACE) == T0 + 30 * S
    assert next_due(nodes, set(), HealthState(), T0, GRACE) is None


def test_node_condition_reads_the_ready_condition() -> None:
    obj = {
        "metadata": {"name": "a"},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ]
        },
    }
    assert node_condition(obj) == NodeCondition("a", False, T0)
    unknown = {"metadata": {"name": "a"}, "status": {"conditions": [{"type": "Ready"}]}}
    assert node_condition(unknown) == NodeCondition("a", False, None)
    ok = {
        "metadata": {"name": "a"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert node_condition(ok).ready
    cordoned = {"metadata": {"name": "a"}, "spec": {"unschedulable": True}, "status": ok["status"]}
    assert node_condition(cordoned).ready  # cordon is not a failure
    bad_time = {
        "metadata": {"name": "a"},
        "status": {
            "conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "x"}]
        },
    }
    assert node_condition(bad_time) == NodeCondition("a", False, None)


def test_one_nodes_failure_is_judged_by_the_same_rule_the_resolver_and_binder_re_check() -> None:
    """A claimed failure (``NODE_FAILED``, a ``NodeFailure:`` commit) holds only for a deleted
    node or one NotReady for the whole grace; Ready, or NotReady too briefly, is healthy."""
    assert has_failed(None, T0, GRACE)
    assert not has_failed(NodeCondition("n", True, T0 - 10 * GRACE), T0, GRACE)
    assert not has_failed(NodeCondition("n", False, T0 - GRACE + S), T0, GRACE)
    assert has_failed(NodeCondition("n", False, T0 - GRACE), T0, GRACE)
    # Without a transition time only an observation of its own can start the clock.
    assert not has_failed(NodeCondition("n", False), T0, GRACE)
    assert has_failed(NodeCondition("n", False), T0, GRACE, first_seen=T0 - GRACE)
