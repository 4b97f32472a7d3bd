"""Bind plan: leases and pods of one atomic commit, with deterministic, valid names."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.bindplan import (
    BindIntent,
    bind_plan,
    lease_name,
    pod_name,
    to_leases,
)
from shared.engine.model import FundingKind, LeaseReason, Role, RunKey, RunRequest
from shared.engine.offers import Funding
from shared.engine.pack import GroupPlacement, PlacedSlice, Placement, pack

from .fleet import T0, dom, domain_nodes, envelope, funding, node, offer, run, topo

SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def plan_for(req_total: int = 32, group: int = 16, spares: int = 0) -> tuple[RunRequest, Placement]:
    req = run(total=req_total, group=group, spares=spares, max_duration=timedelta(hours=2))
    t = topo(domain_nodes("gpu-a", "nv-a", 3) + domain_nodes("gpu-b", "nv-b", 3))
    placement = pack(req, t, funding())
    assert isinstance(placement, Placement)
    return req, placement


def test_one_lease_per_slice_and_one_pod_per_rank() -> None:
    req = run(total=32, group=16, spares=4, max_duration=timedelta(hours=2))
    t = topo(domain_nodes("gpu-a", "nv-a", 3) + domain_nodes("gpu-b", "nv-b", 3))
    placement = pack(req, t, funding())
    assert isinstance(placement, Placement)
    intent = bind_plan(req, placement, now=T0, reason=LeaseReason.START)
    assert len(intent.leases) == len(placement.slices)
    assert intent.gpus == placement.active_gpus + placement.spare_gpus == 40
    assert [p.rank for p in intent.pods] == [0, 1, 2, 3]
    assert all(p.world_size == 4 == intent.world_size for p in intent.pods)
    assert intent.master == "train-g0-r0" == intent.pods[0].name
    assert [p.name for p in intent.pods] == [
        "train-g0-r0",
        "train-g0-r1",
        "train-g1-r2",
        "train-g1-r3",
    ]
    first = intent.leases[0]
    assert first.start == T0 and first.expected_end == T0 + timedelta(hours=2)
    assert first.reason is LeaseReason.START and first.owner == req.owner
    assert first.comp_path == ("GROUP[0]", "RANK[0]")
    spares = [li for li in intent.leases if li.role is Role.SPARE]
    assert [li.comp_path for li in spares] == [("GROUP[0]", "SPARE[0]"), ("GROUP[1]", "SPARE[1]")]
    assert all(li.rank == -1 for li in spares)
    assert intent.by_node() == placement.by_node()


def test_rank_paid_by_two_envelopes_is_one_pod_two_leases() -> None:
    t = topo([node("n1"), node("n2")])
    fund = Funding(
        (
            offer(envelope("own"), 12),
            offer(envelope("fam", budget="parent"), 100, kind=FundingKind.FAMILY),
        )
    )
    req = run(total=16, group=16)
    placement = pack(req, t, fund)
    assert isinstance(placement, Placement)
    intent = bind_plan(req, placement, now=T0, reason=LeaseReason.START)
    assert [(li.node, li.rank, li.gpus, li.envelope) for li in intent.leases] == [
        ("n1", 0, 8, "team-a/own"),
        ("n2", 1, 4, "team-a/own"),
        ("n2", 1, 4, "parent/fam"),
    ]
    assert len({li.name for li in intent.leases}) == 3
    assert [(p.node, p.gpus) for p in intent.pods] == [("n1", 8), ("n2", 8)]


def test_retried_commit_has_same_names_new_attempt_gets_new_ones() -> None:
    req, placement = plan_for()
    a = bind_plan(req, placement, now=T0, reason=LeaseReason.START)
    later = T0 + timedelta(seconds=5)
    b = bind_plan(req, placement, now=later, reason=LeaseReason.START)
    assert [li.name for li in a.leases] == [li.name for li in b.leases]
    assert a.key == b.key
    c = bind_plan(req, placement, now=T0, reason=LeaseReason.START, attempt=1)
    assert not {li.name for li in a.leases} & {li.name for li in c.leases}
    assert a.key != c.key
    assert [p.name for p in a.pods] == [p.name for p in c.pods]


def named(
    run_key: RunKey = ("ns", "train"),
    uid: str = "u1",
    *,
    envelope_key: str = "b/e",
    reason: LeaseReason = LeaseReason.START,
    generation: int = 0,
) -> str:
    return lease_name(
        run_key,
        uid,
        group=0,
        rank=0,
        node="n1",
        envelope=envelope_key,
        reason=reason,
        generation=generation,
    )


def test_lease_names_separate_namespaces_uids_reasons_and_payers() -> None:
    name = named()
    assert name == named() and name.startswith("train-") and SUBDOMAIN.match(name)
    assert named(("ns2", "train")) != name
    assert named(uid="u2") != name
    assert named(envelope_key="b/f") != name
    assert named(reason=LeaseReason.SWAP) != name
    assert named(generation=1) != name


def test_long_and_odd_run_names_stay_valid() -> None:
    long_name = "a" * 253
    name = lease_name(
        ("ns", long_name), "u", group=1, rank=2, node="n", envelope="b/e", reason=LeaseReason.GROW
    )
    assert len(name) <= 253 and SUBDOMAIN.match(name)
    pod = pod_name(long_name, 12, 345)
    assert len(pod) <= 63 and LABEL.match(pod) and pod.endswith("-g12-r345")
    assert pod_name("a" * 60, 0, 0) != pod_name("a" * 61, 0, 0)
    dotted = pod_name("llm.v2", 0, 1)
    assert LABEL.match(dotted) and dotted != pod_name("llm-v2", 0, 1)
    assert pod_name("llm-v2", 0, 1) == "llm-v2-g0-r1"


def test_world_size_override_and_grow_offsets() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 4))
    req = run(total=64, group=16)
    grow = pack(req, t, funding(), gpus=16, first_group=2, first_rank=4)
    assert isinstance(grow, Placement)
    intent = bind_plan(req, grow, now=T0, reason=LeaseReason.GROW, world_size=6)
    assert [(p.group, p.rank) for p in intent.pods] == [(2, 4), (2, 5)]
    assert intent.world_size == 6 and intent.master == "train-g0-r0"
    assert all(li.reason is LeaseReason.GROW for li in intent.leases)
    default = bind_plan(req, grow, now=T0, reason=LeaseReason.GROW)
    assert default.world_size == 6


def test_no_max_duration_means_no_expected_end() -> None:
    t = topo([node("n1")])
    req = run(total=8)
    placement = pack(req, t, funding())
    assert isinstance(placement, Placement)
    intent = bind_plan(req, placement, now=T0, reason=LeaseReason.START)
    assert intent.leases[0].expected_end is None


def test_to_leases_feeds_topology_and_keeps_every_field() -> None:
    req, placement = plan_for(spares=2)
    intent = bind_plan(req, placement, now=T0, reason=LeaseReason.START)
    leases = to_leases(intent)
    assert [(x.name, x.node, x.gpus, x.role, x.envelope) for x in leases] == [
        (li.name, li.node, li.gpus, li.role, li.envelope) for li in intent.leases
    ]
    assert all(x.open and x.start == T0 and x.expected_end is not None for x in leases)
    t = topo(domain_nodes("gpu-a", "nv-a", 3) + domain_nodes("gpu-b", "nv-b", 3))
    applied = t.with_leases(leases)
    for name, gpus in intent.by_node().items():
        assert applied.used(name) == gpus
    assert applied.with_leases(leases).domains(req.flavor) == applied.domains(req.flavor)


def test_rank_on_two_nodes_is_rejected() -> None:
    def sl(node_name: str) -> PlacedSlice:
        return PlacedSlice(node_name, 4, Role.ACTIVE, 0, 0, "b/e", "o", FundingKind.OWNED)

    bad = Placement((GroupPlacement(0, dom(), (sl("n1"), sl("n2"))),))
    with pytest.raises(ValueError, match="rank 0"):
        bind_plan(run(), bad, now=T0, reason=LeaseReason.START)
    dup = Placement((GroupPlacement(0, dom(), (sl("n1"), sl("n1"))),))
    with pytest.raises(ValueError, match="repeats"):
        bind_plan(run(), dup, now=T0, reason=LeaseReason.START)


def test_empty_placement_binds_nothing() -> None:
    intent = bind_plan(run(), Placement(()), now=T0, reason=LeaseReason.START)
    assert isinstance(intent, BindIntent)
    assert intent.leases == () and intent.pods == () and intent.world_size == 0


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=260),
    st.integers(0, 10_000),
    st.integers(-1, 100_000),
)
def test_names_are_always_valid_dns(run_name: str, group: int, rank: int) -> None:
    lname = lease_name(
        ("ns", run_name),
        "uid",
        group=group,
        rank=rank,
        node="n",
        envelope="b/e",
        reason=LeaseReason.START,
    )
    assert len(lname) <= 253 and SUBDOMAIN.match(lname), lname
    if rank >= 0:
        pname = pod_name(run_name, group, rank)
        assert len(pname) <= 63 and LABEL.match(pname), pname
