"""Pack rules of SPEC §3, one test per rule, plus properties over random fleets."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.engine.model import (
    FundingKind,
    Lease,
    Malleable,
    Node,
    Role,
    RunRequest,
    selector_matches,
)
from shared.engine.offers import Funding
from shared.engine.pack import NoFit, PackFailure, Placement, fits, group_sizes, pack
from shared.engine.topology import Topology

from .fleet import FLAVOR, dom, domain_nodes, envelope, funding, lease, node, offer, run, topo

A, B, C = dom("gpu-a", "nv-a"), dom("gpu-b", "nv-b"), dom("gpu-c", "nv-c")


def placed(result: Placement | NoFit) -> Placement:
    assert isinstance(result, Placement), result
    return result


def nofit(result: Placement | NoFit) -> NoFit:
    assert isinstance(result, NoFit), result
    return result


def nodes_of(p: Placement, role: Role = Role.ACTIVE) -> list[str]:
    return [s.node for s in p.slices if s.role is role]


# --------------------------------------------------------------------------- domain choice


def test_pack_to_empty_fills_the_emptiest_domain_before_spilling() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 4) + domain_nodes("gpu-b", "nv-b", 6))
    p = placed(pack(run(total=48, group=16), t, funding()))
    assert [g.domain for g in p.groups] == [B, B, B]
    p = placed(pack(run(total=64, group=16), t, funding()))
    assert [g.domain for g in p.groups] == [B, B, B, A]


def test_prefers_domains_the_run_already_uses() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 4) + domain_nodes("gpu-b", "nv-b", 2))
    p = placed(pack(run(total=16, group=16), t, funding(), used_domains=[B]))
    assert [g.domain for g in p.groups] == [B]


def test_prefers_domains_the_earliest_offer_pays_for() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 4) + domain_nodes("gpu-b", "nv-b", 2))
    own_b = offer(envelope("b", selector={"cluster": "gpu-b"}), 16)
    anywhere = offer(envelope("all", budget="parent"), 100, kind=FundingKind.FAMILY)
    p = placed(pack(run(total=16, group=16), t, Funding((own_b, anywhere))))
    assert p.groups[0].domain == B
    assert p.by_envelope() == {"team-a/b": 16}


def test_domain_ties_break_by_domain_key() -> None:
    t = topo(domain_nodes("gpu-b", "nv-b", 2) + domain_nodes("gpu-a", "nv-a", 2))
    assert placed(pack(run(total=8, group=8), t, funding())).groups[0].domain == A


# --------------------------------------------------------------------------- inside a domain


def test_whole_nodes_largest_free_first_then_by_name() -> None:
    nodes = [node("n4"), node("n3"), node("n2"), node("n1")]
    t = topo(nodes, [lease("n1", 4), lease("n2", 2)])
    p = placed(pack(run(total=16, group=16), t, funding()))
    assert nodes_of(p) == ["n3", "n4"]
    assert [s.rank for s in p.slices] == [0, 1]


def test_remainder_goes_to_the_tightest_node_keeping_big_nodes_whole() -> None:
    t = topo([node("n1"), node("n2"), node("n3"), node("n4")], [lease("n4", 4)])
    p = placed(pack(run(total=12, group=12), t, funding()))
    assert [(s.node, s.gpus) for s in p.slices] == [("n1", 8), ("n4", 4)]


def test_rack_breaks_ties_between_equally_free_nodes() -> None:
    t = topo([node("n1", rack="r2"), node("n2", rack="r1"), node("n3", rack="r1")])
    assert nodes_of(placed(pack(run(total=16, group=16), t, funding()))) == ["n2", "n3"]


# --------------------------------------------------------------------------- groups


def test_fixed_groups_last_one_smaller_each_in_one_domain() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 3) + domain_nodes("gpu-b", "nv-b", 3))
    p = placed(pack(run(total=40, group=16), t, funding()))
    assert [g.active_gpus for g in p.groups] == [16, 16, 8]
    assert [g.index for g in p.groups] == [0, 1, 2]
    for g in p.groups:
        assert {t.domain_of(s.node) for s in g.slices} == {g.domain}
    assert group_sizes(run(total=40, group=16), 40) == (16, 16, 8)


def test_malleable_step_is_the_group_size() -> None:
    m = Malleable(min_gpus=16, max_gpus=64, step_gpus=16, desired_gpus=64)
    t = topo(domain_nodes("gpu-a", "nv-a", 4))
    p = placed(pack(run(total=32, malleable=m), t, funding()))
    assert [g.active_gpus for g in p.groups] == [16, 16]


def test_grow_numbers_groups_and_ranks_after_existing_ones() -> None:
    m = Malleable(min_gpus=16, max_gpus=64, step_gpus=16, desired_gpus=64)
    t = topo(domain_nodes("gpu-a", "nv-a", 4) + domain_nodes("gpu-b", "nv-b", 8))
    p = placed(
        pack(
            run(total=32, malleable=m),
            t,
            funding(),
            gpus=16,
            first_group=2,
            first_rank=4,
            used_domains=[A],
        )
    )
    assert [g.index for g in p.groups] == [2]
    assert p.groups[0].domain == A
    assert p.ranks == (4, 5)


def test_without_group_size_every_node_slice_is_its_own_group() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 1), [])
    p = placed(pack(run(total=20), t, funding()))
    assert [(g.index, g.active_gpus) for g in p.groups] == [(0, 8), (1, 8), (2, 4)]
    assert p.ranks == (0, 1, 2)
    assert [g.domain for g in p.groups] == [A, A, B]


def test_no_partial_gang() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 1))
    result = nofit(pack(run(total=32, group=16), t, funding()))
    assert result.reason is PackFailure.NO_CAPACITY
    assert "needs 2 groups of 16 GPUs" in result.message
    assert "8 free" in result.message


def test_zero_gpus_is_an_empty_plan() -> None:
    assert placed(pack(run(total=8), topo([node("n1")]), funding(), gpus=0)).groups == ()


# --------------------------------------------------------------------------- single domain


def test_single_domain_mode_keeps_every_group_together() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 3) + domain_nodes("gpu-b", "nv-b", 5))
    p = placed(pack(run(total=40, group=16, spread=False), t, funding()))
    assert {g.domain for g in p.groups} == {B}


def test_single_domain_mode_fails_fast_when_no_domain_holds_the_gang() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 3) + domain_nodes("gpu-b", "nv-b", 3))
    result = nofit(pack(run(total=32, group=16, spread=False), t, funding()))
    assert result.reason is PackFailure.SPREAD_FORBIDDEN
    assert "needs 32 GPUs" in result.message and "largest domain free 24" in result.message
    spread = placed(pack(run(total=32, group=16), t, funding()))
    assert len({g.domain for g in spread.groups}) == 2


def test_single_domain_grow_stays_in_the_run_domain() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 8))
    req = run(total=32, group=16, spread=False)
    assert placed(pack(req, t, funding(), gpus=16, used_domains=[A])).groups[0].domain == A
    again = nofit(pack(req, t, funding(), gpus=32, used_domains=[A]))
    assert again.reason is PackFailure.SPREAD_FORBIDDEN


def test_single_domain_node_granular() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 3))
    p = placed(pack(run(total=24, spread=False), t, funding()))
    assert {g.domain for g in p.groups} == {B}
    assert nofit(pack(run(total=32, spread=False), t, funding())).reason is (
        PackFailure.SPREAD_FORBIDDEN
    )


# --------------------------------------------------------------------------- spares


def test_spares_sit_in_their_group_domain_on_another_node() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 3) + domain_nodes("gpu-b", "nv-b", 3))
    p = placed(pack(run(total=32, group=16, spares=8), t, funding()))
    for g in p.groups:
        spares = [s for s in g.slices if s.role is Role.SPARE]
        actives = {s.node for s in g.slices if s.role is Role.ACTIVE}
        assert sum(s.gpus for s in spares) == 8
        assert all(t.domain_of(s.node) == g.domain for s in spares)
        assert all(s.node not in actives and s.rank == -1 for s in spares)
    assert p.spare_gpus == 16 and p.active_gpus == 32


def test_small_spare_takes_the_tightest_node() -> None:
    t = topo([node("n1"), node("n2"), node("n3"), node("n4")], [lease("n4", 6)])
    p = placed(pack(run(total=16, group=16, spares=1), t, funding()))
    assert nodes_of(p, Role.SPARE) == ["n4"]


def test_domain_holding_group_and_spares_beats_one_holding_only_actives() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 3))
    p = placed(pack(run(total=16, group=16, spares=4), t, funding(), used_domains=[A]))
    assert p.groups[0].domain == B
    assert {t.domain_of(n) for n in nodes_of(p, Role.SPARE)} == {B}


def test_spares_spill_to_another_domain_when_home_is_full() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 1))
    p = placed(pack(run(total=16, group=16, spares=4), t, funding()))
    assert p.groups[0].domain == A
    assert [(s.node, s.gpus, s.group) for s in p.slices if s.role is Role.SPARE] == [
        ("nv-b-01", 4, 0)
    ]


def test_no_room_for_spares_is_no_fit() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2))
    assert isinstance(pack(run(total=16, group=16, spares=1), t, funding()), NoFit)
    t1 = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 1))
    assert isinstance(pack(run(total=16, group=16, spares=1, spread=False), t1, funding()), NoFit)


# --------------------------------------------------------------------------- payers


def test_payer_selector_two_envelopes_in_two_domains() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 2))
    pay_a = offer(envelope("a", selector={"cluster": "gpu-a"}), 16)
    pay_b = offer(envelope("b", budget="sib", selector={"cluster": "gpu-b"}), 16)
    p = placed(pack(run(total=32, group=16), t, Funding((pay_a, pay_b))))
    assert {(g.domain, s.envelope) for g in p.groups for s in g.slices} == {
        (A, "team-a/a"),
        (B, "sib/b"),
    }
    assert p.by_envelope() == {"sib/b": 16, "team-a/a": 16}


def test_slice_split_across_two_payers_keeps_one_rank() -> None:
    t = topo([node("n1"), node("n2")])
    first = offer(envelope("own"), 12)
    second = offer(envelope("fam", budget="parent", owner="org:ai"), 100, kind=FundingKind.FAMILY)
    p = placed(pack(run(total=16, group=16), t, Funding((first, second))))
    assert [(s.node, s.rank, s.gpus, s.envelope, s.funding) for s in p.slices] == [
        ("n1", 0, 8, "team-a/own", FundingKind.OWNED),
        ("n2", 1, 4, "team-a/own", FundingKind.OWNED),
        ("n2", 1, 4, "parent/fam", FundingKind.FAMILY),
    ]
    assert p.slices[2].payer_owner == "org:ai"


def test_shared_cap_limits_what_offers_pay_together() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 4))
    one = offer(envelope("one"), 32, caps=("agg",))
    two = offer(envelope("two"), 32, caps=("agg",))
    fund = Funding((one, two), caps={"agg": 24})
    assert placed(pack(run(total=24, group=8), t, fund)).active_gpus == 24
    result = nofit(pack(run(total=32, group=8), t, fund))
    assert result.reason is PackFailure.NO_FUNDED_CAPACITY


def test_payer_per_node_selector_is_respected() -> None:
    t = topo([node("n1", rack="r1"), node("n2", rack="r2"), node("n3", rack="r2")])
    rack2 = offer(envelope("r2", selector={"region": "us-west", "rack": "r2"}), 100)
    p = placed(pack(run(total=16, group=16), t, Funding((rack2,))))
    assert nodes_of(p) == ["n2", "n3"]


def test_no_payer_where_capacity_is_means_no_funded_capacity() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 4) + domain_nodes("gpu-b", "nv-b", 1))
    only_b = offer(envelope("b", selector={"cluster": "gpu-b"}), 100)
    result = nofit(pack(run(total=16, group=16), t, Funding((only_b,))))
    assert result.reason is PackFailure.NO_FUNDED_CAPACITY
    assert "largest funded domain free 8" in result.message


def test_funding_below_demand_fails_fast() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 4))
    result = nofit(pack(run(total=16, group=8, spares=2), t, funding(offer(gpus=18))))
    assert result.reason is PackFailure.NO_FUNDED_CAPACITY
    assert "needs 20 GPUs" in result.message


def test_offers_of_another_flavor_never_pay() -> None:
    t = topo([node("n1"), node("n2")])
    wrong = offer(envelope("b200", flavor="B200"), 100)
    assert nofit(pack(run(total=8), t, Funding((wrong,)))).reason is (
        PackFailure.NO_FUNDED_CAPACITY
    )


# --------------------------------------------------------------------------- eligibility


def test_cordoned_and_not_ready_nodes_are_excluded() -> None:
    t = topo([node("n1", cordoned=True), node("n2", ready=False), node("n3")])
    assert nodes_of(placed(pack(run(total=8), t, funding()))) == ["n3"]
    assert isinstance(pack(run(total=16, group=16), t, funding()), NoFit)


def test_other_flavors_and_request_selector_are_respected() -> None:
    b_nodes = [
        node(n, cluster="gpu-b", fabric="nv-b", rack=r) for n, r in (("h2", None), ("h3", "r9"))
    ]
    t = topo([node("h1"), node("b1", flavor="B200"), *b_nodes])
    p = placed(pack(run(total=8, selector={"cluster": "gpu-b", "rack": "r9"}), t, funding()))
    assert nodes_of(p) == ["h3"]
    p = placed(pack(run(total=16, selector={"cluster": "gpu-b"}), t, funding()))
    assert nodes_of(p) == ["h2", "h3"]
    assert isinstance(pack(run(total=8, selector={"gpu.flavor": "B200"}), t, funding()), NoFit)


def test_protected_gpus_are_not_taken() -> None:
    t = topo([node("n1"), node("n2")], [lease("n2", 2)])
    p = placed(pack(run(total=8), t, funding(), protected={"n1": 6}))
    assert p.by_node() == {"n1": 2, "n2": 6}
    result = nofit(pack(run(total=9, group=9), t, funding(), protected={"n1": 6}))
    assert result.reason is PackFailure.NO_CAPACITY


def test_existing_usage_is_respected() -> None:
    t = topo([node("n1"), node("n2")], [lease("n1", 8), lease("n2", 3)])
    assert placed(pack(run(total=5), t, funding())).by_node() == {"n2": 5}


# --------------------------------------------------------------------------- determinism


def test_same_inputs_same_plan_regardless_of_input_order() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 5) + domain_nodes("gpu-b", "nv-b", 5)
    leases = [lease("nv-a-02", 3), lease("nv-b-04", 5)]
    req = run(total=56, group=24, spares=2)
    base = pack(req, topo(nodes, leases), funding())
    rng = random.Random(3)
    for _ in range(5):
        shuffled = nodes[:]
        rng.shuffle(shuffled)
        assert pack(req, topo(shuffled, leases[::-1]), funding()) == base
    assert fits(base)


# --------------------------------------------------------------------------- properties

Scenario = tuple[Topology, Funding, RunRequest, dict[str, int]]
CLUSTERS = ["gpu-a", "gpu-b", "gpu-c"]
RACKS = ["r1", "r2"]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    nodes: list[Node] = []
    leases: list[Lease] = []
    for i in range(draw(st.integers(4, 16))):
        cluster = draw(st.sampled_from(CLUSTERS))
        gpus = draw(st.sampled_from([0, 2, 4, 8, 8, 8]))
        n = node(
            f"n{i:02d}",
            cluster=cluster,
            fabric=f"f-{cluster}",
            flavor=draw(st.sampled_from([FLAVOR, FLAVOR, FLAVOR, "B200"])),
            gpus=gpus,
            rack=draw(st.sampled_from(RACKS)),
            ready=draw(st.booleans() | st.just(True)),
            cordoned=draw(st.sampled_from([False, False, False, True])),
        )
        nodes.append(n)
        used = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8, gpus + 1]))
        if used:
            leases.append(lease(n.name, used, name=f"old-{i}"))
    selector_st = st.sampled_from(
        [
            {"region": "us-west"},
            {"region": "us-west"},
            {"region": "us-west"},
            {"cluster": "gpu-a"},
            {"cluster": "gpu-b"},
            {"rack": "r1"},
            {"cluster": "gpu-c", "rack": "r2"},
            {"region": "eu-north"},
        ]
    )
    cap_keys = ["agg", "borrow"]
    offers = tuple(
        offer(
            envelope(f"e{k}", budget=f"b{k}", selector=draw(selector_st)),
            draw(st.integers(0, 64)),
            kind=draw(st.sampled_from(list(FundingKind))),
            caps=tuple(draw(st.lists(st.sampled_from(cap_keys), unique=True, max_size=2))),
        )
        for k in range(draw(st.integers(1, 3)))
    )
    caps = {k: draw(st.integers(0, 48)) for k in cap_keys if draw(st.booleans())}
    group = draw(st.sampled_from([None, 2, 4, 8, 12, 16]))
    req = run(
        total=draw(st.integers(1, 24)),
        group=group,
        spread=draw(st.booleans()),
        selector=draw(st.sampled_from([{}, {}, {"cluster": "gpu-b"}, {"rack": "r2"}])),
        spares=draw(st.sampled_from([0, 0, 0, 1, 2, 4])),
    )
    protected = {n.name: draw(st.integers(1, 8)) for n in nodes if draw(st.integers(0, 6)) == 0}
    return Topology.build(nodes, leases), Funding(offers, caps), req, protected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 3), st.integers(0, 5))
def test_pack_invariants(scenario: Scenario, first_group: int, first_rank: int) -> None:
    t, fund, req, protected = scenario
    result = pack(req, t, fund, first_group=first_group, first_rank=first_rank, protected=protected)
    assert result == pack(
        req, t, fund, first_group=first_group, first_rank=first_rank, protected=protected
    ), "same inputs, same plan"
    event(result.reason.value if isinstance(result, NoFit) else "placed")
    if isinstance(result, NoFit):
        assert result.message
        return
    # Gang: exactly the asked width, spares per group, sizes per rule.
    assert result.active_gpus == req.total_gpus
    assert all(g.spare_gpus == req.spares_per_group for g in result.groups)
    sizes = group_sizes(req, req.total_gpus)
    if sizes is not None:
        assert tuple(g.active_gpus for g in result.groups) == sizes
    assert [g.index for g in result.groups] == list(
        range(first_group, first_group + len(result.groups))
    )
    assert result.ranks == tuple(range(first_rank, first_rank + len(result.ranks)))
    # Capacity: never more than a node has, never protected GPUs, only eligible nodes.
    for name, gpus in result.by_node().items():
        n = t.node(name)
        assert n is not None and n.schedulable and n.flavor == req.flavor
        assert selector_matches(req.selector, n.labels)
        assert gpus <= t.free(name) - protected.get(name, 0)
        assert t.used(name) + gpus <= n.gpus
    # One domain per group (spares too when spread is forbidden).
    for g in result.groups:
        for s in g.slices:
            if s.role is Role.ACTIVE or not req.allow_cross_group_spread:
                assert t.domain_of(s.node) == g.domain
    if not req.allow_cross_group_spread:
        assert len(result.domains) == 1
    # Payers: selector matches, within offer GPUs and shared caps.
    by_key = {o.envelope.key: o for o in fund.offers}
    paid: Counter[str] = Counter()
    per_cap: Counter[str] = Counter()
    for s in result.slices:
        o = by_key[s.envelope]
        n = t.node(s.node)
        assert n is not None and selector_matches(o.envelope.selector, n.labels)
        assert s.payer_owner == o.envelope.owner and s.funding is o.kind
        assert s.gpus > 0
        paid[s.envelope] += s.gpus
        for c in o.caps:
            per_cap[c] += s.gpus
    for key, gpus in paid.items():
        assert gpus <= by_key[key].gpus
    for c, gpus in per_cap.items():
        if c in fund.caps:
            assert gpus <= fund.caps[c]
    # One entry per (group, rank, node, payer): bind names stay unique.
    keys = [(s.group, s.rank, s.node, s.envelope) for s in result.slices]
    assert len(keys) == len(set(keys))
    # A rank lives on one node.
    rank_nodes: dict[int, set[str]] = {}
    for s in result.slices:
        if s.role is Role.ACTIVE:
            rank_nodes.setdefault(s.rank, set()).add(s.node)
        else:
            assert s.rank == -1
    assert all(len(v) == 1 for v in rank_nodes.values())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([4, 8, 16]))
def test_roomy_funded_fleet_always_fits(domains: int, per_domain: int, group: int) -> None:
    """With ample free GPUs and funding, a gang that fits group-wise is always placed."""
    nodes = [n for d in range(domains) for n in domain_nodes(f"c{d}", f"f{d}", per_domain, gpus=8)]
    t = topo(nodes)
    groups_per_domain = (per_domain * 8) // group
    total = groups_per_domain * domains * group
    if total == 0:
        return
    p = placed(pack(run(total=total, group=group), t, funding()))
    assert p.active_gpus == total
