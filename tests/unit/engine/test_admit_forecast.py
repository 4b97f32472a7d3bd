"""Start-now decisions, backfill protection and the forecast of blocked Runs."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from shared.engine.admit import Blocked, Start, claim_protection, try_start, widths
from shared.engine.forecast import Confidence, forecast
from shared.engine.model import Malleable, ReservationClaim, RunRequest
from shared.engine.state import ClusterState, Settings

from .budgets import budget, env, request
from .fleet import T0, domain_nodes, lease

ME = "org:ai:team-a"
WEST_A = {"region": "us-west", "cluster": "gpu-a"}
NODES = domain_nodes("gpu-a", "nv-a", 4)  # nv-a-01..04, 8 GPUs each


def state(
    *leases: object, budgets: list[object] | None = None, claims: tuple[ReservationClaim, ...] = ()
) -> ClusterState:
    return ClusterState.build(
        now=T0,
        nodes=NODES,
        budgets=[budget(ME, env("west", 64, selector=WEST_A))] if budgets is None else budgets,
        ledger=leases,  # type: ignore[arg-type]
        claims=claims,
        settings=Settings(conservative_lead=timedelta(hours=6)),
    )


def started(result: Start | Blocked) -> Start:
    assert isinstance(result, Start), result
    return result


def refused(result: Start | Blocked) -> Blocked:
    assert isinstance(result, Blocked), result
    return result


def test_widths_go_from_desired_down_to_min_in_steps() -> None:
    elastic = request(ME, 32, malleable=Malleable(8, 32, 8, 24))
    assert widths(elastic) == (24, 16, 8)
    assert widths(request(ME, 12)) == (12,)


def test_fits_now_with_one_payer_per_slice() -> None:
    got = started(try_start(request(ME, 16, group_gpus=8, selector=WEST_A), state()))
    assert got.width == 16
    assert {s.envelope for s in got.placement.slices} == {"org-ai-team-a/west"}


def test_malleable_run_starts_at_the_widest_step_that_fits() -> None:
    busy = [lease(f"nv-a-0{i}", 8, name=f"busy{i}") for i in (1, 2)]
    elastic = request(ME, 32, group_gpus=8, malleable=Malleable(8, 32, 8, 32), selector=WEST_A)
    assert started(try_start(elastic, state(*busy))).width == 16


def test_blocked_names_the_typed_cover_reason() -> None:
    got = refused(try_start(request(ME, 8, selector=WEST_A), state(budgets=[])))
    assert (got.stage, got.reason) == ("cover", "NoEnvelope")


def test_claims_protect_capacity_from_runs_that_would_overlap_them() -> None:
    claim = ReservationClaim("resv", ("ns", "big"), T0 + timedelta(hours=2), ("nv-a-01",), 8)
    short = request(ME, 32, selector=WEST_A, max_duration=timedelta(hours=1))
    long = request(ME, 32, selector=WEST_A, max_duration=timedelta(hours=3))
    s = state(claims=(claim,))
    assert claim_protection(short, s.claims, s.topology, T0) == {}
    assert claim_protection(long, s.claims, s.topology, T0) == {"nv-a-01": 8}
    assert started(try_start(short, s)).width == 32  # backfill: ends before the claim starts
    assert refused(try_start(long, s)).stage == "pack"
    assert started(try_start(long, s, own_claim="resv")).width == 32  # its own claim


def test_eta_is_when_running_walltimes_free_enough_capacity() -> None:
    ends = {"nv-a-01": 3, "nv-a-02": 5, "nv-a-03": 9, "nv-a-04": 12}
    busy = [
        replace(
            lease(n.name, 8, name=f"busy-{n.name}", run_key=("other", n.name)),
            expected_end=T0 + timedelta(hours=ends[n.name]),
        )
        for n in NODES
    ]
    s = state(*busy)
    want = request(ME, 16, group_gpus=8, selector=WEST_A)
    blocked = refused(try_start(want, s))
    got = forecast(want, s, blocked)
    assert got.earliest_start == T0 + timedelta(hours=5)
    assert got.confidence is Confidence.WALLTIME
    assert got.deficit_gpus == 16
    assert got.placement is not None
    assert {sl.node for sl in got.placement.slices} == {"nv-a-01", "nv-a-02"}
    assert got.countdown_seconds(T0) == 5 * 3600


def test_eta_is_conservative_when_nothing_bounds_it() -> None:
    busy = [lease(n.name, 8, name=f"busy-{n.name}") for n in NODES]
    s = state(*busy)
    want = request(ME, 8, selector=WEST_A)
    got = forecast(want, s, refused(try_start(want, s)))
    assert got.confidence is Confidence.CONSERVATIVE
    assert got.earliest_start == T0 + timedelta(hours=6)
    assert got.placement is None


def test_future_window_gives_a_window_aligned_reservation() -> None:
    opens = T0 + timedelta(days=3)
    window = env(
        "q1",
        32,
        selector=WEST_A,
        start=opens,
        end=opens + timedelta(days=14),
        reservations_before_start=True,
    )
    s = state(budgets=[budget(ME, window)])
    want = request(ME, 16, selector=WEST_A)
    blocked = refused(try_start(want, s))
    assert blocked.reason == "NoEnvelope"
    got = forecast(want, s, blocked)
    assert (got.earliest_start, got.confidence) == (opens, Confidence.WINDOW_ALIGNED)


def test_window_without_reservations_before_start_is_not_waited_for() -> None:
    opens = T0 + timedelta(days=3)
    window = env("q1", 32, selector=WEST_A, start=opens, end=opens + timedelta(days=14))
    s = state(budgets=[budget(ME, window)])
    want = request(ME, 16, selector=WEST_A)
    got = forecast(want, s, refused(try_start(want, s)))
    assert got.confidence is Confidence.CONSERVATIVE


def test_admission_before_start_binds_now() -> None:
    opens = T0 + timedelta(days=3)
    window = env(
        "q1",
        32,
        selector=WEST_A,
        start=opens,
        end=opens + timedelta(days=14),
        admission_before_start=True,
    )
    assert started(try_start(request(ME, 16, selector=WEST_A), state(budgets=[budget(ME, window)])))


def test_forecast_lists_remedies_conflict_set_and_kill_probability() -> None:
    victim = RunRequest(
        key=("other", "busy"), uid="u", owner="org:ai:team-b", flavor="H100-80GB", total_gpus=32
    )
    busy = [lease(n.name, 8, name=f"busy-{n.name}") for n in NODES]
    s = ClusterState.build(
        now=T0,
        nodes=NODES,
        budgets=[budget(ME, env("west", 64, selector=WEST_A))],
        ledger=busy,
        runs={victim.key: victim},
    )
    want = request(ME, 8, selector=WEST_A)
    got = forecast(want, s, refused(try_start(want, s)))
    assert got.remedies.conflict_set == (("other", "busy"),)
    assert got.remedies.lottery_likely
    assert got.remedies.kill_probability[("other", "busy")] == 1.0
    assert got.scope.label == "H100-80GB@us-west/gpu-a/*"
