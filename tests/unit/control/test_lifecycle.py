"""Lifecycle rules: completion, failure, walltime and deletion end a gang's leases."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from shared.control.lifecycle import (
    NOTHING,
    PodView,
    RunView,
    current_pods,
    deadline,
    decide,
)
from shared.engine.model import Closure, FundingKind, Lease, Role

T0 = datetime(2026, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
LIVE = RunView(present=True)


def lease(name: str, rank: int, *, role: Role = Role.ACTIVE, start: datetime = T0) -> Lease:
    return Lease(
        name=name,
        run=("ns", "train"),
        owner="org:a",
        node=f"n{rank}",
        gpus=8,
        role=role,
        group=0,
        rank=rank,
        envelope="b/e",
        payer_owner="org:a",
        funding=FundingKind.OWNED,
        start=start,
    )


GANG = (lease("l0", 0), lease("l1", 1), lease("s0", -1, role=Role.SPARE))


def pod(rank: int, phase: str, *, leases: tuple[str, ...] | None = None) -> PodView:
    names = frozenset((f"l{rank}",) if leases is None else leases)
    return PodView(name=f"train-g0-r{rank}", rank=rank, phase=phase, leases=names)


def test_a_running_gang_is_left_alone() -> None:
    assert decide(GANG, [pod(0, "Running"), pod(1, "Running")], LIVE, T0 + H) == NOTHING


def test_all_ranks_succeeded_closes_every_lease_completed() -> None:
    out = decide(GANG, [pod(0, "Succeeded"), pod(1, "Succeeded")], LIVE, T0 + H)
    assert out.closure is Closure.COMPLETED
    assert out.ends == (("l0", "Completed"), ("l1", "Completed"), ("s0", "Completed"))
    assert out.delete_pods == ()  # terminated pods are kept for their logs


def test_one_rank_still_running_is_not_completion() -> None:
    assert decide(GANG, [pod(0, "Succeeded"), pod(1, "Running")], LIVE, T0).idle


def test_a_missing_rank_pod_is_not_completion() -> None:
    assert decide(GANG, [pod(0, "Succeeded")], LIVE, T0).idle


def test_any_failed_rank_fails_the_gang_and_stops_the_others() -> None:
    out = decide(GANG, [pod(0, "Running"), pod(1, "Failed")], LIVE, T0)
    assert out.closure is Closure.FAIL
    assert {name for name, _ in out.ends} == {"l0", "l1", "s0"}
    assert all(closure == "Fail" for _, closure in out.ends)
    assert out.delete_pods == ("train-g0-r0",)
    assert "rank 1 failed" in out.message


def test_walltime_closes_time_limit_from_the_earliest_open_start() -> None:
    run = RunView(present=True, max_duration=2 * H)
    gang = (*GANG, lease("l2", 2, start=T0 + H))
    pods = [pod(0, "Running"), pod(1, "Running"), pod(2, "Running")]
    assert deadline(gang, run) == T0 + 2 * H
    assert decide(gang, pods, run, T0 + 2 * H - timedelta(seconds=1)).idle
    out = decide(gang, pods, run, T0 + 2 * H)
    assert out.closure is Closure.TIME_LIMIT
    assert len(out.ends) == 4
    assert out.delete_pods == ("train-g0-r0", "train-g0-r1", "train-g0-r2")


def test_no_max_duration_means_no_deadline() -> None:
    assert deadline(GANG, LIVE) is None
    assert decide(GANG, [pod(0, "Running"), pod(1, "Running")], LIVE, T0 + 1000 * H).idle


def test_completion_and_failure_outrank_the_walltime() -> None:
    run = RunView(present=True, max_duration=H)
    done = decide(GANG, [pod(0, "Succeeded"), pod(1, "Succeeded")], run, T0 + 5 * H)
    assert done.closure is Closure.COMPLETED
    failed = decide(GANG, [pod(0, "Failed"), pod(1, "Running")], run, T0 + 5 * H)
    assert failed.closure is Closure.FAIL


def test_a_deleted_run_cancels_its_leases_and_deletes_every_pod() -> None:
    pods = [pod(0, "Running"), pod(1, "Succeeded")]
    out = decide(GANG, pods, RunView(present=False), T0)
    assert out.closure is Closure.CANCELED
    assert all(closure == "Canceled" for _, closure in out.ends)
    assert out.delete_pods == ("train-g0-r0", "train-g0-r1")
    terminating = decide(GANG, pods, RunView(present=True, deleting=True), T0)
    assert terminating.closure is Closure.CANCELED


def test_cancel_outranks_completion() -> None:
    out = decide(GANG, [pod(0, "Succeeded"), pod(1, "Succeeded")], RunView(False), T0)
    assert out.closure is Closure.CANCELED


def test_a_deleted_run_without_open_leases_only_loses_leftover_pods() -> None:
    closed = tuple(replace(le, end=T0, closure="Completed") for le in GANG)
    out = decide(closed, [pod(0, "Succeeded")], RunView(False), T0)
    assert out.ends == ()
    assert out.delete_pods == ("train-g0-r0",)
    assert decide(closed, [], RunView(False), T0) == NOTHING
    assert decide(closed, [pod(0, "Succeeded")], LIVE, T0) == NOTHING


def test_pods_already_being_deleted_are_not_deleted_again() -> None:
    going = replace(pod(0, "Running"), deleting=True)
    out = decide(GANG, [going, pod(1, "Running")], RunView(False), T0)
    assert out.delete_pods == ("train-g0-r1",)


def test_pods_of_an_earlier_incarnation_do_not_count() -> None:
    stale = pod(1, "Failed", leases=("old-l1",))
    assert current_pods(GANG, [stale]) == []
    assert decide(GANG, [pod(0, "Running"), stale], LIVE, T0).idle
    # A pod that does not record its leases is matched by rank.
    anonymous = PodView("train-g0-r1", 1, "Failed")
    assert decide(GANG, [anonymous], LIVE, T0).closure is Closure.FAIL


def test_spares_alone_are_not_a_gang_to_complete() -> None:
    spares = (lease("s0", -1, role=Role.SPARE),)
    assert decide(spares, [], LIVE, T0).idle


def test_a_rank_whose_pod_is_gone_past_the_grace_fails_the_gang() -> None:
    survivors = [pod(0, "Running")]
    assert decide(GANG, survivors, LIVE, T0 + timedelta(seconds=29)).idle  # pod still coming
    out = decide(GANG, survivors, LIVE, T0 + timedelta(seconds=30))
    assert out.closure is Closure.FAIL
    assert "the pod of rank 1 is gone" in out.message
    assert out.delete_pods == ("train-g0-r0",)


def test_a_gone_pod_is_judged_by_its_own_leases_start() -> None:
    grown = (*GANG, lease("l2", 2, start=T0 + H))
    pods = [pod(0, "Running"), pod(1, "Running")]
    assert decide(grown, pods, LIVE, T0 + H + timedelta(seconds=5)).idle
    out = decide(grown, pods, LIVE, T0 + H + timedelta(seconds=31))
    assert out.closure is Closure.FAIL and "rank 2" in out.message
