"""The binder's justification of a commit (``shared.control.commit_trust``), pure.

The scene is ``test_commit_check``'s: nodes n1–n3 (8 GPUs, region r), budget ``b`` of ``org:a``
(envelopes e, f, lend) and budget ``h`` of ``org:h``. The committing Run ``ns/train`` belongs to
``org:a`` and asks for 16 H100 GPUs in region r.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import msgspec.structs
import pytest

from shared.bus.messages import CommitRequest
from shared.control.commit_check import ConflictReason, Inflight, ledger_view, plan_commit
from shared.control.commit_trust import Authority, ReservationTruth, RunTruth, verify_commit
from shared.engine.model import (
    Budget,
    FundingKind,
    Lease,
    LeaseReason,
    Lending,
    Role,
    RunRequest,
)
from shared.engine.state import ClusterState

from .test_commit_check import (
    BUDGETS,
    OTHER,
    RUN,
    T0,
    _env,
    _node,
    accepted,
    commit,
    held,
    intent,
    pod,
    state,
)

H = timedelta(hours=1)
TEAM_Z = Budget(
    name="z",
    owner="acme:z",
    parents=(),
    envelopes=(
        replace(_env("main", 64), budget="z", owner="acme:z"),
        replace(
            _env("lend", 64, lending=Lending(allow=True, to=("org:a",))), budget="z", owner="acme:z"
        ),
        replace(
            _env("closed", 64, lending=Lending(allow=True, to=("other:*",))),
            budget="z",
            owner="acme:z",
        ),
    ),
)


def with_team_z() -> ClusterState:
    """The scene plus ``acme:z``: no family of ``org:a``, with roomy envelopes."""
    nodes = [_node("n1"), _node("n2"), _node("n3")]
    return ClusterState.build(now=T0, nodes=nodes, budgets=(*BUDGETS, TEAM_Z))


REQUEST = RunRequest(
    key=RUN, uid="uid", owner="org:a", flavor="H100", total_gpus=16, selector={"region": "r"}
)
TRUTH = RunTruth(uid="uid", request=REQUEST)


def authority(truth: RunTruth | None = TRUTH, **kw: object) -> Authority:
    return Authority(run=truth, clock=T0, **kw)  # type: ignore[arg-type]


def judge(
    req: CommitRequest, st: ClusterState | None = None, auth: Authority | None = None
) -> ConflictReason | None:
    """The reason ``verify_commit`` refuses with, None when it accepts."""
    st = st or state()
    plan = accepted(plan_commit(req, st))
    refused = verify_commit(req, plan, st, ledger_view(st, Inflight()), auth or authority())
    return None if refused is None else refused.reason


def start(*leases_pods: tuple[str, str, int]) -> CommitRequest:
    """A start of one 8-GPU (or given) rank per (name, node, gpus), with the ranks' pods."""
    leases = [intent(n, node, g, rank=i) for i, (n, node, g) in enumerate(leases_pods)]
    return commit(leases, [pod(i, node, g) for i, (_, node, g) in enumerate(leases_pods)])


HONEST = start(("l0", "n1", 8), ("l1", "n2", 8))


def test_an_honest_start_is_justified() -> None:
    assert judge(HONEST) is None


# --------------------------------------------------------------------------- the Run


def test_a_start_needs_the_runs_uid_its_existence_and_this_incarnation() -> None:
    nameless = msgspec.structs.replace(HONEST, run=msgspec.structs.replace(HONEST.run, uid=""))
    assert judge(nameless) is ConflictReason.INVALID
    assert judge(HONEST, auth=authority(None)) is ConflictReason.RUN_NOT_FOUND
    assert judge(HONEST, auth=authority(replace(TRUTH, uid="old"))) is ConflictReason.STALE_RUN
    deleting = replace(TRUTH, deleting=True)
    assert judge(HONEST, auth=authority(deleting)) is ConflictReason.RUN_DELETING


