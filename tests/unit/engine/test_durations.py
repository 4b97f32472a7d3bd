"""Durations learnt from the ledger and the expected start they give (ETAs that are close)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from shared.engine.durations import (
    PRIOR_RUNS,
    DurationModel,
    add,
    expected_start,
    learn,
    predicted_end,
)
from shared.engine.forecast import earliest_start
from shared.engine.model import Closure
from shared.engine.state import ClusterState

from .budgets import budget, env, request
from .fleet import T0, domain_nodes, lease

ME = "org:ai:team-a"
OTHER = "org:ai:team-b"
WEST_A = {"region": "us-west", "cluster": "gpu-a"}
NODES = domain_nodes("gpu-a", "nv-a", 2)


def done(name: str, hours: float, wall: float, owner: str = OTHER) -> object:
    """A completed Run of ``owner``: ran ``hours`` of a ``wall``-hour walltime."""
    start = T0 - timedelta(days=2)
    return replace(
        lease("nv-a-01", 8, name=name, run_key=("old", name), start=start),
        owner=owner,
        end=start + timedelta(hours=hours),
        closure=Closure.COMPLETED.value,
        expected_end=start + timedelta(hours=wall),
    )


def test_learns_the_ratio_of_completed_runs_per_owner() -> None:
    model = learn([done(f"r{i}", 2, 8) for i in range(10)])  # type: ignore[misc]
    assert model.runs_of(OTHER) == 10
    assert model.by_owner[OTHER] == (0.25,) * 10
    # Failed or canceled Runs and Runs without walltime teach nothing.
    failed = replace(done("f", 1, 8), closure=Closure.FAIL.value)  # type: ignore[type-var]
    assert learn([failed]).fleet == ()  # type: ignore[list-item]


def test_prior_blends_owner_and_fleet_and_defaults_to_the_walltime() -> None:
    assert DurationModel().ratio(ME, 0.5) == 1.0  # no history: walltimes
    model = add(DurationModel(), OTHER, 0.2)
    assert model.ratio(ME, 0.5) == 0.2  # no history of its own: the fleet's
    for _ in range(PRIOR_RUNS - 1):
        model = add(model, OTHER, 0.2)
    model = add(model, ME, 1.0)
    # One Run of ME at 1.0 against five fleet pseudo-Runs at the fleet median.
    assert 0.2 < model.ratio(ME, 0.5) < 1.0


def test_predicted_end_stays_between_now_and_the_walltime() -> None:
    running = replace(
        lease("nv-a-01", 8, start=T0 - timedelta(hours=1)), expected_end=T0 + timedelta(hours=7)
    )
    assert predicted_end(running, 0.5, T0) == T0 + timedelta(hours=3)
    # Outlived its prediction: the ratio of what is left of the walltime.
    assert predicted_end(running, 0.1, T0) == T0 + timedelta(hours=0.7)
    assert predicted_end(replace(running, expected_end=None), 0.5, T0) is None


def test_expected_start_uses_the_owners_history_and_never_passes_the_guarantee() -> None:
    history = [done(f"r{i}", 2, 8) for i in range(20)]
    busy = [
        replace(
            lease(n.name, 8, name=f"busy-{n.name}", run_key=("other", n.name)),
            owner=OTHER,
            expected_end=T0 + timedelta(hours=8),
        )
        for n in NODES
    ]
    state = ClusterState.build(
        now=T0,
        nodes=NODES,
        budgets=[budget(ME, env("west", 64, selector=WEST_A))],
        ledger=busy,  # type: ignore[arg-type]
    )
    want = request(ME, 8, selector=WEST_A, max_duration=timedelta(hours=1))
    guaranteed, _, _ = earliest_start(want, state)
    assert guaranteed == T0 + timedelta(hours=8)
    got = expected_start(want, state, learn(history), guaranteed)  # type: ignore[arg-type]
    assert got.at == T0 + timedelta(hours=2)  # a quarter of the 8h walltime
    assert got.p10 <= got.at <= got.p90 <= guaranteed
    assert got.basis_runs == 20
    assert got.basis == f"20 completed Runs of {OTHER}"
    # Without history the expected start is the guaranteed one.
    plain = expected_start(want, state, DurationModel(), guaranteed)
    assert (plain.at, plain.p10, plain.p90) == (guaranteed,) * 3
    assert plain.basis_runs == 0
