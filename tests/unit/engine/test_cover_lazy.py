"""The lazy cover gives the eager cover's answers, and pack gives the eager plans through it.

``bench.cover_eager.eager_cover`` is the implementation that priced every offer on every call;
it is kept only as this baseline (and the benchmark's). Over generated trees (explicit parents,
budgetless path parents), budgets (windows, GPU-hours, aggregate caps, lending sub-caps), usage
and requests (locations, groups, spares, sponsors, borrow limits):

* a refusal is the same refusal (reason, message, shortfall, offers, caps);
* a success funds the same GPUs from the same envelopes, and its offers are a prefix of the eager
  ones with the same cap values; ``complete=True`` is the eager answer exactly;
* pack on a generated fleet, asking for the complete offers when it answers ``NeedsMoreOffers``
  (as every caller does), returns the plan pack makes from the eager offers.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cover_eager import eager_cover
from shared.engine.accounting import usage_from_ledger
from shared.engine.admit import Start, try_start
from shared.engine.cover import CoverDenied, allocate, cover, cover_demand
from shared.engine.family import Family
from shared.engine.model import Budget, Envelope, FundingKind, Lease, RunRequest
from shared.engine.offers import Funding
from shared.engine.pack import needs_more_offers, pack
from shared.engine.state import ClusterState
from shared.engine.topology import Topology
from tests.unit.engine.budgets import (
    A100,
    H100,
    T0,
    budget,
    cap,
    env,
    lease,
    lending,
    loc,
    request,
)
from tests.unit.engine.fleet import node

H = timedelta(hours=1)
OWNERS = ("o", "o:a", "o:a:x", "o:a:y", "o:b", "o:b:z", "p", "p:q", "o:c:deep")
"""Path-related owners: which of them are family depends only on which have Budgets."""
DOMAINS = (("c1", "d1"), ("c1", "d2"), ("c2", "d3"))
LOCATIONS = (
    loc("us-west"),
    loc("us-west", "c1"),
    loc("us-west", "c1", "d1"),
    loc("us-west", "c1", "d2"),
    loc("us-west", "c2", "d3"),
    loc("us-east"),
)
RACKED = {**loc("us-west", "c1", "d1"), "rack": "r1"}


@st.composite
def envelopes(draw: st.DrawFn, name: str) -> Envelope:
    window = draw(st.sampled_from(["open", "open", "closed", "later", "later-admit"]))
    start = end = None
    if window == "closed":
        start, end = T0 - 10 * H, T0 - H
    elif window.startswith("later"):
        start, end = T0 + H, T0 + 10 * H
    lends = draw(st.booleans())
    return env(
        name,
        draw(st.integers(1, 24)),
        flavor=draw(st.sampled_from([H100, H100, H100, A100])),
        selector=draw(st.sampled_from([*LOCATIONS, RACKED] if draw(st.booleans()) else LOCATIONS)),
        max_gpu_hours=draw(st.none() | st.floats(0, 400)),
        start=start,
        end=end,
        admission_before_start=window == "later-admit",
        lend=lending(
            draw(st.sampled_from(["o:*", "*", "p:*", "o:a:x"])),
            max_concurrency=draw(st.none() | st.integers(0, 16)),
            max_gpu_hours=draw(st.none() | st.floats(0, 200)),
        )
        if lends
        else None,
    )


@st.composite
def budgets(draw: st.DrawFn) -> list[Budget]:
    owners = draw(st.lists(st.sampled_from(OWNERS), min_size=1, max_size=len(OWNERS), unique=True))
    out = []
    for owner in owners:
        envs = [draw(envelopes(f"e{i}")) for i in range(draw(st.integers(1, 3)))]
        parents = draw(st.lists(st.sampled_from(OWNERS), max_size=2, unique=True))
        caps = []
        h100 = [e.name for e in envs if e.flavor == H100]
        if h100 and draw(st.booleans()):
            caps.append(cap("c", h100, max_concurrency=draw(st.integers(0, 30))))
        explicit = parents if draw(st.integers(0, 3)) == 0 else []
        out.append(budget(owner, *envs, parents=explicit, caps=caps))
    return out


@st.composite
def ledgers(draw: st.DrawFn, fam: Family) -> list[Lease]:
    keys = [e.key for e in fam.all_envelopes()]
    out = []
    for i in range(draw(st.integers(0, 8))):
        start = T0 - draw(st.integers(1, 20)) * H
        out.append(
            lease(
                f"l{i}",
                draw(st.sampled_from(keys)),
                draw(st.integers(1, 12)),
                start,
                end=draw(st.none() | st.just(start + H)),
                funding=draw(st.sampled_from(list(FundingKind))),
            )
        )
    return out


@st.composite
def requests(draw: st.DrawFn, budgeted: tuple[str, ...]) -> RunRequest:
    group = draw(st.none() | st.integers(2, 8))
    return request(
        draw(st.sampled_from(budgeted) if draw(st.integers(0, 4)) else st.sampled_from(OWNERS)),
        draw(st.integers(1, 40)),
        flavor=draw(st.sampled_from([H100, H100, H100, A100])),
        group_gpus=group,
        selector=draw(st.none() | st.sampled_from(LOCATIONS)),
        spares=draw(st.integers(0, 1)) if group else 0,
        allow_borrow=draw(st.integers(0, 3)) > 0,
        max_borrow=draw(st.none() | st.integers(1, 20)),
        sponsors=draw(st.lists(st.sampled_from(budgeted), max_size=3)),
        max_duration=draw(st.none() | st.sampled_from([H, 10 * H])),
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[Family, list[Lease], RunRequest, bool]:
    fam = Family(draw(budgets()))
    return fam, draw(ledgers(fam)), draw(requests(fam.owners())), draw(st.booleans())


def _fleet(sizes: list[int]) -> Topology:
    nodes = []
    for i, gpus in enumerate(sizes):
        cluster, fabric = DOMAINS[i % len(DOMAINS)]
        rack = "r1" if i % 2 else "r2"
        nodes.append(node(f"n{i:02d}", cluster=cluster, fabric=fabric, gpus=gpus, rack=rack))
        nodes.append(node(f"a{i:02d}", cluster=cluster, fabric=fabric, gpus=gpus, flavor=A100))
    return Topology.build(nodes, ())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.lists(st.sampled_from([2, 4, 8]), min_size=1, max_size=9))
def test_lazy_cover_and_pack_give_the_eager_answers(
    case: tuple[Family, list[Lease], RunRequest, bool], sizes: list[int]
) -> None:
    fam, ledger, req, for_reservation = case
    usage = usage_from_ledger(ledger, fam.caps(), now=T0)
    kw = {"now": T0, "for_reservation": for_reservation, "already_borrowed": 0}
    eager = eager_cover(req, fam, usage, **kw)
    lazy = cover(req, fam, usage, **kw)
    whole = cover(req, fam, usage, complete=True, **kw)
    if isinstance(eager, CoverDenied):
        assert lazy == eager
        assert whole == eager
        return
    assert isinstance(lazy, Funding) and isinstance(whole, Funding)
    assert whole.offers == eager.offers and dict(whole.caps) == dict(eager.caps) and whole.complete
    assert lazy.offers == eager.offers[: len(lazy.offers)]
    assert all(eager.caps[k] == v for k, v in lazy.caps.items())
    if lazy.complete:
        assert lazy.offers == eager.offers
    need = cover_demand(req)
    assert allocate(lazy, need) == allocate(eager, need)

    topology = _fleet(sizes)
    want = pack(req, topology, eager)
    got = pack(req, topology, lazy)
    if needs_more_offers(got):
        assert not lazy.complete
        got = pack(req, topology, whole)
    assert got == want


def test_try_start_covers_again_when_pack_needs_more_offers() -> None:
    """The owner's envelope funds the Run on paper but its domain is full: the Run starts where
    the next payer (its parent) pays, exactly as with every offer listed from the start."""
    d1, d2 = loc("us-west", "c1", "d1"), loc("us-west", "c1", "d2")
    budgets = [
        budget("o", env("p", 16, selector=d2)),
        budget("o:a", env("own", 16, selector=d1)),
        budget("other", env("full", 16, selector=d1)),
    ]
    nodes = [node("x1", fabric="d1", cluster="c1"), node("y1", fabric="d2", cluster="c1")]
    busy = lease("busy", "other/full", 8, T0 - H, owner="other", node="x1")
    state = ClusterState.build(now=T0, nodes=nodes, budgets=budgets, ledger=[busy])
    req = request("o:a", 8, group_gpus=8)
    lazy = cover(req, state.family, state.usage, now=T0)
    assert isinstance(lazy, Funding) and not lazy.complete and len(lazy.offers) == 1
    assert needs_more_offers(pack(req, state.topology, lazy))
    started = try_start(req, state)
    assert isinstance(started, Start) and started.funding.complete
    assert [(s.node, s.envelope, s.funding) for s in started.placement.slices] == [
        ("y1", "o/p", FundingKind.FAMILY)
    ]