def test_tenancy_and_dependencies_are_the_binders_own_findings() -> None:
    denied = replace(TRUTH, denied="namespace 'ns' is not authorised for owner 'org:a'")
    assert judge(HONEST, auth=authority(denied)) is ConflictReason.UNAUTHORIZED
    waiting = replace(TRUTH, waiting="WaitingForUpstream: waiting for prep to complete")
    assert judge(HONEST, auth=authority(waiting)) is ConflictReason.DEPENDENCIES
    # A Run already running grows whatever its dependencies say now.
    grow = commit([intent("g", "n3", rank=1, reason=LeaseReason.GROW)], [pod(1, "n3")])
    assert judge(grow, auth=authority(waiting)) is None


# --------------------------------------------------------------------------- new Leases


def test_each_new_lease_is_the_runs_owners() -> None:
    forged = commit([replace(intent("l0"), owner="org:h")], [pod(0)])
    assert judge(forged) is ConflictReason.OWNER


def test_a_payer_outside_the_family_and_the_sponsors_is_refused() -> None:
    st = with_team_z()
    stolen = replace(intent("l0"), envelope="z/main", payer_owner="acme:z")
    assert judge(commit([stolen], [pod()]), st) is ConflictReason.PAYER
    # Its lending envelope lends to org:a, but the Run names no sponsor.
    as_sponsor = replace(stolen, envelope="z/lend", funding=FundingKind.SPONSOR)
    assert judge(commit([as_sponsor], [pod()]), st) is ConflictReason.PAYER


def test_a_sponsor_pays_only_when_the_run_may_borrow_from_it_and_it_lends() -> None:
    st = with_team_z()
    lent = replace(
        intent("l0"), envelope="z/lend", payer_owner="acme:z", funding=FundingKind.SPONSOR
    )
    borrower = replace(REQUEST, allow_borrow=True, sponsors=("acme:z",))
    ok = authority(replace(TRUTH, request=borrower))
    assert judge(commit([lent], [pod()]), st, ok) is None
    no_acl = replace(lent, envelope="z/closed")
    assert judge(commit([no_acl], [pod()]), st, ok) is ConflictReason.PAYER
    without = authority(replace(TRUTH, request=replace(borrower, allow_borrow=False)))
    assert judge(commit([lent], [pod()]), st, without) is ConflictReason.PAYER
    capped = authority(replace(TRUTH, request=replace(borrower, max_borrow_gpus=4)))
    assert judge(commit([lent], [pod()]), st, capped) is ConflictReason.PAYER


def test_the_funding_class_and_payer_owner_must_be_covers() -> None:
    wrong_class = commit([replace(intent("l0"), funding=FundingKind.FAMILY)], [pod()])
    assert judge(wrong_class) is ConflictReason.PAYER
    wrong_payer = commit([replace(intent("l0"), payer_owner="org:h")], [pod()])
    assert judge(wrong_payer) is ConflictReason.PAYER


def test_nodes_are_in_the_runs_flavor_and_location() -> None:
    elsewhere = authority(replace(TRUTH, request=replace(REQUEST, selector={"region": "x"})))
    assert judge(HONEST, auth=elsewhere) is ConflictReason.PLACEMENT
    other_flavor = authority(replace(TRUTH, request=replace(REQUEST, flavor="A100")))
    # Cover lists no A100 envelope: the payer is refused before the node.
    assert judge(HONEST, auth=other_flavor) is ConflictReason.PAYER


def test_a_lease_starts_near_the_binders_clock() -> None:
    late = start(("l0", "n1", 8))
    assert judge(late, auth=replace(authority(), clock=T0 + timedelta(seconds=90))) is None
    for drift in (timedelta(minutes=3), -timedelta(hours=2)):
        auth = replace(authority(), clock=T0 + drift)
        assert judge(late, auth=auth) is ConflictReason.START_TIME


