"""Reservation manifests, statuses, timer steps, at-risk marks and audit records (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.api import Reservation, ReservationState, parse_object
from shared.bus.messages import RunRef
from shared.control.activation import Target, decide
from shared.control.reservations import (
    AT_RISK,
    FORECAST_FIELDS,
    REFORECAST,
    RunFacts,
    Step,
    active_status,
    audit_record,
    cancel_reason,
    canceled_status,
    cleared_condition,
    is_conservative,
    next_reservation_name,
    next_step,
    owned_status,
    pending_status,
    preview_status,
    read_reservation,
    reforecast_reason,
    refreshed_status,
    reservation_manifest,
    reservation_name,
    risk_plan,
    risks,
    run_identity_metadata,
    unreservable,
    waiting_status,
)
from shared.engine.admit import Blocked, try_start
from shared.engine.durations import Expected
from shared.engine.forecast import Confidence, Forecast, forecast
from shared.engine.lottery import Token, verify
from shared.engine.model import (
    Budget,
    Envelope,
    FundingKind,
    Lease,
    LeaseReason,
    Node,
    Role,
    RunRequest,
)
from shared.engine.resolver import Scope
from shared.engine.state import ClusterState, Settings
from shared.engine.topology import MissingLabels, node_from_labels
from shared.kube.translate import ANNOTATION_GPUS, claim_record

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FLAVOR = "H100-80GB"
NS = "team"
WEST_A = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "nv-a"}
OWNER = "org:ai:rai"
REF = RunRef(namespace=NS, name="big", uid="0f1e2d3c-aaaa-bbbb", generation=2)


def nodes() -> list[Node]:
    out = []
    for i in range(1, 5):
        built = node_from_labels(f"a{i}", {**WEST_A, "gpu.flavor": FLAVOR}, {"nvidia.com/gpu": "8"})
        assert not isinstance(built, MissingLabels)
        out.append(built)
    return out


def request(name: str = "big", total: int = 16, owner: str = OWNER) -> RunRequest:
    return RunRequest(
        key=(NS, name),
        uid=f"uid-{name}",
        owner=owner,
        flavor=FLAVOR,
        total_gpus=total,
        group_gpus=8,
        selector=dict(WEST_A),
        max_duration=timedelta(hours=2),
    )


def busy(run: RunRequest, node: str, ends_in: timedelta | None) -> Lease:
    return Lease(
        name=f"{run.key[1]}-{node}",
        run=run.key,
        owner=run.owner,
        node=node,
        gpus=8,
        role=Role.ACTIVE,
        group=0,
        rank=0,
        envelope=f"{run.owner.replace(':', '-')}/main",
        payer_owner=run.owner,
        funding=FundingKind.OWNED,
        start=T0 - timedelta(hours=1),
        reason=LeaseReason.START,
        expected_end=None if ends_in is None else T0 + ends_in,
    )


def state_with(ends: dict[str, timedelta | None]) -> ClusterState:
    owners = {OWNER, "org:lab:x", "org:lab:y"}
    runs = {}
    leases = []
    for i, (node, end) in enumerate(sorted(ends.items())):
        r = request(f"holder-{i}", 8, owner="org:lab:x" if i % 2 else "org:lab:y")
        runs[r.key] = r
        leases.append(busy(r, node, end))
    budgets = [
        Budget(
            o.replace(":", "-"),
            o,
            (),
            (Envelope(o.replace(":", "-"), o, "main", FLAVOR, dict(WEST_A), 64),),
        )
        for o in owners
    ]
    return ClusterState.build(
        now=T0,
        nodes=nodes(),
        budgets=budgets,
        ledger=leases,
        runs=runs,
        settings=Settings(conservative_lead=timedelta(hours=6)),
    )


def forecast_of(state: ClusterState, want: RunRequest | None = None) -> Forecast:
    want = want or request()
    blocked = try_start(want, state)
    assert isinstance(blocked, Blocked)
    return forecast(want, state, blocked)


def stored(manifest: dict[str, Any], status: dict[str, Any] | None, uid: str = "r-uid") -> Any:
    """What the API server would hold: the manifest plus uid and status."""
    obj = {**manifest, "metadata": {**manifest["metadata"], "uid": uid}}
    if status is not None:
        obj["status"] = status
    return obj


WALLTIME = {"a1": timedelta(hours=3), "a2": timedelta(hours=5), "a3": None, "a4": None}


def test_names_are_deterministic_valid_and_skip_finished_incarnations() -> None:
    assert reservation_name("big", "0F1E2D3C-aaaa") == "big-0f1e2d3c"
    assert reservation_name("big", "0f1e2d3c-aaaa", 1) == "big-0f1e2d3c-2"
    long = reservation_name("x" * 300, "abc")
    assert len(long) <= 253 and long.endswith("-abc")
    taken = ["big-0f1e2d3c", "big-0f1e2d3c-2"]
    assert next_reservation_name("big", "0f1e2d3c", taken) == "big-0f1e2d3c-3"


def test_walltime_forecast_becomes_a_valid_reservation_with_its_slice_and_claim() -> None:
    state = state_with(WALLTIME)
    got = forecast_of(state)
    assert got.confidence is Confidence.WALLTIME
    assert got.earliest_start == T0 + timedelta(hours=5)
    name = reservation_name(REF.name, REF.uid)
    manifest = reservation_manifest(name, REF, request(), got, state.topology)
    status = pending_status(got, T0)
    obj = stored(manifest, status)
    resv = parse_object(obj)
    assert isinstance(resv, Reservation)
    assert resv.spec.intended_slice.nodes == ["a1", "a2"]
    assert resv.spec.intended_slice.domain == WEST_A
    assert resv.spec.paying_envelope == "org-ai-rai/main"
    assert resv.spec.earliest_start == T0 + timedelta(hours=5)
    assert resv.spec.run_ref.namespace == NS
    assert resv.status is not None and resv.status.state is ReservationState.PENDING
    assert resv.status.reason == "NoCapacity"
    assert resv.status.countdown_seconds == 5 * 3600
    fc = resv.status.forecast
    assert fc is not None and fc.confidence is not None
    assert fc.confidence.value == "walltime" and fc.deficit_gpus == 16
    assert fc.scope is not None and fc.scope.kind == "Location"
    assert fc.scope.selector == WEST_A
    # The binder and every cache read the claim from the same object.
    claim = claim_record(obj)
    assert claim is not None
    assert (claim.name, claim.gpus, claim.nodes) == (name, 16, ("a1", "a2"))
    assert manifest["metadata"]["annotations"][ANNOTATION_GPUS] == "16"
    view = read_reservation(obj)
    assert view.managed and view.run_uid == REF.uid and view.run_generation == 2


def test_conservative_forecast_reserves_the_scope_with_remedies_and_kill_odds() -> None:
    state = state_with(dict.fromkeys(("a1", "a2", "a3", "a4")))
    got = forecast_of(state)
    assert got.confidence is Confidence.CONSERVATIVE and got.placement is None
    manifest = reservation_manifest("r", REF, request(), got, state.topology)
    assert manifest["spec"]["intendedSlice"]["nodes"] == ["a1", "a2", "a3", "a4"]
    assert "payingEnvelope" not in manifest["spec"]
    status = pending_status(got, T0)
    resv = parse_object(stored(manifest, status))
    assert isinstance(resv, Reservation) and resv.status is not None
    fc = resv.status.forecast
    assert fc is not None and fc.remedies is not None
    assert [r.action.value for r in fc.remedies] == ["Lottery"]
    assert fc.remedies[0].gpus == 16
    assert sorted(fc.conflict_set or []) == [f"{NS}/holder-{i}" for i in range(4)]
    odds = fc.kill_probability or {}
    assert set(odds) == set(fc.conflict_set or [])
    assert abs(sum(odds.values()) - 2.0) < 1e-3  # exactly two 8-GPU runs go for 16 GPUs
    assert resv.status.countdown_seconds == 6 * 3600


def test_a_scope_without_nodes_cannot_be_reserved() -> None:
    state = state_with({})
    elsewhere = RunRequest(
        key=(NS, "far"),
        uid="u",
        owner=OWNER,
        flavor=FLAVOR,
        total_gpus=8,
        selector={"region": "eu-north"},
    )
    got = forecast_of(state, elsewhere)
    with pytest.raises(ValueError, match="no nodes"):
        reservation_manifest("r", REF, elsewhere, got, state.topology)


def test_status_updates_carry_only_the_forecasters_fields() -> None:
    state = state_with(WALLTIME)
    got = forecast_of(state)
    status = {
        **pending_status(got, T0),
        "audit": {"seed": "x"},
        "releasedAt": "2026-01-01T00:00:00Z",
    }
    fresh = refreshed_status(status, got.earliest_start, T0 + timedelta(hours=1))
    assert fresh["countdownSeconds"] == 4 * 3600
    assert set(fresh) <= set(FORECAST_FIELDS) and fresh["forecast"] == status["forecast"]
    active = active_status(status, T0 + timedelta(hours=5, seconds=2))
    assert active["state"] == "Active" and active["activatedAt"] == "2026-03-01T17:00:02Z"
    assert active["countdownSeconds"] == 0 and "audit" not in active
    canceled = canceled_status(status, T0, "RunDeleted", "gone")
    assert (canceled["state"], canceled["reason"]) == ("Canceled", "RunDeleted")
    assert canceled["canceledAt"] == "2026-03-01T12:00:00Z"
    manifest = reservation_manifest("r", REF, request(), got, state.topology)
    for body in (fresh, active, canceled):
        assert isinstance(parse_object(stored(manifest, body)), Reservation)


def view_of(status: dict[str, Any] | None, **meta: Any) -> Any:
    state = state_with(WALLTIME)
    manifest = reservation_manifest("r", REF, request(), forecast_of(state), state.topology)
    manifest["metadata"].update(meta)
    return read_reservation(stored(manifest, status))


def test_timer_steps() -> None:
    pending = {"state": "Pending"}
    run = RunFacts(uid=REF.uid, generation=2)
    eta = T0 + timedelta(hours=5)
    retry = timedelta(seconds=30)
    assert next_step(view_of(pending), run, T0, retry_after=retry) is Step.REFRESH
    assert next_step(view_of(pending), run, eta, retry_after=retry) is Step.ACTIVATE
    assert next_step(view_of(pending), run, eta, retry_after=retry, in_flight=True) is Step.NOTHING
    changed = RunFacts(uid=REF.uid, generation=3)
    assert next_step(view_of(pending), changed, T0, retry_after=retry) is Step.CANCEL
    assert cancel_reason(view_of(pending), changed) is not None
    assert next_step(view_of(pending), None, T0, retry_after=retry) is Step.CANCEL
    reborn = RunFacts(uid="another-uid", generation=2)
    assert cancel_reason(view_of(pending), reborn) == (
        "RunDeleted",
        "Run team/big was deleted and created again",
    )
    active = {"state": "Active", "activatedAt": "2026-03-01T17:00:00Z"}
    assert next_step(view_of(active), run, eta, retry_after=retry) is Step.NOTHING
    assert next_step(view_of(active), run, eta + retry, retry_after=retry) is Step.RETRY
    for done in ("Released", "Blocked", "Canceled"):
        assert next_step(view_of({"state": done}), run, eta, retry_after=retry) is Step.NOTHING


def test_a_pending_reservation_of_a_run_that_started_early_is_canceled() -> None:
    running = RunFacts(uid=REF.uid, generation=2, running=True)
    retry = timedelta(seconds=30)
    pending = view_of({"state": "Pending"})
    assert next_step(pending, running, T0, retry_after=retry) is Step.CANCEL
    reason, message = cancel_reason(pending, running) or ("", "")
    assert reason == "StartedEarly" and "started before earliestStart" in message
    # Activation under way: the resolver releases it (AlreadyRunning or bound), not the timer.
    active = view_of({"state": "Active", "activatedAt": "2026-03-01T17:00:00Z"})
    assert cancel_reason(active, running) is None
    # An administrator chose the time: the Reservation stays until it activates.
    admin = view_of({"state": "Pending"}, labels={})
    assert not admin.managed and cancel_reason(admin, running) is None


def test_administrator_reservations_wait_for_their_run_then_initialise() -> None:
    admin = view_of(None, labels={}, annotations={})
    assert not admin.managed and admin.run_uid is None
    assert next_step(admin, None, T0, retry_after=timedelta(1)) is Step.WAIT_FOR_RUN
    run = RunFacts(uid="u-1", generation=1)
    assert next_step(admin, run, T0, retry_after=timedelta(1)) is Step.INITIALISE
    meta = run_identity_metadata(admin, RunRef(namespace=NS, name="big", uid="u-1", generation=1))
    assert meta["annotations"] == {"rq.davidlangworthy.io/run-generation": "1"}


def test_a_reservation_the_forecaster_just_created_is_never_initialised_over() -> None:
    # RESERVE writes the first status itself; the timer may see the object before that status.
    fresh = view_of(None)
    assert fresh.managed and fresh.state is None
    run = RunFacts(uid=REF.uid, generation=REF.generation)
    assert next_step(fresh, run, T0, retry_after=timedelta(1)) is Step.NOTHING


def test_at_risk_marks_follow_pending_reservations() -> None:
    def resv(name: str, odds: dict[str, float], state: str = "Pending") -> Any:
        status = {
            "state": state,
            "forecast": {"conflictSet": sorted(odds), "killProbability": odds},
        }
        return view_of(status, name=name)

    views = [resv("r1", {"team/a": 0.5, "team/b": 0.5}), resv("r2", {"team/a": 0.5})]
    views.append(resv("r3", {"team/c": 1.0}, state="Released"))
    found = risks(views)
    assert set(found) == {(NS, "a"), (NS, "b")}
    assert found[(NS, "a")].probability == 0.75
    assert [n for n, _ in found[(NS, "a")].by_reservation] == ["team/r1", "team/r2"]
    old = {
        "type": AT_RISK,
        "status": "True",
        "reason": "ReservationConflict",
        "message": "stale",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    runs = {
        (NS, "a"): {"status": {"conditions": [old]}},
        (NS, "b"): {},
        (NS, "c"): {"status": {"conditions": [old]}},
    }
    plan = risk_plan(found, runs, T0)
    assert set(plan.mark) == {(NS, "a"), (NS, "b")}
    assert plan.mark[(NS, "a")]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert plan.mark[(NS, "b")]["lastTransitionTime"] == "2026-03-01T12:00:00Z"
    assert "0.75" in plan.mark[(NS, "a")]["message"]
    assert list(plan.clear) == [(NS, "c")]
    assert plan.clear[(NS, "c")]["status"] == "False"
    settled = {(NS, "a"): {"status": {"conditions": [plan.mark[(NS, "a")]]}}}
    assert risk_plan({(NS, "a"): found[(NS, "a")]}, settled, T0).mark == {}


def test_at_risk_marks_already_sent_are_not_sent_again_while_the_cache_lags() -> None:
    """A burst of Reservations: the marks written a moment ago are not in the watch cache yet;
    re-planning must not patch the same conditions again (only a changed one)."""
    views = [view_of({"state": "Pending", "forecast": {
        "conflictSet": ["team/a", "team/b"], "killProbability": {"team/a": 1.0, "team/b": 1.0}
    }}, name="r1")]  # fmt: skip
    found = risks(views)
    stale_runs: dict[tuple[str, str], Any] = {(NS, "a"): {}, (NS, "b"): {}, (NS, "c"): {}}
    first = risk_plan(found, stale_runs, T0)
    assert set(first.mark) == {(NS, "a"), (NS, "b")}
    later = T0 + timedelta(seconds=1)
    sent = {(NS, "a"): first.mark[(NS, "a")]}
    again = risk_plan(found, stale_runs, later, sent)
    assert set(again.mark) == {(NS, "b")}
    moved = risks([*views, view_of({"state": "Pending", "forecast": {
        "conflictSet": ["team/a"], "killProbability": {"team/a": 0.5}
    }}, name="r2")])  # fmt: skip
    assert set(risk_plan(moved, stale_runs, later, sent).mark) == {(NS, "a"), (NS, "b")}
    marked = {"status": {"conditions": [first.mark[(NS, "a")]]}}
    cleared = {(NS, "a"): cleared_condition(later)}
    assert risk_plan({}, {(NS, "a"): marked}, later, cleared).clear == {}
    assert list(risk_plan({}, {(NS, "a"): marked}, later).clear) == [(NS, "a")]


def test_audit_record_publishes_what_replays_the_lottery() -> None:
    state = state_with(dict.fromkeys(("a1", "a2", "a3", "a4")))
    want = request()
    target = Target(NS, "big-r", "resv-uid", T0)
    act = decide(want, state, target)
    res = act.resolution
    assert res is not None and res.seed is not None
    record = audit_record(res, act.scope, act.deficit)
    manifest = reservation_manifest("r", REF, want, forecast_of(state), state.topology)
    resv = parse_object(stored(manifest, {"state": "Released", "audit": record}))
    assert isinstance(resv, Reservation) and resv.status is not None
    audit = resv.status.audit
    assert audit is not None and audit.seed == res.seed
    assert audit.deficit_gpus == 16 and len(audit.draws or []) == 2
    assert set(audit.ended_leases or []) == {name for name, _ in res.ended_leases}
    # Rebuild the tokens from the published record (what `kubectl runs explain` does) and replay.
    tokens = [
        Token(
            owner=t.owner,
            run=(t.run.split("/")[0], t.run.split("/")[1]),
            group=t.group,
            gpus=t.gpus,
            lease_names=tuple(t.leases or ()),
            width=t.width,
            run_slack=t.run_slack,
        )
        for t in audit.tokens or []
    ]
    assert verify(audit.seed, tokens, audit.deficit_gpus or 0, res.draws)
    drawn = [(d.step, d.run) for d in audit.draws or []]
    assert drawn == [(d.step, f"{d.token.run[0]}/{d.token.run[1]}") for d in res.draws]


def test_an_administrator_reservation_already_pending_is_initialised_once_its_run_exists() -> None:
    waiting = view_of({"state": "Pending", "reason": "RunNotFound"}, labels={}, annotations={})
    run = RunFacts(uid="u-1", generation=1)
    assert next_step(waiting, run, T0, retry_after=timedelta(1)) is Step.INITIALISE
    assert next_step(waiting, None, T0, retry_after=timedelta(1)) is Step.WAIT_FOR_RUN


def test_waiting_and_preview_statuses_are_valid_reservation_statuses() -> None:
    state = state_with(WALLTIME)
    got = forecast_of(state)
    manifest = reservation_manifest("r", REF, request(), got, state.topology)
    view = read_reservation(stored(manifest, None))
    waiting = waiting_status(view, T0)
    assert (waiting["state"], waiting["reason"]) == ("Pending", "RunNotFound")
    seen = preview_status(
        deficit=got.deficit_gpus,
        scope=got.scope,
        remedies=got.remedies,
        reason="NoCapacity",
        message="busy",
        earliest_start=view.earliest_start,
        now=T0,
    )
    assert seen["countdownSeconds"] == 5 * 3600 and "confidence" not in seen["forecast"]
    for body in (waiting, seen):
        resv = parse_object(stored(manifest, body))
        assert isinstance(resv, Reservation) and resv.status is not None


def test_a_scope_without_nodes_is_unreservable_and_names_the_runs_own_selector() -> None:
    empty = Scope(flavor="H100-80GB", nodes=frozenset(), label="H100-80GB@us-west/gpu-a/nv-a")
    why = unreservable(empty, {"region": "us-west", "rack": "r9"})
    assert why is not None and why.startswith("NoNodesInScope: ")
    assert "gpuType H100-80GB matches selector {region=us-west, rack=r9}" in why
    derived = unreservable(empty)
    assert derived is not None and "{region=us-west, cluster=gpu-a, fabric.domain=nv-a}" in derived
    some = Scope(flavor="H100-80GB", nodes=frozenset({"n1"}), label="H100-80GB@*/*/*")
    assert unreservable(some) is None
    assert unreservable(Scope(flavor="H100-80GB", nodes=None, label="H100-80GB@*/*/*")) is None


def test_owned_status_drops_the_nulls_the_api_server_leaves_for_emptied_maps() -> None:
    stored = {
        "state": "Pending",
        "activatedAt": None,
        "forecast": {"deficitGPUs": 8, "killProbability": None, "conflictSet": []},
        "audit": {"seed": "x"},
    }
    assert owned_status(stored) == {
        "state": "Pending",
        "forecast": {"deficitGPUs": 8, "conflictSet": []},
    }


def test_the_expected_start_and_its_spread_are_published_and_read_back_into_the_claim() -> None:
    state = state_with(WALLTIME)
    got = forecast_of(state)
    expected = Expected(
        T0 + timedelta(hours=2),
        T0 + timedelta(hours=1),
        T0 + timedelta(hours=4),
        212,
        "212 completed Runs of org:lab:x",
    )
    name = reservation_name(REF.name, REF.uid)
    manifest = reservation_manifest(name, REF, request(), got, state.topology)
    obj = stored(manifest, pending_status(got, T0, expected))
    resv = parse_object(obj)
    assert isinstance(resv, Reservation) and resv.status is not None
    fc = resv.status.forecast
    assert fc is not None
    assert (fc.expected_start, fc.expected_start_p10, fc.expected_start_p90) == (
        T0 + timedelta(hours=2),
        T0 + timedelta(hours=1),
        T0 + timedelta(hours=4),
    )
    assert fc.expected_basis == "212 completed Runs of org:lab:x"
    assert fc.open_claims is None
    # The claim carries the claimant's walltime and owner (whose history shortens it).
    claim = claim_record(obj, request())
    assert claim is not None
    assert (claim.owner, claim.duration) == (OWNER, request().max_duration)


def test_open_ended_claims_in_scope_are_named() -> None:
    state = state_with(WALLTIME)
    got = forecast_of(state)
    status = preview_status(
        deficit=got.deficit_gpus,
        scope=got.scope,
        remedies=got.remedies,
        reason="NoCapacity",
        message="",
        earliest_start=got.earliest_start,
        now=T0,
        open_claims=["other-resv"],
    )
    manifest = reservation_manifest("r", REF, request(), got, state.topology)
    resv = parse_object(stored(manifest, status))
    assert isinstance(resv, Reservation) and resv.status and resv.status.forecast
    assert resv.status.forecast.open_claims == ["other-resv"]


def test_conservative_reservations_are_recognised_and_the_reforecast_says_why() -> None:
    state = state_with(dict.fromkeys(("a1", "a2", "a3", "a4")))
    got = forecast_of(state)
    manifest = reservation_manifest("r", REF, request(), got, state.topology)
    view = read_reservation(stored(manifest, pending_status(got, T0)))
    assert is_conservative(view)
    reason, message = reforecast_reason(T0 + timedelta(hours=3), Confidence.WALLTIME)
    assert reason == REFORECAST and "walltime now bounds the wait" in message
