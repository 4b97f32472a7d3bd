"""Run status rules: phases from leases, closures, tenancy, upstreams and reservations."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.control import run_status as rs
from shared.control.dependencies import Ready, UpstreamFailed, Waiting
from shared.control.pod_policy import PodPolicyConfig, check_template
from shared.control.tenancy import check_owner
from shared.engine.accounting import RunFunding
from shared.engine.model import (
    FundingKind,
    Lease,
    LeaseReason,
    Malleable,
    Role,
    RunRequest,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = ("team", "train")


def request(total: int = 16, **kw: Any) -> RunRequest:
    return RunRequest(key=KEY, uid="u1", owner="org:ai", flavor="H100-80GB", total_gpus=total, **kw)


ELASTIC = request(
    8, group_gpus=8, malleable=Malleable(min_gpus=8, max_gpus=32, step_gpus=8, desired_gpus=24)
)


def lease(
    name: str,
    *,
    group: int = 0,
    rank: int = 0,
    gpus: int = 8,
    start: datetime = T0,
    end: datetime | None = None,
    closure: str | None = None,
    role: Role = Role.ACTIVE,
    reason: LeaseReason = LeaseReason.START,
    funding: FundingKind = FundingKind.OWNED,
) -> Lease:
    return Lease(
        name=name,
        run=KEY,
        owner="org:ai",
        node=f"node-{name}",
        gpus=gpus,
        role=role,
        group=group,
        rank=rank,
        envelope="b/e",
        payer_owner="org:ai" if funding is FundingKind.OWNED else "org:ml",
        funding=funding,
        start=start,
        reason=reason,
        end=end,
        closure=closure,
    )


def closed(name: str, closure: str, at: timedelta, **kw: Any) -> Lease:
    return lease(name, end=T0 + at, closure=closure, **kw)


def facts(
    req: RunRequest | None = None,
    *,
    status: dict[str, Any] | None = None,
    leases: tuple[Lease, ...] = (),
    now: datetime = T0 + timedelta(hours=1),
    **kw: Any,
) -> rs.Facts:
    return rs.Facts(
        request=req or request(),
        generation=2,
        status=status or {},
        leases=leases,
        now=now,
        dependency=kw.pop("dependency", Ready()),
        **kw,
    )


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = [c for c in status["conditions"] if c["type"] == type_]
    assert found, f"no {type_} condition in {status['conditions']}"
    return dict(found[0])


# -- helpers --------------------------------------------------------------------------------------


def test_typed_message_and_reason_token() -> None:
    assert rs.typed_message("NoCapacity", "need 16") == "NoCapacity: need 16"
    assert rs.typed_message("InsufficientCapacity", "InsufficientCapacity: x") == (
        "InsufficientCapacity: x"
    )
    assert rs.reason_token("RandomPreempt(abc123)") == "RandomPreempt"
    assert rs.reason_token("Fail") == "Fail"


def test_width_fixed_and_malleable() -> None:
    assert rs.width_status(request(16), (), phase="Pending") == {
        "min": 16,
        "max": 16,
        "desired": 16,
        "allocated": 0,
        "pending": 16,
    }
    open_ = (lease("a"), lease("s", role=Role.SPARE, gpus=2))
    assert rs.width_status(ELASTIC, open_, phase="Running") == {
        "min": 8,
        "max": 32,
        "desired": 24,
        "allocated": 8,
        "pending": 16,
    }
    assert rs.width_status(ELASTIC, (), phase="Failed")["pending"] == 0


def test_merge_conditions_keeps_transition_time_while_status_holds() -> None:
    prev = {
        "conditions": [
            {
                "type": "Scheduled",
                "status": "False",
                "reason": "NoCapacity",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
            {"type": "AtRisk", "status": "True", "reason": "Lottery"},
            {"type": "WaitingForUpstream", "status": "True", "reason": "WaitingForUpstream"},
        ]
    }
    same = rs.merge_conditions(
        prev, [rs.Cond("Scheduled", "False", "NoEnvelope", "m")], now=T0, generation=4
    )
    assert same == [
        {
            "type": "Scheduled",
            "status": "False",
            "reason": "NoEnvelope",
            "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 4,
        }
    ]
    flipped = rs.merge_conditions(
        prev, [rs.Cond("Scheduled", "True", "Bound")], now=T0, generation=4
    )
    assert flipped[0]["lastTransitionTime"] == "2026-03-01T12:00:00Z"


# -- attempts and closures ------------------------------------------------------------------------


def test_outcome_all_completed() -> None:
    ended = rs.attempt_outcome(
        (closed("a", "Completed", timedelta(hours=1)), closed("b", "Completed", timedelta(hours=1)))
    )
    assert ended == rs.Ended("Completed", "Completed", ("a", "b"))


def test_outcome_open_lease_means_no_outcome() -> None:
    assert rs.attempt_outcome((closed("a", "Fail", timedelta(hours=1)), lease("b"))) is None
    assert rs.attempt_outcome(()) is None


def test_outcome_gang_failure_names_the_closure() -> None:
    ended = rs.attempt_outcome(
        (closed("a", "Fail", timedelta(hours=1)), closed("b", "Fail", timedelta(hours=1)))
    )
    assert ended is not None and ended.outcome == "Failed" and ended.closure == "Fail"


def test_outcome_swap_earlier_does_not_fail_a_completed_gang() -> None:
    ended = rs.attempt_outcome(
        (
            closed("a", "NodeFailure", timedelta(minutes=10)),
            closed("spare", "Swap", timedelta(minutes=10), role=Role.SPARE, rank=-1),
            lease(
                "a2",
                start=T0 + timedelta(minutes=10),
                reason=LeaseReason.SWAP,
                end=T0 + timedelta(hours=1),
                closure="Completed",
            ),
            closed("b", "Completed", timedelta(hours=1), rank=1),
        )
    )
    assert ended is not None and ended.outcome == "Completed"


def test_outcome_partial_cut_of_malleable_group_does_not_decide() -> None:
    ended = rs.attempt_outcome(
        (
            closed("g1", "RandomPreempt(s33d)", timedelta(minutes=5), group=1, rank=1),
            closed("g0", "Completed", timedelta(hours=2)),
        )
    )
    assert ended is not None and ended.outcome == "Completed"


def test_outcome_preempted_and_canceled() -> None:
    cut = rs.attempt_outcome((closed("a", "RandomPreempt(s33d)", timedelta(hours=1)),))
    assert cut == rs.Ended("Failed", "RandomPreempt(s33d)", ("a",))
    gone = rs.attempt_outcome((closed("a", "Canceled", timedelta(hours=1)),))
    assert gone is not None and gone.outcome == "Canceled"


def test_current_attempt_by_start_instants() -> None:
    first = (closed("a", "Fail", timedelta(minutes=5)),)
    later = T0 + timedelta(hours=1)
    second = (
        lease("a2", start=later),
        lease("g", start=later + timedelta(minutes=9), reason=LeaseReason.GROW, group=1),
    )
    assert rs.current_attempt(first, 0) == first
    assert rs.current_attempt(first, 1) is None
    assert rs.current_attempt(first + second, 1) == second


# -- assess ---------------------------------------------------------------------------------------


def test_terminal_runs_are_left_alone() -> None:
    for phase in ("Completed", "Failed"):
        verdict = rs.assess(facts(status={"phase": phase}, leases=(lease("a"),)))
        assert isinstance(verdict, rs.Hold) and verdict.retry is None


def test_open_leases_mean_running_with_width_and_funding() -> None:
    leases = (lease("a"), lease("b", rank=1, funding=FundingKind.SPONSOR))
    verdict = rs.assess(
        facts(status={"phase": "Reserved", "pendingReservation": "r"}, leases=leases)
    )
    assert isinstance(verdict, rs.Observe) and not verdict.grow and not verdict.shrink
    status = verdict.status
    assert status["phase"] == "Running" and "pendingReservation" not in status
    assert status["width"] == {"min": 16, "max": 16, "desired": 16, "allocated": 16, "pending": 0}
    assert status["funding"]["ownedGPUs"] == 8 and status["funding"]["borrowedGPUs"] == 8
    assert status["funding"]["ownedGPUHours"] == 8.0
    assert status["funding"]["sponsors"] == [
        {"owner": "org:ml", "kind": "sponsor", "gpus": 8, "gpuHours": 8.0}
    ]
    assert cond(status, "Scheduled")["reason"] == "Bound"
    assert status["observedGeneration"] == 2 and status["restarts"] == 0


def test_malleable_below_desired_grows_and_above_desired_shrinks() -> None:
    grow = rs.assess(facts(ELASTIC, leases=(lease("g0"),)))
    assert isinstance(grow, rs.Observe) and grow.grow
    lowered = dataclasses.replace(
        ELASTIC, malleable=Malleable(min_gpus=8, max_gpus=32, step_gpus=8, desired_gpus=8)
    )
    three = (lease("g0"), lease("g1", group=1, rank=1), lease("g2", group=2, rank=2))
    shrink = rs.assess(facts(lowered, leases=three))
    assert isinstance(shrink, rs.Observe) and not shrink.grow
    assert shrink.shrink == ("g2", "g1")  # highest index first
    at = rs.assess(facts(ELASTIC, leases=(*three[:2], lease("g2", group=2, rank=2))))
    assert isinstance(at, rs.Observe) and not at.grow and not at.shrink


def test_completed_attempt_completes_the_run() -> None:
    verdict = rs.assess(
        facts(status={"phase": "Running"}, leases=(closed("a", "Completed", timedelta(hours=1)),))
    )
    assert isinstance(verdict, rs.Settle)
    assert verdict.status["phase"] == "Completed"
    assert verdict.status["width"]["allocated"] == 0
    assert verdict.status["funding"]["ownedGPUHours"] == 8.0
    assert cond(verdict.status, "Completed")["status"] == "True"


def test_failed_attempt_with_checkpoint_requeues_then_starts_again() -> None:
    req = request(checkpoint=timedelta(minutes=30), max_restarts=2)
    leases = (closed("a", "NodeFailure", timedelta(minutes=20)),)
    verdict = rs.assess(facts(req, status={"phase": "Running"}, leases=leases))
    assert isinstance(verdict, rs.Settle)
    status = verdict.status
    assert status["phase"] == "Pending" and status["restarts"] == 1
    assert cond(status, "Requeued")["reason"] == "NodeFailure"
    assert "restart 1 of 2" in status["message"]
    again = rs.assess(facts(req, status=status, leases=leases))
    assert isinstance(again, rs.StartNeeded)


def test_failure_without_restarts_left_fails_with_the_reason() -> None:
    req = request(checkpoint=timedelta(minutes=30), max_restarts=1)
    leases = (
        closed("a", "Fail", timedelta(minutes=20)),
        lease(
            "a2", start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=2), closure="TimeLimit"
        ),
    )
    verdict = rs.assess(
        facts(
            req,
            status={"phase": "Running", "restarts": 1},
            leases=leases,
            now=T0 + timedelta(hours=3),
        )
    )
    assert isinstance(verdict, rs.Settle) and verdict.result == "failed"
    assert verdict.status["phase"] == "Failed"
    assert cond(verdict.status, "Failed")["reason"] == "TimeLimit"
    assert "no restarts left" in verdict.status["message"]


def test_preempted_without_checkpoint_fails_naming_the_seed() -> None:
    leases = (closed("a", "RandomPreempt(abc)", timedelta(minutes=20)),)
    verdict = rs.assess(facts(status={"phase": "Running"}, leases=leases))
    assert isinstance(verdict, rs.Settle)
    assert cond(verdict.status, "Failed")["reason"] == "RandomPreempt"
    assert "RandomPreempt(abc)" in verdict.status["message"]
    assert "no checkpoint" in verdict.status["message"]


def test_canceled_leases_hold() -> None:
    verdict = rs.assess(facts(leases=(closed("a", "Canceled", timedelta(minutes=1)),)))
    assert isinstance(verdict, rs.Hold)


def test_unauthorized_fails_with_condition() -> None:
    denied = check_owner("org:ai", "team", {"rq.davidlangworthy.io/owners": "org:ml:*"})
    verdict = rs.assess(facts(denied=denied))
    assert isinstance(verdict, rs.Settle) and verdict.result == "failed"
    status = verdict.status
    assert status["phase"] == "Failed" and status["message"].startswith("Unauthorized:")
    assert "'org:ai'" in status["message"] and "'team'" in status["message"]
    assert cond(status, "Unauthorized")["status"] == "True"
    assert cond(status, "Failed")["reason"] == "Unauthorized"


def test_a_template_the_pod_policy_refuses_fails_with_reason_pod_policy() -> None:
    template = {"spec": {"containers": [{"name": "c", "securityContext": {"privileged": True}}]}}
    refusal = check_template(template, PodPolicyConfig())
    verdict = rs.assess(facts(policy=refusal))
    assert isinstance(verdict, rs.Settle) and verdict.result == "failed"
    field = "spec.template.spec.containers[0].securityContext.privileged"
    assert verdict.status["message"] == f"PodPolicy: {field} is true"
    assert cond(verdict.status, "Failed")["reason"] == "PodPolicy"
    running = rs.assess(facts(policy=refusal, leases=(lease("a"),)))
    assert isinstance(running, rs.Observe)  # a Run already running keeps its pods


def test_upstreams() -> None:
    failed = rs.assess(facts(dependency=UpstreamFailed(("prep",))))
    assert isinstance(failed, rs.Settle)
    assert failed.status["phase"] == "Failed"
    assert cond(failed.status, "Failed")["reason"] == "UpstreamFailed"
    waiting = rs.assess(facts(dependency=Waiting(("prep",), ())))
    assert isinstance(waiting, rs.Settle)
    assert waiting.status["phase"] == "Pending"
    assert cond(waiting.status, "WaitingForUpstream")["status"] == "True"
    assert cond(waiting.status, "Scheduled")["reason"] == "WaitingForUpstream"


def test_live_reservation_means_reserved_keeping_the_typed_message() -> None:
    resv = rs.LiveReservation("train-r", T0 + timedelta(hours=5), "Pending")
    prev = rs.reserved_status(
        facts(),
        reservation="train-r",
        earliest_start=T0 + timedelta(hours=5),
        reason="InsufficientCapacity",
        message="InsufficientCapacity: short by 8",
    )
    verdict = rs.assess(facts(status=prev, reservation=resv))
    assert isinstance(verdict, rs.Settle) and verdict.result == "reserved"
    status = verdict.status
    assert status["phase"] == "Reserved" and status["pendingReservation"] == "train-r"
    assert status["earliestStart"] == "2026-03-01T17:00:00Z"
    assert status["message"] == "InsufficientCapacity: short by 8"
    assert cond(status, "Scheduled")["reason"] == "InsufficientCapacity"
    assert not rs.needs_write(prev, status, hours_matter=True)
    admin = rs.assess(facts(reservation=resv))
    assert isinstance(admin, rs.Settle)
    assert admin.status["message"] == "Reserved: waiting for Reservation train-r"


def test_grace_while_the_cache_catches_up() -> None:
    now = T0 + timedelta(hours=1)
    bound = rs.running_status(facts(now=now), (), RunFunding())
    hold = rs.assess(facts(status=bound, now=now + timedelta(seconds=5)))
    assert isinstance(hold, rs.Hold) and hold.retry is not None
    late = rs.assess(facts(status=bound, now=now + timedelta(minutes=5)))
    assert isinstance(late, rs.StartNeeded)
    reserved = rs.reserved_status(
        facts(now=now),
        reservation="r",
        earliest_start=now,
        reason="NoCapacity",
        message="NoCapacity: x",
    )
    assert isinstance(rs.assess(facts(status=reserved, now=now + timedelta(seconds=5))), rs.Hold)
    assert isinstance(
        rs.assess(facts(status=reserved, now=now + timedelta(minutes=5))), rs.StartNeeded
    )


def test_fresh_run_needs_a_start() -> None:
    assert isinstance(rs.assess(facts()), rs.StartNeeded)


def test_needs_write_ignores_moving_gpu_hours_unless_refreshing() -> None:
    one = rs.assess(facts(leases=(lease("a"),), now=T0 + timedelta(hours=1)))
    assert isinstance(one, rs.Observe)
    current = {
        **one.status,
        "conditions": [*one.status["conditions"], {"type": "AtRisk", "status": "True"}],
        "x": 1,
    }
    two = rs.assess(facts(status=current, leases=(lease("a"),), now=T0 + timedelta(hours=2)))
    assert isinstance(two, rs.Observe)
    assert not rs.needs_write(current, two.status, hours_matter=False)
    assert rs.needs_write(current, two.status, hours_matter=True)
    assert rs.needs_write({}, two.status, hours_matter=False)


def test_pending_status_shapes() -> None:
    status = rs.pending_status(
        facts(),
        "NoCapacity",
        "NoCapacity: need 16",
        condition_message="NoCapacity: need 16 (forecast unavailable)",
    )
    assert status["phase"] == "Pending" and status["message"] == "NoCapacity: need 16"
    assert cond(status, "Scheduled")["message"].endswith("(forecast unavailable)")
    assert "funding" not in status and "pendingReservation" not in status


def test_bound_status_funds_the_plan_even_when_it_starts_after_now() -> None:
    planned = (lease("p0", start=T0 + timedelta(hours=1, seconds=2)), lease("p1", rank=1))
    status = rs.bound_status(facts(now=T0 + timedelta(hours=1)), planned)
    assert status["phase"] == "Running"
    assert status["width"]["allocated"] == 16
    assert status["funding"]["ownedGPUs"] == 16


def test_may_grow_only_running_runs_below_desired() -> None:
    """Admission re-examines these when capacity frees (not only on the periodic resync)."""
    width = {"min": 32, "max": 128, "desired": 128, "pending": 64}
    assert rs.may_grow({"phase": "Running", "width": {**width, "allocated": 64}})
    assert not rs.may_grow({"phase": "Running", "width": {**width, "allocated": 128}})
    assert not rs.may_grow({"phase": "Running", "width": {**width, "desired": 64, "allocated": 96}})
    assert not rs.may_grow({"phase": "Pending", "width": {**width, "allocated": 0}})
    assert not rs.may_grow({"phase": "Completed", "width": {**width, "allocated": 0}})
    assert not rs.may_grow({"phase": "Running"})
    assert not rs.may_grow(None)


def test_requeue_after_a_node_failure_names_the_node_failure_not_the_bystanders_fail() -> None:
    """The failed node's Lease closes ``NodeFailure``, the rest of the gang ``Fail`` in the same
    commit (and may sort first by name): the Run was requeued because of the node failure."""
    req = request(checkpoint=timedelta(minutes=30), max_restarts=2)
    leases = (
        closed("a-g0-r0", "Fail", timedelta(minutes=20)),
        closed("b-g0-r1", "NodeFailure", timedelta(minutes=20), rank=1),
    )
    ended = rs.attempt_outcome(leases)
    assert ended is not None and ended.closure == "NodeFailure"
    verdict = rs.assess(facts(req, status={"phase": "Running"}, leases=leases))
    assert isinstance(verdict, rs.Settle)
    status = verdict.status
    assert status["message"] == "Requeued from checkpoint after NodeFailure (restart 1 of 2)"
    assert cond(status, "Requeued")["reason"] == "NodeFailure"
    assert "after Fail" not in cond(status, "Requeued")["message"]


def test_reserved_run_keeps_the_typed_reason_of_the_blocked_attempt() -> None:
    """RESERVE timed out (the Run stayed Pending with its typed reason) while the forecaster
    still made the Reservation, whose status the cache does not show yet: the Run must not
    trade its typed reason for the generic waiting message, which never outlives a typed one."""
    pending = rs.pending_status(
        facts(),
        "NoFit",
        "NoFit: needs 16 GPUs; largest H100-80GB domain has 8 free GPUs",
        condition_message="NoFit: … (forecast unavailable: 408 timeout)",
    )
    bare = rs.LiveReservation("train-r", T0 + timedelta(hours=5), "Pending")
    first = rs.assess(facts(status=pending, reservation=bare))
    assert isinstance(first, rs.Settle)
    assert first.status["message"].startswith("NoFit: needs 16 GPUs")
    assert cond(first.status, "Scheduled")["reason"] == "NoFit"
    # A Run showing the generic message takes the Reservation's typed one once it has it.
    generic = rs.assess(facts(reservation=bare))
    assert isinstance(generic, rs.Settle)
    typed = dataclasses.replace(bare, message="NoFunding: envelope b/e has 0 GPUs free")
    later = rs.assess(facts(status=generic.status, reservation=typed))
    assert isinstance(later, rs.Settle)
    assert later.status["message"] == "NoFunding: envelope b/e has 0 GPUs free"
    assert cond(later.status, "Scheduled")["reason"] == "NoFunding"