def test_the_expected_end_is_the_runs_walltime() -> None:
    timed = authority(replace(TRUTH, request=replace(REQUEST, max_duration=2 * H)))
    assert judge(commit([intent("l0", expected_end=T0 + 2 * H)], [pod()]), auth=timed) is None
    for end in (None, T0 + H, T0 + 3 * H):
        req = commit([intent("l0", expected_end=end)], [pod()])
        assert judge(req, auth=timed) is ConflictReason.INVALID
    assert judge(commit([intent("l0", expected_end=T0 + H)], [pod()])) is ConflictReason.INVALID


def test_a_run_never_holds_more_working_gpus_than_its_widest_start() -> None:
    leases = [intent(f"l{i}", f"n{i + 1}", rank=i, envelope="b/lend") for i in range(3)]
    wide = commit(leases, [pod(i, f"n{i + 1}") for i in range(3)])
    assert judge(wide) is ConflictReason.INVALID


def test_a_swap_needs_a_node_the_binder_sees_failed() -> None:
    lost = held("old", "n1", run=RUN)
    st = state([lost])
    swap = commit(
        [intent("new", "n2", reason=LeaseReason.SWAP)],
        [pod(0, "n2")],
        ends=[("old", "NodeFailure")],
        reason="NodeFailure:n1",
    )
    assert judge(swap, st) is ConflictReason.UNJUSTIFIED
    assert judge(swap, st, authority(failed_nodes=frozenset({"n1"}))) is None


# --------------------------------------------------------------------------- pods


def test_each_pod_asks_for_exactly_its_ranks_lease_gpus() -> None:
    greedy = commit([intent("l0", gpus=4)], [pod(0, gpus=8)])
    assert judge(greedy) is ConflictReason.POD_GPUS
    modest = commit([intent("l0", gpus=8)], [pod(0, gpus=4)])
    assert judge(modest) is ConflictReason.POD_GPUS


def test_a_pod_carries_its_ranks_name() -> None:
    renamed = commit([intent("l0")], [replace(pod(0), name="train-g0-r7")])
    assert judge(renamed) is ConflictReason.INVALID


# --------------------------------------------------------------------------- ends


def theirs(name: str, node: str = "n1", **kw: object) -> Lease:
    """Another Run's lease (paid from the roomy ``b/lend``, so budgets never get in the way)."""
    kw.setdefault("envelope", "b/lend")
    return held(name, node, **kw)


def test_another_runs_lease_is_never_ended_without_a_verifiable_cause() -> None:
    st = state([theirs("victim")])
    for closure, reason in (
        ("Completed", ""),
        ("Completed", "Lifecycle:Completed"),
        ("Shrink", "Shrink"),
        ("Canceled", "Grow"),
    ):
        assert judge(commit(ends=[("victim", closure)], reason=reason), st) is (
            ConflictReason.UNJUSTIFIED
        )


def test_the_runs_own_ends_need_its_lifecycle_or_its_desired_width() -> None:
    st = state([held("mine", run=RUN)])
    done = commit(ends=[("mine", "Completed")], reason="Lifecycle:Completed")
    assert judge(done, st) is ConflictReason.UNJUSTIFIED
    agrees = authority(replace(TRUTH, lifecycle={"mine": "Completed"}))
    assert judge(done, st, agrees) is None
    other_closure = authority(replace(TRUTH, lifecycle={"mine": "Fail"}))
    assert judge(done, st, other_closure) is ConflictReason.UNJUSTIFIED
    shrink = commit(ends=[("mine", "Shrink")], reason="Shrink")
    assert judge(shrink, st) is ConflictReason.UNJUSTIFIED
    wanted = authority(replace(TRUTH, shrinkable=frozenset({"mine"})))
    assert judge(shrink, st, wanted) is None
    # A lifecycle end of a Run that is gone (Canceled) names no uid.
    gone = authority(RunTruth(uid="", request=None, lifecycle={"mine": "Canceled"}))
    cancel = commit(ends=[("mine", "Canceled")], reason="Lifecycle:Canceled")
    cancel = msgspec.structs.replace(cancel, run=msgspec.structs.replace(cancel.run, uid=""))
    assert judge(cancel, st, gone) is None


FAILED = authority(failed_nodes=frozenset({"n1"}))


