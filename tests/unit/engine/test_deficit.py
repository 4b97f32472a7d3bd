"""The capacity deficit of a blocked Run, and the forecast, remedies and activation built on it.

The fleet: two fabric domains of 8 nodes × 8 GPUs. nv-a has 8 GPUs free, nv-b 48: a 64-GPU Run
whose groups must share a domain lacks 16 GPUs (in nv-b), not the 8 the two domains lack together.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from shared.control.activation import Outcome, Target, decide, preview
from shared.engine.admit import Blocked, try_start
from shared.engine.deficit import capacity_deficit, single_domain
from shared.engine.forecast import Confidence, forecast
from shared.engine.model import Lease, Malleable, RunKey, RunRequest
from shared.engine.resolver import Scope
from shared.engine.state import ClusterState

from .budgets import budget, env
from .fleet import T0, domain_nodes, lease, run, topo

ME = "org:ai:team-a"
WEST = {"region": "us-west"}
A_NODES = domain_nodes("gpu-a", "nv-a", 8)  # nv-a-01..08
B_NODES = domain_nodes("gpu-b", "nv-b", 8)  # nv-b-01..08
NODES = [*A_NODES, *B_NODES]
SCOPE = Scope("H100-80GB", frozenset(n.name for n in NODES), "H100-80GB@us-west/*/*")
B_LABEL = "H100-80GB@us-west/gpu-b/nv-b"
B_NAMES = frozenset(n.name for n in B_NODES)
WIDE_A: RunKey = ("other", "wide-a")
SHORT_A: RunKey = ("other", "short-a")
SOLID_B: RunKey = ("other", "solid-b")


def held(run_key: RunKey, nodes: list[str], *, hours: float | None = None) -> list[Lease]:
    """One 8-GPU group per node for ``run_key`` (group i on the i-th node)."""
    end = None if hours is None else T0 + timedelta(hours=hours)
    return [
        dataclasses.replace(
            lease(name, 8, name=f"{run_key[1]}-{i}", run_key=run_key),
            group=i,
            rank=i,
            expected_end=end,
        )
        for i, name in enumerate(nodes)
    ]


def ledger() -> list[Lease]:
    """nv-a: wide-a (6 groups, shrinkable to 1) + short-a (ends in 1h) → 8 free.
    nv-b: solid-b (2 groups, fixed width, ends in 3h) → 48 free."""
    return [
        *held(WIDE_A, [f"nv-a-0{i}" for i in range(1, 7)]),
        *held(SHORT_A, ["nv-a-07"], hours=1),
        *held(SOLID_B, ["nv-b-01", "nv-b-02"], hours=3),
    ]


def others() -> dict[RunKey, RunRequest]:
    def elastic(key: RunKey, gpus: int) -> RunRequest:
        return run(key[1], namespace=key[0], owner="org:ai:team-b", total=gpus, group=8,
                   malleable=Malleable(8, gpus, 8, gpus))  # fmt: skip

    def fixed(key: RunKey, gpus: int) -> RunRequest:
        return run(key[1], namespace=key[0], owner="org:ai:team-b", total=gpus, group=8)

    return {
        WIDE_A: elastic(WIDE_A, 48),
        SHORT_A: fixed(SHORT_A, 8),
        SOLID_B: fixed(SOLID_B, 16),
    }


def state() -> ClusterState:
    return ClusterState.build(
        now=T0,
        nodes=NODES,
        budgets=[budget(ME, env("west", 1000, selector=WEST))],
        ledger=ledger(),
        runs=others(),
    )


def big(**changes: object) -> RunRequest:
    base = run("big", namespace="team", owner=ME, total=64, group=8, spread=False)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the rule


def test_a_single_domain_run_lacks_what_its_best_domain_lacks() -> None:
    got = capacity_deficit(big(), topo(NODES, ledger()), SCOPE)
    assert got.gpus == 16
    assert got.scope == Scope("H100-80GB", B_NAMES, B_LABEL)


def test_a_run_free_to_spread_lacks_the_sum() -> None:
    spread = big(allow_cross_group_spread=True)
    assert not single_domain(spread)
    got = capacity_deficit(spread, topo(NODES, ledger()), SCOPE)
    assert (got.gpus, got.scope) == (8, SCOPE)


def test_a_single_group_is_single_domain_even_when_spread_is_allowed() -> None:
    lone = big(allow_cross_group_spread=True, group_gpus=64)
    assert single_domain(lone)
    got = capacity_deficit(lone, topo(NODES, ledger()), SCOPE)
    assert (got.gpus, got.scope.label) == (16, B_LABEL)


def test_a_malleable_run_counts_its_narrowest_start() -> None:
    elastic = big(total_gpus=96, malleable=Malleable(56, 96, 8, 96))
    got = capacity_deficit(elastic, topo(NODES, ledger()), SCOPE)
    assert (got.gpus, got.scope.label) == (8, B_LABEL)


def test_a_lone_groups_spares_may_spill_to_another_domain() -> None:
    # 44 actives must share nv-b (48 free); the 8 spares may use nv-a's 8: nothing is missing but
    # the floor of 1 (the pack refused for a reason counts cannot see). Forbid spread and the
    # spares must be in nv-b too: 52 - 48 = 4 missing.
    lone = big(total_gpus=44, group_gpus=44, spares_per_group=8, allow_cross_group_spread=True)
    got = capacity_deficit(lone, topo(NODES, ledger()), SCOPE)
    assert (got.gpus, got.scope.label) == (1, B_LABEL)
    home = dataclasses.replace(lone, allow_cross_group_spread=False)
    assert capacity_deficit(home, topo(NODES, ledger()), SCOPE).gpus == 4


def test_a_domain_too_small_even_when_emptied_is_not_the_best() -> None:
    # nv-b has only 6 nodes (48 GPUs, all free): it can never hold 64, so the deficit is nv-a's.
    small_b = domain_nodes("gpu-b", "nv-b", 6)
    leases = [x for x in ledger() if not x.node.startswith("nv-b")]
    scope = Scope("H100-80GB", frozenset(n.name for n in [*A_NODES, *small_b]), SCOPE.label)
    got = capacity_deficit(big(), topo([*A_NODES, *small_b], leases), scope)
    assert (got.gpus, got.scope.label) == (56, "H100-80GB@us-west/gpu-a/nv-a")


def test_an_empty_scope_lacks_the_whole_demand() -> None:
    empty = Scope("H100-80GB", frozenset(), SCOPE.label)
    assert capacity_deficit(big(), topo(NODES), empty).gpus == 64


# ---------------------------------------------------------------------------- who reads it


def refused(request: RunRequest, s: ClusterState) -> Blocked:
    got = try_start(request, s)
    assert isinstance(got, Blocked), got
    return got


def test_the_forecast_names_the_domain_and_its_remedies_free_there() -> None:
    s = state()
    fc = forecast(big(), s, refused(big(), s))
    assert fc.deficit_gpus == 16
    assert fc.scope.label == B_LABEL
    # Only nv-b is cut: nothing there shrinks, so the lottery draws 16 GPUs among solid-b; wide-a
    # could shrink by 40 GPUs in nv-a, which would not make the Run fit, so it is not offered.
    assert fc.remedies.deficit == 16
    assert dict(fc.remedies.shrinks) == {}
    assert fc.remedies.deficit_after_cuts == 16
    assert fc.remedies.conflict_set == (SOLID_B,)
    # The ETA waits for nv-b: short-a ending in 1h frees 8 GPUs in nv-a (64 free in all, which a
    # summed deficit would call enough), solid-b ending in 3h makes nv-b hold the Run.
    assert fc.confidence is Confidence.WALLTIME
    assert fc.earliest_start == T0 + timedelta(hours=3)
    assert fc.placement is not None
    assert {sl.node for sl in fc.placement.slices} == B_NAMES


def test_activation_frees_the_deficit_in_that_domain() -> None:
    s = state()
    target = Target("team", "big-resv", "uid-resv", T0)
    shown = preview(big(), s, target)
    assert (shown.deficit, shown.scope.label) == (16, B_LABEL)
    act = decide(big(), s, target, settle=False)
    assert act.outcome is Outcome.RESOLVE, act.message
    assert (act.deficit, act.scope.label) == (16, B_LABEL)
    assert act.resolution is not None
    ended = {name for name, _ in act.ends}
    assert ended == {"solid-b-0", "solid-b-1"}
    assert act.intent is not None
    assert {x.node for x in act.intent.leases} == B_NAMES
