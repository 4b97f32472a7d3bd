"""Capacity from the truth of the node: pod counting, taints, selectors, fit and pack with them."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.engine.admit import resources_refusal
from shared.engine.capacity import (
    NO_LOAD,
    Exclusion,
    Load,
    disfavoured,
    exclusion,
    format_bytes,
    never_fits,
    pod_requests,
    selected,
    slots,
    tolerates,
)
from shared.engine.fill import fill_topology
from shared.engine.model import (
    Node,
    NodeCapacity,
    PodNeeds,
    Requirement,
    Role,
    Taint,
    Toleration,
)
from shared.engine.pack import NoFit, PackFailure, Placement, pack
from shared.engine.topology import Topology

from .fleet import FLAVOR, domain_nodes, funding, lease, node, run

GI = 2**30
BIG = NodeCapacity(cpu=64_000, memory=512 * GI, ephemeral=1024 * GI, pods=110)


def sized(n: Node, capacity: NodeCapacity = BIG, taints: tuple[Taint, ...] = ()) -> Node:
    return dataclasses.replace(n, capacity=capacity, taints=taints)


def placed(result: Placement | NoFit) -> Placement:
    assert isinstance(result, Placement), result
    return result


# --------------------------------------------------------------------------- counting pods


def test_a_pod_needs_the_larger_of_its_containers_and_its_init_steps_plus_overhead() -> None:
    containers = [(0, 1000, 4 * GI, 0), (1, 500, 2 * GI, 0)]
    init = [((0, 4000, 1 * GI, 0), False)]
    assert pod_requests(containers, init, (0, 100, 0, 0)) == (1, 4100, 6 * GI, 0)


def test_sidecars_run_beside_every_later_step_and_the_containers() -> None:
    sidecar = ((0, 200, GI, 0), True)
    later = ((0, 1000, GI, 0), False)
    # containers 500m + sidecar 200m = 700m; the later init step runs with the sidecar: 1200m
    assert pod_requests([(0, 500, GI, 0)], [sidecar, later]) == (0, 1200, 2 * GI, 0)


# --------------------------------------------------------------------------- taints and selectors


def test_tolerations_match_as_kubernetes_matches_them() -> None:
    taint = Taint("maintenance", "planned", "NoSchedule")
    assert tolerates(Toleration("maintenance", "Equal", "planned", "NoSchedule"), taint)
    assert tolerates(Toleration("maintenance", "Exists"), taint)
    assert tolerates(Toleration("", "Exists"), taint)
    assert not tolerates(Toleration("maintenance", "Equal", "other"), taint)
    assert not tolerates(Toleration("maintenance", "Exists", effect="NoExecute"), taint)


def test_noschedule_and_noexecute_exclude_preferno_only_disfavours() -> None:
    hard = sized(node("n1"), taints=(Taint("k", "v", "NoExecute"),))
    soft = sized(node("n2"), taints=(Taint("k", "v", "PreferNoSchedule"),))
    needs = PodNeeds()
    assert exclusion(hard, NO_LOAD, needs) is Exclusion.TAINTED
    assert exclusion(soft, NO_LOAD, needs) is None
    assert disfavoured(soft, needs)
    tolerant = PodNeeds(tolerations=(Toleration("k", "Exists"),))
    assert exclusion(hard, NO_LOAD, tolerant) is None
    assert not disfavoured(soft, tolerant)


def test_node_selector_and_required_affinity_narrow_the_nodes() -> None:
    n = node("n1", extra={"nic": "cx7", "gen": "5"})
    assert selected(n, PodNeeds(node_selector={"nic": "cx7"}))
    assert not selected(n, PodNeeds(node_selector={"nic": "cx6"}))
    term_in = (Requirement("nic", "In", ("cx6", "cx7")),)
    term_gt = (Requirement("gen", "Gt", ("5",)),)
    assert selected(n, PodNeeds(affinity=(term_in,)))
    assert not selected(n, PodNeeds(affinity=(term_gt,)))
    assert selected(n, PodNeeds(affinity=(term_gt, term_in))), "any term may match"
    by_name = (Requirement("metadata.name", "NotIn", ("n1",), field=True),)
    assert not selected(n, PodNeeds(affinity=(by_name,)))
    assert selected(n, PodNeeds(affinity=((Requirement("zone", "DoesNotExist"),),)))


# --------------------------------------------------------------------------- fit


def test_slots_are_what_the_tightest_resource_leaves() -> None:
    needs = PodNeeds(cpu=8_000, memory=100 * GI)
    assert slots(BIG, NO_LOAD, needs) == 5  # memory: 512 / 100
    busy = Load(cpu=50_000, memory=0, pods=3)
    assert slots(BIG, busy, needs) == 1  # cpu: 14 cores left
    assert slots(BIG, Load(pods=110), PodNeeds()) == 0
    assert slots(None, busy, needs) > 1000, "GPUs alone bound a node without declared capacity"


def test_exclusion_names_the_short_resource() -> None:
    n = sized(node("n1"))
    assert exclusion(n, Load(memory=500 * GI), PodNeeds(memory=64 * GI)) is Exclusion.MEMORY
    assert exclusion(n, Load(cpu=63_500), PodNeeds(cpu=1000)) is Exclusion.CPU
    assert exclusion(n, NO_LOAD, PodNeeds(ephemeral=2048 * GI)) is Exclusion.EPHEMERAL
    cordoned = sized(node("n2", cordoned=True))
    assert exclusion(cordoned, NO_LOAD, PodNeeds()) is Exclusion.CORDONED


def test_a_rank_no_node_could_ever_hold_is_refused_naming_the_resource() -> None:
    nodes = [sized(node("n1")), sized(node("n2"), dataclasses.replace(BIG, memory=256 * GI))]
    why = never_fits(PodNeeds(memory=64 * 2**40), FLAVOR, nodes)
    assert why == (
        "ResourcesDoNotFit: memory 64Ti per rank exceeds every H100-80GB node (largest 512Gi)"
    )
    assert never_fits(PodNeeds(memory=300 * GI), FLAVOR, nodes) is None
    assert never_fits(PodNeeds(memory=300 * GI), FLAVOR, []) is None
    assert format_bytes(1536 * 2**20) == "1536Mi"
    t = Topology.build(nodes)
    request = dataclasses.replace(run(), pod=PodNeeds(cpu=65_000))
    assert str(resources_refusal(request, t)).startswith("ResourcesDoNotFit: cpu 65 per rank")


# --------------------------------------------------------------------------- topology


def test_foreign_pods_take_gpus_jobtree_pods_only_their_other_resources() -> None:
    t = Topology.build([sized(node("n1")), sized(node("n2"))])
    t = t.with_pods([("ns/notebook", "n1", (8, 1000, GI, 0)), ("ns/rank", "n2", (0, 2000, GI, 0))])
    assert (t.free("n1"), t.free("n2")) == (0, 8)
    assert t.load("n1") == Load(gpus=8, cpu=1000, memory=GI, ephemeral=0, pods=1)
    assert t.load("n2").pods == 1 and t.load("n2").gpus == 0
    assert t.domains(FLAVOR)[("us-west", "gpu-a", "nv-a")] == 8
    t = t.with_pods([("ns/notebook", "n1", None)])
    assert t.free("n1") == 8 and t.load("n1") == NO_LOAD
    assert t.pod_count() == 1


def test_pods_seen_before_their_node_are_counted_when_it_appears() -> None:
    t = Topology.empty().with_pods([("ns/p", "late", (4, 0, 0, 0))])
    assert t.load("late").gpus == 4
    t = t.with_node(node("late"))
    assert t.free("late") == 4
    t = t.without_node("late")
    assert t.load("late").gpus == 4, "kept while the node is gone"


def test_fill_keeps_the_pods_load_without_counting_their_gpus_twice() -> None:
    n = sized(node("n1"))
    spare = dataclasses.replace(lease("n1", 4, run_key=("o", "spares")), role=Role.SPARE)
    t = Topology.build([n], [spare], [("ns/x", "n1", (4, 1000, 0, 0))])
    room = fill_topology(t, [spare], ("ns", "fill"))
    assert room.free("n1") == 4 and room.load("n1").cpu == 1000


# --------------------------------------------------------------------------- pack


def test_pack_skips_nodes_full_of_other_pods() -> None:
    nodes = [sized(n) for n in domain_nodes("gpu-a", "nv-a", 2)]
    t = Topology.build(nodes, pods=[("ns/agent", "nv-a-01", (8, 0, 0, 0))])
    p = placed(pack(run(total=8), t, funding()))
    assert [s.node for s in p.slices] == ["nv-a-02"]
    no = pack(run(total=16, group=16), t, funding())
    assert isinstance(no, NoFit) and no.reason is PackFailure.NO_CAPACITY


def test_pack_honours_taints_unless_the_template_tolerates_them() -> None:
    taint = (Taint("maintenance", "", "NoSchedule"),)
    nodes = [sized(node("n1"), taints=taint), sized(node("n2"))]
    t = Topology.build(nodes)
    assert [s.node for s in placed(pack(run(total=8), t, funding())).slices] == ["n2"]
    assert isinstance(pack(run(total=16, group=8), t, funding()), NoFit)
    tolerant = dataclasses.replace(
        run(total=16, group=8), pod=PodNeeds(tolerations=(Toleration("maintenance", "Exists"),))
    )
    assert sorted(s.node for s in placed(pack(tolerant, t, funding())).slices) == ["n1", "n2"]


def test_prefer_no_schedule_nodes_are_the_last_choice() -> None:
    soft = (Taint("spot", "", "PreferNoSchedule"),)
    nodes = [sized(node("a1"), taints=soft), sized(node("a2"))]
    t = Topology.build(nodes)
    assert [s.node for s in placed(pack(run(total=8), t, funding())).slices] == ["a2"]
    assert sorted(s.node for s in placed(pack(run(total=16), t, funding())).slices) == [
        "a1",
        "a2",
    ]


def test_a_template_that_fits_only_some_nodes_goes_there() -> None:
    small = sized(node("n1"), dataclasses.replace(BIG, memory=256 * GI))
    big = sized(node("n2"))
    t = Topology.build([small, big])
    roomy = dataclasses.replace(run(total=8), pod=PodNeeds(memory=300 * GI))
    assert [s.node for s in placed(pack(roomy, t, funding())).slices] == ["n2"]
    picky = dataclasses.replace(run(total=8), pod=PodNeeds(node_selector={"kubernetes.io/x": "y"}))
    assert isinstance(pack(picky, t, funding()), NoFit)


def test_ranks_sharing_a_node_each_need_room_for_their_pod() -> None:
    # Groups of 4 on one 8-GPU node: two ranks, but memory for only one of them.
    n = sized(node("n1"), dataclasses.replace(BIG, memory=100 * GI))
    t = Topology.build([n])
    one_each = dataclasses.replace(run(total=8, group=4), pod=PodNeeds(memory=60 * GI))
    assert isinstance(pack(one_each, t, funding()), NoFit)
    two_fit = dataclasses.replace(one_each, pod=PodNeeds(memory=50 * GI))
    assert len(placed(pack(two_fit, t, funding())).groups) == 2


@pytest.mark.parametrize("busy", [Load(cpu=60_000, pods=1), Load(memory=500 * GI, pods=1)])
def test_cpu_or_memory_held_by_other_pods_keep_ranks_off(busy: Load) -> None:
    nodes = [sized(n) for n in domain_nodes("gpu-a", "nv-a", 2)]
    use = (0, busy.cpu, busy.memory, 0)
    t = Topology.build(nodes, pods=[("ns/hog", "nv-a-01", use)])
    ask = dataclasses.replace(run(total=8), pod=PodNeeds(cpu=8000, memory=64 * GI))
    assert [s.node for s in placed(pack(ask, t, funding())).slices] == ["nv-a-02"]
    both = dataclasses.replace(ask, total_gpus=16, group_gpus=16)
    assert isinstance(pack(both, t, funding()), NoFit)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 8),  # GPUs other pods hold
            st.integers(0, 64),  # CPUs other pods request
            st.booleans(),  # tainted
            st.sampled_from((64, 128, 512)),  # memory Gi
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 4),
    st.sampled_from((0, 8, 32)),
    st.sampled_from((0, 64, 200)),
    st.booleans(),
)
def test_pack_never_places_a_rank_a_kubelet_would_refuse(
    shape: list[tuple[int, int, bool, int]], groups: int, cpu: int, memory: int, tolerate: bool
) -> None:
    nodes, pods = [], []
    for i, (gpus, cpus, tainted, mem) in enumerate(shape):
        capacity = NodeCapacity(cpu=64_000, memory=mem * GI, ephemeral=0, pods=110)
        taints = (Taint("maintenance", "", "NoSchedule"),) if tainted else ()
        name = f"n{i:02d}"
        nodes.append(sized(node(name, fabric=f"f{i % 3}"), capacity, taints))
        pods.append((f"ns/p{i}", name, (gpus, cpus * 1000, 0, 0)))
    t = Topology.build(nodes, pods=pods)
    tolerations = (Toleration("maintenance", "Exists"),) if tolerate else ()
    needs = PodNeeds(cpu=cpu * 1000, memory=memory * GI, tolerations=tolerations)
    request = dataclasses.replace(run(total=4 * groups, group=4), pod=needs)
    result = pack(request, t, funding())
    if isinstance(result, NoFit):
        return
    ranks: dict[str, int] = {}
    for s in result.slices:
        ranks[s.node] = ranks.get(s.node, 0) + 1
    for name, count in ranks.items():
        n = t.node(name)
        assert n is not None
        assert exclusion(n, t.load(name), needs) is None, name
        assert count <= slots(n.capacity, t.load(name), needs), (name, count)
    for name, gpus in result.by_node().items():
        assert gpus <= t.free(name), name
