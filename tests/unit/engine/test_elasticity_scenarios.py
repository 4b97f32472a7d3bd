"""Story: an elastic Run grows one step at a time as capacity frees, then shrinks on request."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from shared.engine.admit import Start, try_start
from shared.engine.bindplan import bind_plan, to_leases
from shared.engine.elasticity import Grow, grow, next_step
from shared.engine.model import Lease, LeaseReason, Malleable, RunRequest
from shared.engine.shrink import current_width, shrink_plan
from shared.engine.state import ClusterState

from .budgets import budget, env, request
from .fleet import T0, domain_nodes, lease

ME = "org:ai:team-a"
WEST_A = {"region": "us-west", "cluster": "gpu-a"}
NODES = domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-a", "nv-b", 2)
ELASTIC = request(ME, 32, group_gpus=8, malleable=Malleable(8, 32, 8, 32), selector=WEST_A)


def at(hours: float, ledger: list[Lease]) -> ClusterState:
    return ClusterState.build(
        now=T0 + timedelta(hours=hours),
        nodes=NODES,
        budgets=[budget(ME, env("west", 32, selector=WEST_A))],
        ledger=ledger,
    )


def test_next_step_stops_at_desired() -> None:
    assert next_step(ELASTIC, 8) == 8
    assert next_step(ELASTIC, 32) == 0
    assert next_step(request(ME, 8), 8) == 0


def test_elastic_run_grows_step_by_step_and_shrinks_on_request() -> None:
    others = [lease(f"nv-b-0{i}", 8, name=f"other-{i}") for i in (1, 2)]
    others.append(lease("nv-a-02", 8, name="other-3"))
    ledger: list[Lease] = list(others)

    first = try_start(ELASTIC, at(0, ledger))
    assert isinstance(first, Start) and first.width == 8  # only nv-a-01 is free
    ledger += to_leases(bind_plan(ELASTIC, first.placement, now=T0, reason=LeaseReason.START))
    assert grow(ELASTIC, ledger, at(0, ledger)) is not None  # blocked, not "nothing to do"
    assert not isinstance(grow(ELASTIC, ledger, at(0, ledger)), Grow)

    widths = [8]
    for hour, freed in ((1, "other-3"), (2, "other-1"), (3, "other-2")):
        ledger = [
            lease_ if lease_.name != freed else _closed(lease_, T0 + timedelta(hours=hour))
            for lease_ in ledger
        ]
        step = grow(ELASTIC, ledger, at(hour, ledger))
        assert isinstance(step, Grow), step
        plan = bind_plan(
            ELASTIC, step.start.placement, now=T0 + timedelta(hours=hour), reason=LeaseReason.GROW
        )
        ledger += to_leases(plan)
        mine = [x for x in ledger if x.open and x.run == ELASTIC.key]
        widths.append(current_width(mine))
        assert sorted({x.group for x in mine}) == list(range(len(widths)))
    assert widths == [8, 16, 24, 32]
    assert grow(ELASTIC, ledger, at(4, ledger)) is None  # at desired width

    mine = [x for x in ledger if x.open and x.run == ELASTIC.key]
    ended = set(shrink_plan(ELASTIC, mine, 16))
    assert {x.group for x in mine if x.name in ended} == {2, 3}  # highest-index groups first
    assert current_width([x for x in mine if x.name not in ended]) == 16


def _closed(lease_: Lease, when: datetime) -> Lease:
    return replace(lease_, end=when, closure="Completed")


def test_a_step_narrower_than_the_minimum_still_grows() -> None:
    """run-128-groups shape: min 64, step 32 — one step is below min but the Run is not."""
    wide = request(ME, 64, group_gpus=32, malleable=Malleable(64, 128, 32, 128), selector=WEST_A)
    nodes = domain_nodes("gpu-a", "nv-a", 16)
    budgets = [budget(ME, env("west", 128, selector=WEST_A))]
    state = ClusterState.build(now=T0, nodes=nodes, budgets=budgets)
    first = try_start(wide, state)
    assert isinstance(first, Start) and first.width == 128
    half = with_desired(wide, desired=64)
    start = try_start(half, state)
    assert isinstance(start, Start) and start.width == 64
    ledger = list(to_leases(bind_plan(half, start.placement, now=T0, reason=LeaseReason.START)))
    grown = grow(
        wide, ledger, ClusterState.build(now=T0, nodes=nodes, budgets=budgets, ledger=ledger)
    )
    assert isinstance(grown, Grow), grown
    assert grown.start.width == 32 and grown.first_group == 2


def with_desired(run: RunRequest, *, desired: int) -> RunRequest:
    assert run.malleable is not None
    return replace(run, malleable=replace(run.malleable, desired_gpus=desired))
