"""Node failures: swap onto a spare (reclaiming fill), else shrink or requeue/fail."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.failures import FailurePlan, PodMove, on_node_failure
from shared.engine.model import DomainKey, FundingKind, LeaseReason, Role
from shared.engine.shrink import is_working
from tests.unit.engine.ledgers import (
    DOMAIN_A,
    DOMAIN_B,
    T0,
    Ledger,
    elastic_run,
    fixed_run,
)

NOW = T0 + timedelta(hours=3)
CKPT = timedelta(minutes=30)
DOMAINS: dict[str, DomainKey] = {
    **{f"a{i}": DOMAIN_A for i in range(1, 7)},
    **{f"b{i}": DOMAIN_B for i in range(1, 4)},
}


def fail(ledger: Ledger, node: str, **kwargs: object) -> FailurePlan:
    return on_node_failure(
        node,
        ledger.leases,
        ledger.runs,
        node_domains=kwargs.pop("node_domains", DOMAINS),  # type: ignore[arg-type]
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )


def test_swap_onto_spare_in_the_same_domain() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 16, group_gpus=16, spares=1)
    ledger.group(
        run,
        0,
        ["a1", "a2"],
        8,
        envelope="org:p/e",
        payer_owner="org:p",
        funding=FundingKind.FAMILY,
        expected_end=T0 + timedelta(hours=10),
    )
    ledger.spare(run, 0, "a3", 8)
    plan = fail(ledger, "a2")
    assert plan.ends == (("job-g0-s0", "Swap"), ("job-g0-r1", "NodeFailure"))
    (new,) = plan.starts
    assert (new.node, new.gpus, new.role, new.group, new.rank) == ("a3", 8, Role.ACTIVE, 0, 1)
    assert (new.envelope, new.payer_owner, new.funding) == ("org:p/e", "org:p", FundingKind.FAMILY)
    assert new.reason is LeaseReason.SWAP and new.start == NOW and new.replaces == "job-g0-r1"
    assert new.expected_end == T0 + timedelta(hours=10)
    assert new.to_lease("job-swap-1").node == "a3"
    assert plan.pod_moves == (PodMove(run.key, 1, "a2", "a3"),)
    assert plan.requeue == plan.failed == () and plan.shrunk == ()


def test_spare_in_another_domain_does_not_count() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 16, spares=1, checkpoint=CKPT, max_restarts=1)
    ledger.group(run, 0, ["a1", "a2"], 8)
    ledger.spare(run, 0, "b1", 8)
    plan = fail(ledger, "a2")
    assert dict(plan.ends) == {
        "job-g0-r0": "Fail",
        "job-g0-r1": "NodeFailure",
        "job-g0-s0": "Fail",
    }
    assert plan.starts == () and plan.requeue == (run.key,)
    assert plan.reasons == {run.key: "NodeFailure"}


def test_unhealthy_spare_node_is_not_a_target() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 8, spares=1)
    ledger.group(run, 0, ["a1"], 8)
    ledger.spare(run, 0, "a3", 8)
    domains = {k: v for k, v in DOMAINS.items() if k != "a3"}
    plan = fail(ledger, "a1", node_domains=domains)
    assert plan.starts == () and plan.failed == (run.key,)


def test_spares_on_one_node_combine_and_leftover_stays_spare() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 8, spares=3)
    ledger.group(run, 0, ["a1"], 6)
    ledger.spare(run, 0, "a2", 4)
    ledger.spare(run, 0, "a2", 4)
    ledger.spare(run, 0, "a4", 4)  # too small alone
    plan = fail(ledger, "a1")
    assert plan.ends == (
        ("job-g0-s0", "Swap"),
        ("job-g0-s1", "Swap"),
        ("job-g0-r0", "NodeFailure"),
    )
    active, leftover = plan.starts
    assert (active.node, active.gpus, active.role) == ("a2", 6, Role.ACTIVE)
    assert (leftover.node, leftover.gpus, leftover.role) == ("a2", 2, Role.SPARE)
    assert leftover.reason is LeaseReason.SWAP and leftover.replaces == "job-g0-s1"


def test_swap_reclaims_opportunistic_fill_on_the_spare() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 8, spares=1)
    ledger.group(run, 0, ["a1"], 8)
    ledger.spare(run, 0, "a2", 8)
    opp = fixed_run("opp", "org:o", 8, opportunistic=True)
    ledger.fill(opp, "a2", 4, start=T0 + timedelta(hours=1))
    ledger.fill(opp, "a5", 4, start=T0 + timedelta(hours=1))
    plan = fail(ledger, "a1")
    assert plan.ends == (
        ("opp-g0-r0", "ReclaimedBySpare"),
        ("opp-g0-r1", "ReclaimedBySpare"),  # the gang cannot run without its rank on a2
        ("job-g0-s0", "Swap"),
        ("job-g0-r0", "NodeFailure"),
    )
    assert plan.failed == (opp.key,) and plan.reasons == {opp.key: "ReclaimedBySpare"}


def test_only_the_fill_that_no_longer_fits_is_reclaimed_youngest_first() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 4, spares=1)
    ledger.group(run, 0, ["a1"], 4)
    ledger.spare(run, 0, "a2", 8)
    old = elastic_run("old", "org:o", min_gpus=4, max_gpus=4, step=4)
    young = elastic_run("young", "org:y", min_gpus=4, max_gpus=4, step=4)
    ledger.fill(old, "a2", 4, start=T0)
    ledger.fill(young, "a2", 4, start=T0 + timedelta(hours=2))
    plan = fail(ledger, "a1")
    assert ("young-g0-r0", "ReclaimedBySpare") in plan.ends
    assert all(not name.startswith("old") for name, _ in plan.ends)
    # The spare of 8 was consumed for 4: the other 4 stay spare, still hosting "old".
    assert [(s.node, s.gpus, s.role) for s in plan.starts] == [
        ("a2", 4, Role.ACTIVE),
        ("a2", 4, Role.SPARE),
    ]


def test_malleable_without_spare_shrinks_by_the_failed_group() -> None:
    ledger = Ledger()
    el = elastic_run("el", "org:a", min_gpus=16, max_gpus=32, step=16, spares=1)
    ledger.group(el, 0, ["a1", "a2"], 8)
    ledger.group(el, 1, ["a3", "a4"], 8)
    ledger.spare(el, 1, "b1", 8)  # wrong domain
    plan = fail(ledger, "a4")
    assert dict(plan.ends) == {
        "el-g1-r3": "NodeFailure",
        "el-g1-r2": "Shrink",
        "el-g1-s0": "Shrink",
    }
    assert plan.shrunk == ((el.key, 1),) and plan.failed == plan.requeue == ()


def test_malleable_at_min_without_spare_ends_like_a_fixed_run() -> None:
    ledger = Ledger()
    el = elastic_run("el", "org:a", min_gpus=16, max_gpus=16, step=16)
    ledger.group(el, 0, ["a1", "a2"], 8)
    plan = fail(ledger, "a1")
    assert dict(plan.ends) == {"el-g0-r0": "NodeFailure", "el-g0-r1": "Fail"}
    assert plan.failed == (el.key,) and plan.shrunk == ()


def test_group_swaps_all_failed_ranks_or_none() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 16, spares=1, checkpoint=CKPT, max_restarts=3)
    ledger.group(run, 0, ["a1"], 8)
    ledger.lease(run, "a1", 8, group=0)  # two ranks on the failed node
    ledger.spare(run, 0, "a2", 8)  # room for one only
    plan = fail(ledger, "a1")
    assert plan.starts == () and plan.pod_moves == ()
    assert dict(plan.ends)["job-g0-s0"] == "Fail"
    assert plan.requeue == (run.key,)
    assert fail(ledger, "a1", restarts_used={run.key: 3}).failed == (run.key,)


def test_two_ranks_swap_onto_one_big_spare_node() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 16, spares=1)
    ledger.group(run, 0, ["a1"], 4)
    ledger.lease(run, "a1", 4, group=0)
    ledger.spare(run, 0, "a2", 8)
    plan = fail(ledger, "a1")
    assert [(m.rank, m.to_node) for m in plan.pod_moves] == [(0, "a2"), (1, "a2")]
    assert [(s.gpus, s.role) for s in plan.starts] == [(4, Role.ACTIVE), (4, Role.ACTIVE)]


def test_spare_on_failed_node_and_fill_on_failed_node() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 8, spares=1)
    ledger.group(run, 0, ["a1"], 8)
    ledger.spare(run, 0, "a2", 8)
    opp = fixed_run("opp", "org:o", 4, opportunistic=True, checkpoint=CKPT, max_restarts=1)
    ledger.fill(opp, "a2", 4)
    plan = fail(ledger, "a2")
    assert dict(plan.ends) == {"job-g0-s0": "NodeFailure", "opp-g0-r0": "NodeFailure"}
    assert plan.requeue == (opp.key,) and plan.starts == ()


def test_failed_node_domain_recovered_from_the_group() -> None:
    ledger = Ledger()
    run = fixed_run("job", "org:a", 16, spares=1)
    ledger.group(run, 0, ["gone", "a1"], 8)
    ledger.spare(run, 0, "a2", 8)
    plan = fail(ledger, "gone")  # deleted node: absent from node_domains
    assert [m.to_node for m in plan.pod_moves] == ["a2"]


def test_other_nodes_are_untouched_and_result_is_deterministic() -> None:
    ledger = Ledger()
    ledger.group(fixed_run("elsewhere", "org:a", 8), 0, ["a5"], 8)
    assert fail(ledger, "a1") == FailurePlan("a1", (), (), (), (), (), ())
    run = fixed_run("job", "org:a", 8, spares=1)
    ledger.group(run, 0, ["a1"], 8)
    ledger.spare(run, 0, "a2", 8)
    assert fail(ledger, "a1") == fail(ledger, "a1")


# --- properties -------------------------------------------------------------------------------

NODES = ["a1", "a2", "a3", "b1", "b2"]


@st.composite
def fleets(draw: st.DrawFn) -> Ledger:
    ledger = Ledger()
    for i in range(draw(st.integers(1, 5))):
        groups = draw(st.integers(1, 2))
        size = draw(st.sampled_from([2, 4]))
        spares = draw(st.integers(0, 2))
        if draw(st.booleans()):
            run = elastic_run(
                f"e{i}", "org:a", min_gpus=size, max_gpus=groups * size, step=size, spares=spares
            )
        else:
            run = fixed_run(f"f{i}", "org:b", groups * size, group_gpus=size, spares=spares)
        for g in range(groups):
            ledger.lease(run, draw(st.sampled_from(NODES)), size, group=g)
            for _ in range(spares):
                ledger.spare(run, g, draw(st.sampled_from(NODES)), size)
    for j in range(draw(st.integers(0, 3))):
        opp = fixed_run(f"o{j}", "org:o", 2, opportunistic=True)
        ledger.fill(opp, draw(st.sampled_from(NODES)), 2, start=T0 + timedelta(minutes=j))
    return ledger


def occupancy(leases: list[tuple[str, Role, int]], node: str) -> int:
    load = {role: 0 for role in Role}
    for where, role, gpus in leases:
        if where == node:
            load[role] += gpus
    return load[Role.ACTIVE] + max(load[Role.SPARE], load[Role.BORROWED])


@settings(max_examples=200, deadline=None)
@given(ledger=fleets(), node=st.sampled_from(NODES))
def test_failure_plan_invariants(ledger: Ledger, node: str) -> None:
    plan = fail(ledger, node)
    assert plan == fail(ledger, node)
    names = [name for name, _ in plan.ends]
    assert len(names) == len(set(names))
    by_name = ledger.by_name
    # Nothing stays open on the failed node, and nothing new lands there.
    assert all(lease.name in names for lease in ledger.leases if lease.node == node)
    assert all(start.node != node for start in plan.starts)
    # No healthy node ends up holding more GPUs than before.
    before = [(lease.node, lease.role, lease.gpus) for lease in ledger.leases]
    after = [
        (lease.node, lease.role, lease.gpus) for lease in ledger.leases if lease.name not in names
    ] + [(s.node, s.role, s.gpus) for s in plan.starts]
    for other in NODES:
        if other != node:
            assert occupancy(after, other) <= occupancy(before, other)
    # Swaps keep world size and payer.
    for start in plan.starts:
        if start.role is Role.ACTIVE:
            old = by_name[start.replaces or ""]
            assert (old.gpus, old.rank, old.group, old.envelope) == (
                start.gpus,
                start.rank,
                start.group,
                start.envelope,
            )
            assert dict(plan.ends)[old.name] == "NodeFailure"
    # Malleable runs that survive stay at or above min.
    for key, run in ledger.runs.items():
        left = sum(
            lease.gpus
            for lease in ledger.leases
            if lease.run == key and is_working(lease) and lease.name not in names
        ) + sum(s.gpus for s in plan.starts if s.run == key and s.role is not Role.SPARE)
        if key in plan.requeue or key in plan.failed:
            assert left == 0
        elif run.malleable is not None:
            assert left >= run.malleable.min_gpus
