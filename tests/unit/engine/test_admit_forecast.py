"""Start-now decisions, backfill protection and the forecast of blocked Runs."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from shared.engine.admit import Blocked, Start, claim_protection, try_start, widths
from shared.engine.forecast import Confidence, forecast, reforecast_instead
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


# ---------------------------------------------------------------------------- promises that hold

TWO = NODES[:2]  # nv-a-01, nv-a-02


def busy_until(node: str, hours: float) -> object:
    return replace(
        lease(node, 8, name=f"busy-{node}", run_key=("other", node)),
        expected_end=T0 + timedelta(hours=hours),
    )


def two_nodes(*claims: ReservationClaim) -> ClusterState:
    """nv-a-01 busy until T0+1h, nv-a-02 until T0+3h."""
    return ClusterState.build(
        now=T0,
        nodes=TWO,
        budgets=[budget(ME, env("west", 64, selector=WEST_A))],
        ledger=[busy_until("nv-a-01", 1), busy_until("nv-a-02", 3)],  # type: ignore[list-item]
        claims=claims,
        settings=Settings(conservative_lead=timedelta(hours=24)),
    )


def at_eta(s: ClusterState, at: object) -> ClusterState:
    """The world at ``at`` if every walltime holds: leases past their end are gone, and so are
    claims whose claimant ran its walltime (its Reservation was released, its leases ended)."""
    kept = [x for x in s.ledger if x.expected_end is None or x.expected_end > at]
    claims = [c for c in s.claims if c.end is None or c.end > at]  # type: ignore[operator]
    return ClusterState.build(
        now=at,  # type: ignore[arg-type]
        nodes=TWO,
        budgets=[budget(ME, env("west", 64, selector=WEST_A))],
        ledger=kept,
        claims=claims,
    )


LATER = ReservationClaim(
    "resv", ("ns", "first"), T0 + timedelta(hours=2), ("nv-a-01",), 8, duration=timedelta(hours=4)
)


def test_a_later_claim_is_honoured_two_node_case() -> None:
    """The ETA never lands on a node already claimed from a later instant."""
    s = two_nodes(LATER)
    want = request(ME, 8, selector=WEST_A, max_duration=timedelta(hours=3))
    got = forecast(want, s, refused(try_start(want, s)))
    # nv-a-01 frees at T0+1h but is claimed from T0+2h, and a 3h Run would overlap it.
    assert got.earliest_start == T0 + timedelta(hours=3)
    assert got.confidence is Confidence.WALLTIME
    assert got.placement is not None
    assert {sl.node for sl in got.placement.slices} == {"nv-a-02"}
    # The promise holds: at the ETA, with walltimes as forecast, the Run starts.
    assert started(try_start(want, at_eta(s, got.earliest_start)))
    # One hour before, on the freed but claimed node, it would not have.
    assert refused(try_start(want, at_eta(s, T0 + timedelta(hours=1)))).stage == "pack"


def test_a_short_run_may_still_backfill_before_a_later_claim() -> None:
    s = two_nodes(LATER)
    short = request(ME, 8, selector=WEST_A, max_duration=timedelta(hours=1))
    got = forecast(short, s, refused(try_start(short, s)))
    assert got.earliest_start == T0 + timedelta(hours=1)  # ends at T0+2h, when the claim starts
    assert {sl.node for sl in got.placement.slices} == {"nv-a-01"}  # type: ignore[union-attr]


def test_a_claim_holds_for_its_claimants_walltime_then_ends() -> None:
    s = two_nodes(LATER)
    both = request(ME, 16, group_gpus=8, selector=WEST_A, max_duration=timedelta(hours=3))
    got = forecast(both, s, refused(try_start(both, s)))
    assert got.earliest_start == T0 + timedelta(hours=6)  # the claim ends at T0+2h+4h
    assert got.confidence is Confidence.WALLTIME  # a walltime, not a window
    assert got.open_claims == ()
    assert started(try_start(both, at_eta(s, got.earliest_start)))


def test_an_open_ended_claim_holds_forever_and_is_named() -> None:
    s = two_nodes(replace(LATER, duration=None))
    both = request(ME, 16, group_gpus=8, selector=WEST_A, max_duration=timedelta(hours=3))
    got = forecast(both, s, refused(try_start(both, s)))
    assert got.confidence is Confidence.CONSERVATIVE
    assert got.open_claims == ("resv",)


def test_the_own_claim_never_delays_the_forecast() -> None:
    s = two_nodes(LATER)
    want = request(ME, 8, selector=WEST_A, max_duration=timedelta(hours=3))
    got = forecast(want, s, refused(try_start(want, s)), own_claim="resv")
    assert got.earliest_start == T0 + timedelta(hours=1)


def test_leases_past_their_walltime_count_as_ending_now() -> None:
    s = ClusterState.build(
        now=T0,
        nodes=TWO,
        budgets=[budget(ME, env("west", 64, selector=WEST_A))],
        ledger=[busy_until("nv-a-01", -1), busy_until("nv-a-02", 3)],  # type: ignore[list-item]
    )
    want = request(ME, 8, selector=WEST_A, max_duration=timedelta(hours=1))
    got = forecast(want, s, refused(try_start(want, s)))
    assert (got.earliest_start, got.confidence) == (T0, Confidence.WALLTIME)


# ---------------------------------------------------------------------------- exact labels


def test_claim_instants_are_not_window_aligned() -> None:
    """An ETA at a claim's start or end is set by walltimes; no Budget window is involved."""
    s = two_nodes(LATER)
    for gpus, hours in ((8, 3), (16, 6)):
        want = request(
            ME,
            gpus,
            group_gpus=8,
            selector=WEST_A,
            max_duration=timedelta(hours=3),
            name=f"w{gpus}",
        )
        got = forecast(want, s, refused(try_start(want, s)))
        assert got.earliest_start == T0 + timedelta(hours=hours)
        assert got.confidence is Confidence.WALLTIME