@pytest.mark.parametrize(
    ("leases", "end", "ok"),
    [
        # On the failed node: NodeFailure, whoever's.
        ([theirs("x", "n1")], ("x", "NodeFailure"), True),
        ([theirs("x", "n2")], ("x", "NodeFailure"), False),
        # A gang on the failed node loses its other leases (Fail / Shrink), others do not.
        ([theirs("x", "n1"), theirs("y", "n2")], ("y", "Fail"), True),
        ([theirs("x", "n2"), theirs("y", "n3")], ("y", "Fail"), False),
        # Its spares end Swap; a working lease never does.
        ([theirs("x", "n1"), theirs("s", "n2", role=Role.SPARE, rank=-1)], ("s", "Swap"), True),
        ([theirs("x", "n1"), theirs("y", "n2")], ("y", "Swap"), False),
        # Fill where that gang's spare is: ReclaimedBySpare; fill elsewhere: not.
        (
            [
                theirs("x", "n1"),
                theirs("s", "n2", role=Role.SPARE, rank=-1),
                held("fill", "n2", run=("ns", "opp"), role=Role.BORROWED),
            ],
            ("fill", "ReclaimedBySpare"),
            True,
        ),
        (
            [theirs("x", "n1"), held("fill", "n3", run=("ns", "opp"), role=Role.BORROWED)],
            ("fill", "ReclaimedBySpare"),
            False,
        ),
        ([theirs("x", "n1")], ("x", "Completed"), False),
    ],
)
def test_a_node_failure_ends_what_its_plan_would(
    leases: list[Lease], end: tuple[str, str], ok: bool
) -> None:
    req = commit(ends=[end], reason="NodeFailure:n1")
    st = state(leases)
    assert judge(req, st, FAILED) is (None if ok else ConflictReason.UNJUSTIFIED)
    # And nothing at all while the node is healthy.
    assert judge(req, st) is ConflictReason.UNJUSTIFIED


RESV = ReservationTruth(
    namespace="ns",
    name="r",
    run=RUN,
    run_uid="uid",
    state="Active",
    earliest_start=T0,
    ended=frozenset({"a", "b"}),
    seed="s33d",
)


def activation(ends: list[tuple[str, str]]) -> CommitRequest:
    return commit([intent("l0", "n3")], [pod(0, "n3")], ends=ends, reason="Reservation:ns/r")


def test_an_activation_ends_exactly_its_published_audit() -> None:
    st = state([theirs("a", "n1"), theirs("b", "n2"), theirs("c", "n2")])
    good = activation([("a", "Shrink"), ("b", "RandomPreempt(s33d)")])
    assert judge(good, st, authority(reservation=RESV)) is None
    cases = [
        activation([("a", "Shrink"), ("b", "RandomPreempt(other)")]),  # another seed
        activation([("a", "Shrink")]),  # not all of the audit
        activation([("a", "Shrink"), ("b", "DropSpare"), ("c", "DropSpare")]),  # more
        activation([("a", "Completed"), ("b", "DropSpare")]),  # not a cut
    ]
    for req in cases:
        assert judge(req, st, authority(reservation=RESV)) is ConflictReason.UNJUSTIFIED
    unreplayable = replace(RESV, replays=False)
    assert judge(good, st, authority(reservation=unreplayable)) is ConflictReason.UNJUSTIFIED
    no_audit = replace(RESV, ended=None)
    assert judge(good, st, authority(reservation=no_audit)) is ConflictReason.UNJUSTIFIED


def test_the_reservation_reason_is_only_the_runs_own_active_due_reservation() -> None:
    bind = activation([])
    assert judge(bind, auth=authority(reservation=RESV)) is None
    for resv in (
        None,
        replace(RESV, state="Pending"),
        replace(RESV, run=OTHER),
        replace(RESV, run_uid="old"),
        replace(RESV, earliest_start=T0 + H),
        replace(RESV, name="other"),
    ):
        assert judge(bind, auth=authority(reservation=resv)) is ConflictReason.RESERVATION
