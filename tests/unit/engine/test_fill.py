"""Opportunistic fill: room inside other runs' spares, pack reused on it, Borrowed ranks."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.bindplan import bind_plan, to_leases
from shared.engine.failures import on_node_failure
from shared.engine.fill import as_fill, fill_topology, is_fill, spare_room
from shared.engine.model import Closure, Lease, LeaseReason, Role, RunKey, RunRequest
from shared.engine.pack import NoFit, Placement, pack
from shared.engine.topology import occupancy

from .fleet import T0, dom, domain_nodes, envelope, funding, lease, node, offer, run, topo

HOST: RunKey = ("other", "train")
SWEEP = replace(run("sweep", total=8, group=8), opportunistic=True)
B = dom("gpu-b", "nv-b")


def spare(node_name: str, gpus: int = 8, *, run_key: RunKey = HOST) -> Lease:
    return replace(
        lease(node_name, gpus, name=f"spare-{node_name}", run_key=run_key), role=Role.SPARE, rank=-1
    )


def borrowed(node_name: str, gpus: int, *, run_key: RunKey = ("other", "fill")) -> Lease:
    return replace(
        lease(node_name, gpus, name=f"fill-{node_name}", run_key=run_key), role=Role.BORROWED
    )


def placed(result: Placement | NoFit) -> Placement:
    assert isinstance(result, Placement), result
    return result


# --------------------------------------------------------------------------- spare room


def test_spare_room_is_other_runs_spares_minus_fill_already_there() -> None:
    leases = [
        spare("nv-a-01"),
        spare("nv-a-02"),
        borrowed("nv-a-02", 6),
        spare("nv-a-03", run_key=SWEEP.key),  # its own spare: a swap would take it back
        replace(spare("nv-a-04"), end=T0 + timedelta(minutes=1), closure="Completed"),
        lease("nv-a-05", 8),  # active GPUs are no room
    ]
    assert spare_room(leases, SWEEP.key) == {"nv-a-01": 8, "nv-a-02": 2}


def test_fill_topology_sizes_each_node_to_its_room() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 3)
    leases = [lease("nv-a-01", 8), spare("nv-a-02"), spare("nv-a-03", 4), borrowed("nv-a-03", 2)]
    room = fill_topology(topo(nodes, leases), leases, SWEEP.key)
    assert [(n.name, n.gpus) for n in room] == [("nv-a-02", 8), ("nv-a-03", 2)]
    assert room.free("nv-a-02") == 8 and room.free("nv-a-03") == 2
    assert room.node("nv-a-02") == replace(nodes[1], gpus=8), "labels and domain are kept"


def test_fill_topology_skips_unknown_nodes_and_keeps_unschedulable_ones_unusable() -> None:
    nodes = [node("nv-a-01"), node("nv-a-02", cordoned=True)]
    leases = [spare("nv-a-01"), spare("nv-a-02"), spare("gone")]
    room = fill_topology(topo(nodes, leases), leases, SWEEP.key)
    assert "gone" not in room
    assert room.free("nv-a-02") == 0


# --------------------------------------------------------------------------- placing fill


def test_fill_is_pack_on_the_spare_room_with_borrowed_ranks() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 4)
    leases = [lease("nv-a-01", 8), lease("nv-a-02", 8), spare("nv-a-03")]
    own = offer(envelope("sweep-env", budget="sweeps"))
    p = as_fill(
        placed(pack(SWEEP, fill_topology(topo(nodes, leases), leases, SWEEP.key), funding(own)))
    )
    assert [(s.node, s.gpus, s.role, s.rank) for s in p.slices] == [
        ("nv-a-03", 8, Role.BORROWED, 0)
    ]
    assert {s.envelope for s in p.slices} == {"sweeps/sweep-env"}, "its own envelope pays"
    assert p.active_gpus == 8 and p.ranks == (0,) and p.spare_gpus == 0


def test_fill_groups_stay_in_one_domain_and_never_straddle_spares_of_two() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 2)
    leases = [spare("nv-a-01", 4), spare("nv-b-01", 4), spare("nv-b-02", 4)]
    sweep = replace(SWEEP, total_gpus=8, group_gpus=8)
    p = as_fill(
        placed(pack(sweep, fill_topology(topo(nodes, leases), leases, sweep.key), funding()))
    )
    assert [g.domain for g in p.groups] == [B]
    assert sorted((s.node, s.rank) for s in p.slices) == [("nv-b-01", 0), ("nv-b-02", 1)]


def test_fill_that_does_not_fit_the_spare_room_is_no_fit() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 2)
    leases = [spare("nv-a-01", 4), borrowed("nv-a-01", 2)]
    room = fill_topology(topo(nodes, leases), leases, SWEEP.key)
    assert isinstance(pack(replace(SWEEP, group_gpus=None, total_gpus=4), room, funding()), NoFit)


def test_as_fill_keeps_spares_and_everything_but_the_role() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 2)
    p = placed(pack(run(total=8, group=8, spares=8), topo(nodes), funding()))
    fill = as_fill(p)
    assert [s.role for s in fill.slices] == [Role.BORROWED, Role.SPARE]
    assert replace(fill.slices[0], role=Role.ACTIVE) == p.slices[0]
    assert fill.slices[1] == p.slices[1]


def test_only_a_placement_made_entirely_of_fill_is_fill() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 2)
    plain = placed(pack(run(total=8, group=8), topo(nodes), funding()))
    with_spare = placed(pack(run(total=8, group=8, spares=8), topo(nodes), funding()))
    assert is_fill(as_fill(plain))
    assert not is_fill(plain)
    assert not is_fill(as_fill(with_spare)), "a placement holding a spare is an ordinary one"
    assert not is_fill(Placement(groups=()))


# --------------------------------------------------------------------------- occupancy


def test_fill_is_not_counted_on_top_of_the_spare_it_sits_in() -> None:
    assert occupancy([(8, Role.SPARE), (8, Role.BORROWED)]) == 8
    assert occupancy([(4, Role.ACTIVE), (2, Role.SPARE), (4, Role.BORROWED)]) == 8
    nodes = [node("nv-a-01")]
    t = topo(nodes, [spare("nv-a-01", 4), borrowed("nv-a-01", 4)])
    assert t.used("nv-a-01") == 4 and t.free("nv-a-01") == 4
    t = t.with_lease(lease("nv-a-01", 4))
    assert t.used("nv-a-01") == 8 and t.free("nv-a-01") == 0
    t = t.without_lease(spare("nv-a-01", 4))
    assert t.used("nv-a-01") == 8, "fill left without its spare holds its own GPUs"
    gone = t.without_node("nv-a-01")
    assert gone.used("nv-a-01") == 8 and gone.orphan_usage() == {"nv-a-01": 8}


_UPDATES = st.lists(
    st.tuples(
        st.booleans(),
        st.integers(0, 4),
        st.sampled_from(["nv-a-01", "nv-a-02", "ghost"]),
        st.integers(1, 8),
        st.sampled_from(list(Role)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(_UPDATES)
def test_incremental_occupancy_equals_a_fresh_build(
    ops: list[tuple[bool, int, str, int, Role]],
) -> None:
    """Any sequence of lease updates of any role gives ``occupancy`` per node, as a rebuild does."""
    nodes = [node("nv-a-01"), node("nv-a-02")]
    t = topo(nodes)
    live: dict[str, Lease] = {}
    for hold, i, where, gpus, role in ops:
        held = replace(lease(where, gpus, name=f"l{i}-{where}"), role=role)
        if hold:
            t, live[held.name] = t.with_lease(held), held
        else:
            t = t.without_lease(held)
            live.pop(held.name, None)
    fresh = topo(nodes, live.values())
    for name in ("nv-a-01", "nv-a-02", "ghost"):
        want = occupancy((x.gpus, x.role) for x in live.values() if x.node == name)
        assert t.used(name) == fresh.used(name) == want
        assert t.free(name) == fresh.free(name)
    assert dict(t.domains(nodes[0].flavor)) == dict(fresh.domains(nodes[0].flavor))


# --------------------------------------------------------------------------- bind and reclaim


def test_a_fill_bind_gives_borrowed_ranks_pods_and_opens_them_as_fill() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 2)
    leases = [spare("nv-a-02")]
    sweep = replace(SWEEP, total_gpus=8, group_gpus=4)
    p = as_fill(
        placed(pack(sweep, fill_topology(topo(nodes, leases), leases, sweep.key), funding()))
    )
    intent = bind_plan(sweep, p, now=T0, reason=LeaseReason.START)
    assert [(le.role, le.reason, le.rank) for le in intent.leases] == [
        (Role.BORROWED, LeaseReason.FILL, 0),
        (Role.BORROWED, LeaseReason.FILL, 1),
    ]
    assert [(pod.name, pod.node, pod.role, pod.world_size) for pod in intent.pods] == [
        ("sweep-g0-r0", "nv-a-02", Role.BORROWED, 2),
        ("sweep-g1-r1", "nv-a-02", Role.BORROWED, 2),
    ]
    grow = bind_plan(sweep, p, now=T0, reason=LeaseReason.GROW)
    assert {le.reason for le in grow.leases} == {LeaseReason.GROW}, "only a start opens as fill"


def test_a_swap_onto_the_spare_reclaims_the_fill_placed_there() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 3)
    host = RunRequest(
        key=HOST,
        uid="uid-host",
        owner="org:ai:team-b",
        flavor=nodes[0].flavor,
        total_gpus=8,
        group_gpus=8,
        spares_per_group=8,
    )
    ranks = [lease("nv-a-01", 8, name="host-r0", run_key=HOST)]
    leases = [*ranks, spare("nv-a-02")]
    sweep = replace(SWEEP, checkpoint=timedelta(minutes=5), max_restarts=1)
    p = as_fill(
        placed(pack(sweep, fill_topology(topo(nodes, leases), leases, sweep.key), funding()))
    )
    fill = to_leases(bind_plan(sweep, p, now=T0 + timedelta(minutes=1), reason=LeaseReason.START))
    plan = on_node_failure(
        "nv-a-01",
        [*leases, *fill],
        {HOST: host, sweep.key: sweep},
        node_domains={n.name: n.domain for n in nodes},
        now=T0 + timedelta(minutes=2),
    )
    assert plan.ends == (
        (fill[0].name, Closure.RECLAIMED_BY_SPARE.value),
        ("spare-nv-a-02", Closure.SWAP.value),
        ("host-r0", Closure.NODE_FAILURE.value),
    )
    assert [(s.node, s.role, s.rank) for s in plan.starts] == [("nv-a-02", Role.ACTIVE, 0)]
    assert plan.requeue == (sweep.key,) and plan.reasons[sweep.key] == "ReclaimedBySpare"