def test_window_aligned_only_when_the_opening_sets_the_eta() -> None:
    opens = T0 + timedelta(hours=2)
    window = env(
        "q1",
        16,
        selector=WEST_A,
        start=opens,
        end=opens + timedelta(days=1),
        reservations_before_start=True,
    )
    s = ClusterState.build(
        now=T0,
        nodes=TWO,
        budgets=[budget(ME, window)],
        ledger=[busy_until("nv-a-01", 1), busy_until("nv-a-02", 3)],  # type: ignore[list-item]
    )
    early = request(ME, 8, selector=WEST_A, name="early")
    got = forecast(early, s, refused(try_start(early, s)))
    assert (got.earliest_start, got.confidence) == (opens, Confidence.WINDOW_ALIGNED)
    # Needing both nodes, the lease end at T0+3h (after the opening) sets the ETA.
    both = request(ME, 16, group_gpus=8, selector=WEST_A, name="both")
    got = forecast(both, s, refused(try_start(both, s)))
    assert (got.earliest_start, got.confidence) == (T0 + timedelta(hours=3), Confidence.WALLTIME)


def test_a_conservative_eta_reached_without_room_is_reforecast_not_resolved() -> None:
    """Walltimes bound the wait now: keep waiting for them instead of cutting other Runs."""
    s = two_nodes()
    both = request(ME, 16, group_gpus=8, selector=WEST_A, max_duration=timedelta(hours=3))
    assert reforecast_instead(both, s, "mine") == (T0 + timedelta(hours=3), Confidence.WALLTIME)
    # It fits now: activate (bind).
    short = request(ME, 8, selector=WEST_A)
    free = ClusterState.build(
        now=T0, nodes=TWO, budgets=[budget(ME, env("west", 64, selector=WEST_A))]
    )
    assert reforecast_instead(short, free, "mine") is None
    # Nothing bounds the wait (no walltimes anywhere): the configured lead resolves, per SPEC.
    forever = ClusterState.build(
        now=T0,
        nodes=TWO,
        budgets=[budget(ME, env("west", 64, selector=WEST_A))],
        ledger=[lease(n.name, 8, name=f"busy-{n.name}") for n in TWO],
    )
    assert reforecast_instead(short, forever, "mine") is None
