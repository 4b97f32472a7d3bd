"""The binder's commit re-check: capacity, budgets, claims, idempotency, pod changes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from shared.bus.messages import CommitRequest, LeaseEnd, RunRef
from shared.control.commit_check import (
    CommitPlan,
    ConflictReason,
    Inflight,
    PodState,
    Rejection,
    assumed_pods,
    check_commit,
    intent_lease,
    occupancy,
    plan_commit,
    pod_changes,
    pods_touched,
    reservation_of,
)
from shared.engine.bindplan import LeaseIntent, PodIntent
from shared.engine.model import (
    AggregateCap,
    Budget,
    Envelope,
    FundingKind,
    Lease,
    LeaseReason,
    Lending,
    Node,
    NodeCapacity,
    PodNeeds,
    ReservationClaim,
    Role,
    RunKey,
    RunRequest,
    Taint,
)
from shared.engine.state import ClusterState, Settings
from shared.engine.topology import node_from_labels

T0 = datetime(2026, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
RUN: RunKey = ("ns", "train")
OTHER: RunKey = ("ns", "other")
LABELS = {"region": "r", "cluster": "c", "fabric.domain": "d", "gpu.flavor": "H100"}


def _node(name: str, gpus: int = 8, *, ready: bool = True, cordoned: bool = False) -> Node:
    node = node_from_labels(
        name, LABELS, {"nvidia.com/gpu": str(gpus)}, ready=ready, cordoned=cordoned
    )
    assert isinstance(node, Node)
    return node


def _env(name: str, concurrency: int, *, lending: Lending | None = None) -> Envelope:
    return Envelope(
        budget="b",
        owner="org:a",
        name=name,
        flavor="H100",
        selector={"region": "r"},
        concurrency=concurrency,
        lending=lending or Lending(),
    )


BUDGETS = (
    Budget(
        name="b",
        owner="org:a",
        parents=(),
        envelopes=(
            _env("e", 16),
            _env("f", 8),
            _env("lend", 32, lending=Lending(allow=True, to=("org:*",), max_concurrency=4)),
        ),
        caps=(AggregateCap("b", "ef", "H100", ("b/e", "b/f"), max_concurrency=20),),
    ),
    Budget(
        name="h",
        owner="org:h",
        parents=(),
        envelopes=(
            replace(_env("hours", 64), budget="h", max_gpu_hours=100),
            replace(_env("window", 64), budget="h", start=T0 + H, end=T0 + 10 * H),
            replace(_env("early", 64), budget="h", start=T0 + H, admission_before_start=True),
            replace(
                _env("lend", 64, lending=Lending(allow=True, to=("*",), max_gpu_hours=50)),
                budget="h",
            ),
            replace(_env("c1", 64), budget="h"),
            replace(_env("c2", 64), budget="h"),
        ),
        caps=(AggregateCap("h", "pair", "H100", ("c1", "c2"), max_gpu_hours=100),),
    ),
)


def state(
    ledger: Iterable[Lease] = (),
    *,
    claims: Iterable[ReservationClaim] = (),
    now: datetime = T0,
    settings: Settings | None = None,
) -> ClusterState:
    nodes = [
        _node("n1"),
        _node("n2"),
        _node("n3"),
        _node("big", 64),
        _node("cordoned", cordoned=True),
        _node("down", ready=False),
    ]
    return ClusterState.build(
        now=now,
        nodes=nodes,
        budgets=BUDGETS,
        ledger=ledger,
        claims=claims,
        settings=settings,
    )


def intent(
    name: str,
    node: str = "n1",
    gpus: int = 8,
    *,
    rank: int = 0,
    envelope: str = "b/e",
    role: Role = Role.ACTIVE,
    funding: FundingKind = FundingKind.OWNED,
    run: RunKey = RUN,
    start: datetime = T0,
    expected_end: datetime | None = None,
    reason: LeaseReason = LeaseReason.START,
) -> LeaseIntent:
    return LeaseIntent(
        name=name,
        run=run,
        owner="org:a",
        node=node,
        gpus=gpus,
        role=role,
        group=0,
        rank=rank,
        envelope=envelope,
        payer_owner="org:a",
        funding=funding,
        start=start,
        reason=reason,
        expected_end=expected_end,
        comp_path=("GROUP[0]", f"RANK[{rank}]"),
    )


def held(name: str, node: str = "n1", gpus: int = 8, **kw: object) -> Lease:
    """An existing lease (of another run unless ``run`` is given)."""
    kw.setdefault("run", OTHER)
    return intent_lease(intent(name, node, gpus, **kw))  # type: ignore[arg-type]


def pod(rank: int = 0, node: str = "n1", gpus: int = 8, run: RunKey = RUN) -> PodIntent:
    return PodIntent(
        name=f"{run[1]}-g0-r{rank}",
        run=run,
        node=node,
        gpus=gpus,
        group=0,
        rank=rank,
        role=Role.ACTIVE,
        world_size=2,
        master=f"{run[1]}-g0-r0",
    )


def commit(
    leases: Iterable[LeaseIntent] = (),
    pods: Iterable[PodIntent] = (),
    ends: Iterable[tuple[str, str]] = (),
    reason: str = "",
) -> CommitRequest:
    return CommitRequest(
        key="k",
        run=RunRef(namespace=RUN[0], name=RUN[1], uid="uid", generation=1),
        version=0,
        leases=list(leases),
        pods=list(pods),
        ends=[LeaseEnd(name=n, closure=c) for n, c in ends],
        reason=reason,
    )


def rejected(result: CommitPlan | Rejection) -> Rejection:
    assert isinstance(result, Rejection), result
    return result


def accepted(result: CommitPlan | Rejection) -> CommitPlan:
    assert isinstance(result, CommitPlan), result
    return result


# --------------------------------------------------------------------------- acceptance


def test_a_fitting_commit_is_accepted_with_everything_to_write() -> None:
    req = commit([intent("l0", "n1", rank=0), intent("l1", "n2", rank=1)], [pod(0), pod(1, "n2")])
    plan = accepted(plan_commit(req, state()))
    assert [i.name for i in plan.creates] == ["l0", "l1"]
    assert [p.name for p in plan.pods] == ["train-g0-r0", "train-g0-r1"]
    assert plan.pod_leases["train-g0-r1"] == ("l1",)
    assert not plan.noop
    assert check_commit(req, state()) is None


# --------------------------------------------------------------------------- nodes


def test_a_node_never_holds_more_gpus_than_it_has() -> None:
    result = rejected(plan_commit(commit([intent("l0", "n1", 4)]), state([held("x", "n1", 6)])))
    assert result.reason is ConflictReason.NODE_CAPACITY
    assert "node n1 has 8 GPUs, 6 held; the commit needs 4 more" in result.message
    assert result.text.startswith("NodeCapacity: ")


def test_ends_in_the_same_commit_free_their_gpus_first() -> None:
    req = commit([intent("l0", "n1", 8)], ends=[("x", "Swap")])
    plan = accepted(plan_commit(req, state([held("x", "n1", 6)])))
    assert [(le.name, c) for le, c in plan.ends] == [("x", "Swap")]


def test_new_leases_of_one_commit_add_up_on_a_node() -> None:
    req = commit([intent("l0", "n1", 6, rank=0), intent("l1", "n1", 4, rank=1)])
    assert rejected(plan_commit(req, state())).reason is ConflictReason.NODE_CAPACITY


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        ("ghost", ConflictReason.UNKNOWN_NODE),
        ("cordoned", ConflictReason.NODE_UNSCHEDULABLE),
        ("down", ConflictReason.NODE_UNSCHEDULABLE),
    ],
)
def test_unknown_or_unschedulable_nodes_take_no_new_lease(
    node: str, reason: ConflictReason
) -> None:
    assert rejected(plan_commit(commit([intent("l0", node, 1)]), state())).reason is reason


def test_fill_lives_inside_spare_gpus() -> None:
    spare = held("s", "n1", 8, role=Role.SPARE)
    fill = intent("f0", "n1", 8, role=Role.BORROWED, envelope="b/f")
    assert isinstance(plan_commit(commit([fill]), state([spare])), CommitPlan)
    assert occupancy([spare, intent_lease(fill)]) == 8
    bigger = intent("f0", "n1", 8, role=Role.ACTIVE, envelope="b/f")
    assert rejected(plan_commit(commit([bigger]), state([spare]))).reason is (
        ConflictReason.NODE_CAPACITY
    )


def test_fill_goes_only_into_unfilled_spares_of_other_runs() -> None:
    spare = held("s", "n1", 8, role=Role.SPARE)
    first = held("f-old", "n1", 6, role=Role.BORROWED, run=("ns", "sweep"))
    fill = intent("f0", "n1", 4, role=Role.BORROWED, envelope="b/f")
    result = rejected(plan_commit(commit([fill]), state([spare, first])))
    assert result.reason is ConflictReason.FILL_ROOM
    assert result.text == (
        "FillRoom: node n1 has 2 unfilled spare GPUs of other runs; the commit borrows 4"
    )
    assert isinstance(
        plan_commit(commit([replace(fill, gpus=2)]), state([spare, first])), CommitPlan
    )
    reclaimed = commit([fill], ends=[("f-old", "ReclaimedBySpare")])
    assert isinstance(plan_commit(reclaimed, state([spare, first])), CommitPlan)


def test_fill_never_sits_in_its_own_runs_spares_or_on_free_gpus() -> None:
    own = held("s", "n1", 8, role=Role.SPARE, run=RUN)
    fill = intent("f0", "n1", 4, role=Role.BORROWED, envelope="b/f", rank=0)
    assert rejected(plan_commit(commit([fill]), state([own]))).reason is ConflictReason.FILL_ROOM
    assert rejected(plan_commit(commit([fill]), state())).reason is ConflictReason.FILL_ROOM


# --------------------------------------------------------------------------- budgets


def test_envelope_concurrency_is_a_hard_cap() -> None:
    ledger = [held("x", "n2", 8), held("y", "n3", 4)]
    result = rejected(plan_commit(commit([intent("l0", "n1", 8)]), state(ledger)))
    assert result.reason is ConflictReason.ENVELOPE_CONCURRENCY
    assert "envelope b/e allows 16 GPUs, 12 held; the commit adds 8" in result.message


def test_ending_leases_of_an_envelope_makes_room_in_it() -> None:
    ledger = [held("x", "n2", 8), held("y", "n3", 4)]
    req = commit([intent("l0", "n1", 8)], ends=[("y", "Shrink")])
    assert check_commit(req, state(ledger)) is None


def test_an_unknown_envelope_cannot_pay() -> None:
    req = commit([intent("l0", "n1", 1, envelope="b/nope")])
    assert rejected(plan_commit(req, state())).reason is ConflictReason.UNKNOWN_ENVELOPE


def test_aggregate_caps_bound_several_envelopes_together() -> None:
    ledger = [held("x", "n2", 8, envelope="b/e"), held("y", "n3", 6, envelope="b/e")]
    ok = commit([intent("l0", "n1", 6, envelope="b/f")])
    assert check_commit(ok, state(ledger)) is None
    over = commit([intent("l0", "n1", 7, envelope="b/f")])
    result = rejected(plan_commit(over, state(ledger)))
    assert result.reason is ConflictReason.AGGREGATE_CAP
    assert "aggregate cap b/ef allows 20 GPUs, 14 held; the commit adds 7" in result.message


def test_sponsor_leases_respect_the_lenders_sub_cap() -> None:
    lent = intent("l0", "n1", 4, envelope="b/lend", funding=FundingKind.SPONSOR)
    assert check_commit(commit([lent]), state()) is None
    too_much = replace(lent, gpus=5)
    result = rejected(plan_commit(commit([too_much]), state()))
    assert result.reason is ConflictReason.LENDING_LIMIT
    # Owned use of the same envelope is not lending.
    own = intent("l0", "n1", 8, envelope="b/lend")
    assert check_commit(commit([own]), state()) is None


def test_an_envelope_that_does_not_lend_cannot_sponsor() -> None:
    lent = intent("l0", "n1", 1, envelope="b/e", funding=FundingKind.SPONSOR)
    assert rejected(plan_commit(commit([lent]), state())).reason is ConflictReason.LENDING_LIMIT


# --------------------------------------------------------------------------- GPU-hours, windows


def hours(name: str, gpus: int, end: datetime | None = T0 + 10 * H, **kw: object) -> LeaseIntent:
    """A lease on node big, envelope h/hours (100 GPU-hours), expected to end at ``end``."""
    kw.setdefault("envelope", "h/hours")
    kw.setdefault("rank", 0)
    return intent(name, "big", gpus, expected_end=end, **kw)  # type: ignore[arg-type]


def test_envelope_gpu_hours_count_used_promised_and_what_the_commit_adds() -> None:
    # y used 4 × 2 h and is closed; x has used 4 × 2 h and is promised 4 × 8 h more.
    y = replace(intent_lease(hours("y", 4, run=OTHER)), end=T0 + 2 * H, closure="Completed")
    x = intent_lease(hours("x", 4, run=OTHER))
    now = T0 + 2 * H
    fits = commit([hours("l0", 6, start=now, end=now + 8 * H)])  # 48 more: 96 in all
    assert check_commit(fits, state([x, y], now=now)) is None
    over = commit([hours("l0", 7, start=now, end=now + 8 * H)])
    result = rejected(plan_commit(over, state([x, y], now=now)))
    assert result.reason is ConflictReason.ENVELOPE_GPU_HOURS
    assert result.text == (
        "EnvelopeGPUHours: envelope h/hours allows 100 GPU-hours, 48 used or promised; "
        "the commit adds 56"
    )


def test_leases_without_an_expected_end_are_priced_at_the_default_duration() -> None:
    settings = Settings(default_duration=10 * H)
    x = intent_lease(hours("x", 5, end=None, run=OTHER))  # 5 × 10 h
    fits = commit([hours("l0", 5, end=None)])
    assert check_commit(fits, state([x], settings=settings)) is None
    result = rejected(
        plan_commit(commit([hours("l0", 6, end=None)]), state([x], settings=settings))
    )
    assert "50 used or promised; the commit adds 60" in result.message
    # The default of 24 h makes even 5 GPUs too much.
    assert check_commit(fits, state([x])) is not None


def test_spare_gpu_hours_are_charged_at_the_spare_factor() -> None:
    gang = [hours("l0", 4), hours("s0", 8, role=Role.SPARE, rank=-1)]  # 40 h + 80 h × factor
    assert check_commit(commit(gang), state(settings=Settings(spare_factor=0.5))) is None
    result = rejected(plan_commit(commit(gang), state()))
    assert "0 used or promised; the commit adds 120" in result.message


def test_two_commits_that_each_fit_cannot_both_spend_the_same_hours() -> None:
    first = commit([hours("a0", 6)])
    second = commit([hours("b0", 6, run=RUN)])
    assert check_commit(first, state()) is None
    assert check_commit(second, state()) is None
    inflight = Inflight().with_commit([intent_lease(i) for i in first.leases], [])
    result = rejected(plan_commit(second, state(), inflight))
    assert result.reason is ConflictReason.ENVELOPE_GPU_HOURS
    assert "allows 100 GPU-hours, 60 used or promised; the commit adds 60" in result.message
    # Once the first is visible in the cache the answer is the same.
    seen = state([intent_lease(i) for i in first.leases])
    assert rejected(plan_commit(second, seen)).reason is ConflictReason.ENVELOPE_GPU_HOURS


def test_a_re_sent_commit_is_not_charged_for_its_own_hours_again() -> None:
    intents = [hours("l0", 8, rank=0), hours("l1", 2, rank=1)]
    full = state([intent_lease(i) for i in intents])  # 100 of 100 GPU-hours promised
    assert accepted(plan_commit(commit(intents), full)).noop
    inflight = Inflight().with_commit([intent_lease(i) for i in intents], [])
    assert accepted(plan_commit(commit(intents), state(), inflight)).noop
    partly = state([intent_lease(intents[0])])
    assert [i.name for i in accepted(plan_commit(commit(intents), partly)).creates] == ["l1"]


def test_ends_in_the_commit_free_their_promised_hours() -> None:
    x = intent_lease(hours("x", 8, run=OTHER))  # 80 promised
    start = commit([hours("l0", 8)])
    assert rejected(plan_commit(start, state([x]))).reason is ConflictReason.ENVELOPE_GPU_HOURS
    swap = commit([hours("l0", 8)], ends=[("x", "Shrink")])
    assert check_commit(swap, state([x])) is None
    in_flight_end = Inflight().with_commit([], [("x", "Completed")])
    assert check_commit(start, state([x]), in_flight_end) is None


def test_a_commit_that_adds_no_hours_passes_an_envelope_already_over() -> None:
    # Unbounded leases grow past their default: 8 GPUs × (10 h used + 24 h default) > 100.
    x = intent_lease(hours("x", 8, end=None, run=RUN, rank=0))
    late = state([x], now=T0 + 10 * H)
    swap = commit(
        [hours("x2", 8, end=None, start=T0 + 10 * H, reason=LeaseReason.SWAP)],
        ends=[("x", "NodeFailure")],
    )
    assert check_commit(swap, late) is None
    grow = commit([hours("l1", 1, end=None, start=T0 + 10 * H, rank=1)])
    result = rejected(plan_commit(grow, late))
    assert "allows 100 GPU-hours, 272 used or promised; the commit adds 24" in result.message


def test_a_lease_dated_after_now_is_still_counted() -> None:
    skewed = commit([hours("l0", 11, start=T0 + H / 60, end=T0 + 10 * H)])
    assert rejected(plan_commit(skewed, state())).reason is ConflictReason.ENVELOPE_GPU_HOURS


def test_lending_gpu_hours_bound_only_what_is_lent() -> None:
    kw: dict[str, object] = {"envelope": "h/lend", "funding": FundingKind.SPONSOR}
    x = intent_lease(hours("x", 2, run=OTHER, **kw))  # 20 lent
    fits = commit([hours("l0", 3, **kw)])
    assert check_commit(fits, state([x])) is None
    result = rejected(plan_commit(commit([hours("l0", 4, **kw)]), state([x])))
    assert result.reason is ConflictReason.LENDING_LIMIT
    assert result.message == (
        "envelope h/lend lends at most 50 GPU-hours, 20 lent or promised; the commit borrows 40"
    )
    own = commit([hours("l0", 8, envelope="h/lend")])  # 80 h, but not lent
    assert check_commit(own, state([x])) is None


def test_aggregate_cap_gpu_hours_bound_its_envelopes_together() -> None:
    x = intent_lease(hours("x", 6, run=OTHER, envelope="h/c1"))  # 60
    assert check_commit(commit([hours("l0", 4, envelope="h/c2")]), state([x])) is None
    result = rejected(plan_commit(commit([hours("l0", 5, envelope="h/c2")]), state([x])))
    assert result.reason is ConflictReason.AGGREGATE_CAP
    assert result.message == (
        "aggregate cap h/pair allows 100 GPU-hours, 60 used or promised; the commit adds 50"
    )


@pytest.mark.parametrize(
    ("now", "why"),
    [
        (T0, "envelope h/window opens at 2026-01-01T01:00:00+00:00 and does not admit before it"),
        (T0 + 10 * H, "envelope h/window closed at 2026-01-01T10:00:00+00:00"),
    ],
)
def test_new_leases_need_their_envelopes_window_open(now: datetime, why: str) -> None:
    req = commit([intent("l0", envelope="h/window", start=now)])
    result = rejected(plan_commit(req, state(now=now)))
    assert result.reason is ConflictReason.ENVELOPE_WINDOW
    assert result.message.startswith(why)
    assert check_commit(req, state(now=T0 + H)) is None


def test_windows_follow_cover_pre_activation_and_spare_swaps() -> None:
    early = commit([intent("l0", envelope="h/early")])  # allowAdmission before start
    assert check_commit(early, state()) is None
    # A swap moves GPUs the envelope already pays; a re-sent start writes nothing.
    x = intent_lease(intent("x", "n1", run=RUN, envelope="h/window", start=T0 + H))
    late = state([x], now=T0 + 11 * H)
    swap = commit(
        [intent("x2", "n2", envelope="h/window", start=T0 + 11 * H, reason=LeaseReason.SWAP)],
        ends=[("x", "NodeFailure")],
    )
    assert check_commit(swap, late) is None
    restart = replace(swap.leases[0], reason=LeaseReason.START)
    start = commit([restart], ends=[("x", "NodeFailure")])
    assert rejected(plan_commit(start, late)).reason is ConflictReason.ENVELOPE_WINDOW
    assert accepted(plan_commit(commit([intent("x", envelope="h/window")]), late)).noop


# --------------------------------------------------------------------------- reservations


def _claim(run: RunKey = OTHER, name: str = "res", start: datetime = T0 + H) -> ReservationClaim:
    return ReservationClaim(name=name, run=run, earliest_start=start, nodes=("n1",), gpus=6)


def test_gpus_promised_to_a_reservation_are_protected() -> None:
    result = rejected(plan_commit(commit([intent("l0", "n1", 4)]), state(claims=[_claim()])))
    assert result.reason is ConflictReason.PROTECTED
    assert "6 of its 8 GPUs are promised" in result.message
    assert check_commit(commit([intent("l0", "n1", 2)]), state(claims=[_claim()])) is None


def test_backfill_that_ends_before_the_reservation_may_use_its_gpus() -> None:
    short = intent("l0", "n1", 8, expected_end=T0 + H)
    assert check_commit(commit([short]), state(claims=[_claim()])) is None
    too_long = intent("l0", "n1", 8, expected_end=T0 + 2 * H)
    assert check_commit(commit([too_long]), state(claims=[_claim()])) is not None


def test_the_activating_reservation_and_the_runs_own_claims_do_not_block_it() -> None:
    req = commit([intent("l0", "n1", 8)], reason="Reservation:ns/res")
    assert check_commit(req, state(claims=[_claim()])) is None
    wrong_ns = commit([intent("l0", "n1", 8)], reason="Reservation:elsewhere/res")
    assert check_commit(wrong_ns, state(claims=[_claim()])) is not None
    assert check_commit(commit([intent("l0", "n1", 8)]), state(claims=[_claim(RUN)])) is None


def test_reservation_reasons_parse() -> None:
    assert reservation_of("Reservation:ns/big") == ("ns", "big")
    assert reservation_of("Reservation:nope") is None
    assert reservation_of("Start") is None


# --------------------------------------------------------------------------- idempotency


def test_a_re_sent_commit_is_a_no_op_even_on_a_now_full_node() -> None:
    intents = [intent("l0", "n1", 8, rank=0)]
    ledger = [intent_lease(i) for i in intents] + [held("x", "n2", 8)]
    plan = accepted(plan_commit(commit(intents, [pod(0)]), state(ledger)))
    assert plan.noop
    assert plan.existing == ("l0",)
    assert [p.name for p in plan.pods] == ["train-g0-r0"]  # its pod may still be missing


def test_a_partly_applied_commit_checks_only_what_is_missing() -> None:
    intents = [intent("l0", "n1", 8, rank=0), intent("l1", "n2", 8, rank=1)]
    plan = accepted(plan_commit(commit(intents), state([intent_lease(intents[0])])))
    assert [i.name for i in plan.creates] == ["l1"]
    assert plan.existing == ("l0",)


def test_pods_of_closed_leases_are_not_recreated() -> None:
    intents = [intent("l0", "n1", 8, rank=0)]
    closed = replace(intent_lease(intents[0]), end=T0 + H, closure="Completed")
    plan = accepted(plan_commit(commit(intents, [pod(0)]), state([closed])))
    assert plan.noop
    assert plan.pods == ()


def test_ending_an_already_closed_lease_is_skipped() -> None:
    closed = replace(held("x"), end=T0, closure="Fail")
    plan = accepted(plan_commit(commit(ends=[("x", "Fail")]), state([closed])))
    assert plan.ends == ()
    assert plan.already_ended == ("x",)
    assert plan.noop


def test_ending_an_unknown_lease_is_a_stale_proposal() -> None:
    result = rejected(plan_commit(commit(ends=[("ghost", "Fail")]), state()))
    assert result.reason is ConflictReason.UNKNOWN_LEASE


# --------------------------------------------------------------------------- in-flight commits


def test_commits_written_but_not_yet_watched_still_count() -> None:
    first = [intent("l0", "n1", 8)]
    inflight = Inflight().with_commit([intent_lease(i) for i in first], [])
    second = commit([intent("o0", "n1", 1, run=RUN)])
    assert rejected(plan_commit(second, state(), inflight)).reason is (ConflictReason.NODE_CAPACITY)
    # The first commit re-sent is recognised through the in-flight view too.
    assert accepted(plan_commit(commit(first), state(), inflight)).noop


def test_in_flight_ends_free_capacity_and_settle_once_watched() -> None:
    x = held("x", "n1", 8)
    inflight = Inflight().with_commit([], [("x", "Completed")])
    assert check_commit(commit([intent("l0", "n1", 8)]), state([x]), inflight) is None
    assert accepted(plan_commit(commit(ends=[("x", "Fail")]), state([x]), inflight)).ends == ()
    # The cache still shows x open: keep the entry; once it shows x closed, drop it.
    assert inflight.settle({"x": x}) == inflight
    closed = replace(x, end=T0, closure="Completed")
    assert not inflight.settle({"x": closed})
    created = Inflight().with_commit([x], [])
    assert not created.settle({"x": x})


# --------------------------------------------------------------------------- shape


@pytest.mark.parametrize(
    "req",
    [
        commit([intent("l0", "n1", 1), intent("l0", "n2", 1)]),
        commit([intent("l0", "n1", 1, run=OTHER)]),
        commit([intent("l0", "n1", 1)], ends=[("l0", "Fail")]),
        commit(ends=[("x", "Fail"), ("x", "Fail")]),
        commit([intent("l0", "n1", 0)]),
        commit([intent("l0", "n1", 1)], [pod(0, "n2")]),
        commit([intent("l0", "n1", 1)], [pod(0), pod(0)]),
        commit([intent("l0", "n1", 1)], [pod(0, run=OTHER)]),
    ],
)
def test_malformed_commits_are_invalid(req: CommitRequest) -> None:
    result = rejected(plan_commit(req, state([held("x", "n3", 1)])))
    assert result.reason is ConflictReason.INVALID


# --------------------------------------------------------------------------- pod changes


def _pods(*states: PodState) -> dict[tuple[str, str], PodState]:
    return {p.key: p for p in states}


def test_a_new_gang_creates_every_pod() -> None:
    plan = accepted(plan_commit(commit([intent("l0")], [pod(0)]), state()))
    changes = pod_changes(plan, {})
    assert [p.name for p in changes.create] == ["train-g0-r0"]
    assert changes.delete == changes.replace == ()


def test_the_same_incarnation_on_its_node_is_left_alone() -> None:
    intents = [intent("l0")]
    plan = accepted(plan_commit(commit(intents, [pod(0)]), state([intent_lease(intents[0])])))
    running = PodState("ns", "train-g0-r0", "n1", "Running", ("l0",))
    assert pod_changes(plan, _pods(running)).create == ()


def test_a_stale_or_terminated_pod_under_the_same_name_is_replaced() -> None:
    plan = accepted(plan_commit(commit([intent("l9")], [pod(0)]), state()))
    old = PodState("ns", "train-g0-r0", "n1", "Running", ("l0",))
    changes = pod_changes(plan, _pods(old))
    assert changes.replace == (("ns", "train-g0-r0"),)
    assert [p.name for p in changes.create] == ["train-g0-r0"]
    done = PodState("ns", "train-g0-r0", "n1", "Failed", ("l9",))
    assert pod_changes(plan, _pods(done)).replace == (("ns", "train-g0-r0"),)


def test_ended_ranks_lose_running_pods_but_keep_terminated_ones() -> None:
    mine = held("m0", "n1", 8, run=RUN)
    plan = accepted(plan_commit(commit(ends=[("m0", "Shrink")]), state([mine])))
    running = PodState("ns", "train-g0-r0", "n1", "Running", ("m0",))
    assert pod_changes(plan, _pods(running)).delete == (("ns", "train-g0-r0"),)
    finished = replace(running, phase="Succeeded")
    assert pod_changes(plan, _pods(finished)).delete == ()


def test_a_swap_moves_the_rank_pod_to_the_spare_node() -> None:
    failed = held("m0", "n1", 8, run=RUN)
    spare = held("s0", "n2", 8, run=RUN, role=Role.SPARE, rank=-1)
    req = commit(
        [intent("m1", "n2", 8)], [pod(0, "n2")], ends=[("m0", "NodeFailure"), ("s0", "Swap")]
    )
    plan = accepted(plan_commit(req, state([failed, spare])))
    old = PodState("ns", "train-g0-r0", "n1", "Running", ("m0",))
    changes = pod_changes(plan, _pods(old))
    assert changes.delete == ()
    assert changes.replace == (("ns", "train-g0-r0"),)
    assert [p.node for p in changes.create] == ["n2"]


def test_ends_of_other_runs_delete_their_pods_in_their_own_namespace() -> None:
    victim = held("v0", "n1", 8, run=("team-b", "victim"))
    req = commit([intent("l0", "n1", 8)], [pod(0)], ends=[("v0", "RandomPreempt(abc)")])
    plan = accepted(plan_commit(req, state([victim])))
    theirs = PodState("team-b", "victim-g0-r0", "n1", "Running", ("v0",))
    same_name_elsewhere = PodState("ns", "victim-g0-r0", "n1", "Running", ("zz",))
    changes = pod_changes(plan, _pods(theirs, same_name_elsewhere))
    assert changes.delete == (("team-b", "victim-g0-r0"),)
    assert [p.name for p in changes.create] == ["train-g0-r0"]


def test_a_commit_touches_only_its_new_ranks_pods_and_the_pods_of_ranks_it_ends() -> None:
    victim = held("v0", "n1", 8, run=("team-b", "victim"))
    spare = held("s0", "n2", 8, run=("team-b", "victim"), role=Role.SPARE, rank=-1)
    req = commit(
        [intent("l0", "n1", 8)], [pod(0)], ends=[("v0", "RandomPreempt(abc)"), ("s0", "Swap")]
    )
    plan = accepted(plan_commit(req, state([victim, spare])))
    assert pods_touched(plan) == {("ns", "train-g0-r0"), ("team-b", "victim-g0-r0")}
    theirs = PodState("team-b", "victim-g0-r0", "n1", "Running", ("v0",))
    unrelated = PodState("ns", "other-g0-r0", "n3", "Running", ("o0",))
    everything = _pods(theirs, unrelated)
    touched = {k: v for k, v in everything.items() if k in pods_touched(plan)}
    assert pod_changes(plan, touched) == pod_changes(plan, everything)


# --------------------------------------------------------------------------- live ranks


def test_a_start_reusing_a_live_rank_is_invalid_on_another_node_or_the_same_one() -> None:
    live = held("m0", "n1", 8, run=RUN)
    elsewhere = commit([intent("m9", "n2", 8, reason=LeaseReason.GROW)], [pod(0, "n2")])
    result = rejected(plan_commit(elsewhere, state([live])))
    assert result.reason is ConflictReason.INVALID
    assert "rank 0 of ns/train already runs on n1" in result.message
    # Same node, another lease name: the rank would hold its GPUs twice.
    twice = commit([intent("m9", "big", 8, reason=LeaseReason.GROW)], [pod(0, "big")])
    on_big = held("m0", "big", 8, run=RUN)
    assert rejected(plan_commit(twice, state([on_big]))).reason is ConflictReason.INVALID


def test_a_re_sent_start_and_a_swap_do_not_clash_with_their_own_leases() -> None:
    start = [intent("m0", "n1", 8)]
    applied = state([intent_lease(start[0])])
    assert accepted(plan_commit(commit(start, [pod(0)]), applied)).creates == ()
    failed = held("m0", "n1", 8, run=RUN)
    swap = commit([intent("m1", "n2", 8)], [pod(0, "n2")], ends=[("m0", "NodeFailure")])
    assert [i.name for i in accepted(plan_commit(swap, state([failed]))).creates] == ["m1"]


# --------------------------------------------------------------------------- other pods, rank fit


def test_gpus_of_pods_jobtree_did_not_create_count_against_the_node() -> None:
    base = state()
    crowded = replace(base, topology=base.topology.with_pods([("lab/nb", "n1", (4, 0, 0, 0))]))
    result = rejected(plan_commit(commit([intent("l0", "n1", 8)], [pod(0)]), crowded))
    assert result.reason is ConflictReason.NODE_CAPACITY
    assert "node n1 has 8 GPUs, 0 held and 4 by other pods; the commit needs 8 more" in (
        result.message
    )
    accepted(plan_commit(commit([intent("l0", "n1", 4)], [pod(0, gpus=4)]), crowded))


def test_a_rank_pod_its_kubelet_would_refuse_is_rejected() -> None:
    base = state()
    n1 = base.topology.node("n1")
    assert n1 is not None
    capacity = NodeCapacity(cpu=64_000, memory=512 * 2**30, ephemeral=0, pods=110)
    tainted = replace(n1, capacity=capacity, taints=(Taint("maintenance", "", "NoSchedule"),))
    request = RunRequest(key=RUN, uid="uid", owner="org:a", flavor="H100", total_gpus=8)
    on_tainted = replace(base, topology=base.topology.with_node(tainted), runs={RUN: request})
    result = rejected(plan_commit(commit([intent("l0", "n1")], [pod(0)]), on_tainted))
    assert result.reason is ConflictReason.POD_FIT
    assert result.message == "node n1: a rank pod of ns/train does not fit (tainted)"
    hungry = replace(request, pod=PodNeeds(memory=100 * 2**30))
    full = replace(n1, capacity=capacity)
    busy = base.topology.with_node(full).with_pods([("lab/db", "n1", (0, 0, 450 * 2**30, 0))])
    result = rejected(
        plan_commit(
            commit([intent("l0", "n1")], [pod(0)]), replace(base, topology=busy, runs={RUN: hungry})
        )
    )
    assert result.message == "node n1: a rank pod of ns/train does not fit (too little memory)"


def test_pods_of_an_accepted_commit_count_before_the_watch_shows_them() -> None:
    """Commit A's rank pod is assumed on n1 at once: commit B, which would fit on its own, is
    refused for memory instead of both reaching a kubelet that takes only one of them."""
    base = state()
    n1 = base.topology.node("n1")
    assert n1 is not None
    capacity = NodeCapacity(cpu=64_000, memory=512 * 2**30, ephemeral=0, pods=110)
    other = RunRequest(key=OTHER, uid="u2", owner="org:a", flavor="H100", total_gpus=4)
    needs = PodNeeds(cpu=8000, memory=100 * 2**30)
    mine = RunRequest(key=RUN, uid="uid", owner="org:a", flavor="H100", total_gpus=4, pod=needs)
    runs = {RUN: mine, OTHER: replace(other, pod=needs)}
    topology = base.topology.with_node(replace(n1, capacity=capacity)).with_pods(
        [("lab/db", "n1", (0, 0, 350 * 2**30, 0))]
    )
    fresh = replace(base, topology=topology, runs=runs)
    a = commit([intent("a0", "n1", 4)], [pod(0, gpus=4)])
    assert not isinstance(plan_commit(a, fresh), Rejection)
    assumed = assumed_pods([pod(0, gpus=4)], fresh)
    assert assumed == (("ns/train-g0-r0", "n1", (0, 8000, 100 * 2**30, 0)),)
    b = msgspec.structs.replace(
        commit([intent("b0", "n1", 4, run=OTHER)], [pod(0, gpus=4, run=OTHER)]),
        run=RunRef(namespace="ns", name="other", uid="u2", generation=1),
    )
    assert not isinstance(plan_commit(b, fresh), Rejection), "B alone fits"
    after_a = replace(fresh, topology=topology.with_pods(assumed))
    result = rejected(plan_commit(b, after_a))
    assert result.reason is ConflictReason.POD_FIT
    assert "too little memory" in result.message
