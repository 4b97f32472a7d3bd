"""Topology snapshot: label translation, usage by lease, per-domain free index, cheap updates."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.model import Node
from shared.engine.topology import (
    MissingLabels,
    Topology,
    node_from_labels,
    parse_gpu_quantity,
)

from .fleet import FLAVOR, T0, dom, domain_nodes, labels, lease, node, topo

# --------------------------------------------------------------------------- node_from_labels


def test_node_from_labels_builds_domain_flavor_and_capacity() -> None:
    built = node_from_labels(
        "gpu-a-01", labels(rack="r01"), {"nvidia.com/gpu": "8", "cpu": "96"}, cordoned=True
    )
    assert isinstance(built, Node)
    assert built.domain == ("us-west", "gpu-a", "nv-a")
    assert built.flavor == FLAVOR
    assert built.gpus == 8
    assert built.labels["rack"] == "r01"
    assert built.cordoned and not built.schedulable


def test_node_from_labels_names_missing_and_empty_labels() -> None:
    lbl = labels()
    del lbl["fabric.domain"]
    lbl["gpu.flavor"] = ""
    result = node_from_labels("bad-01", lbl, {"nvidia.com/gpu": "8"})
    assert result == MissingLabels(node="bad-01", missing=("fabric.domain", "gpu.flavor"))
    assert "fabric.domain" in result.message and "bad-01" in result.message


def test_rack_is_optional() -> None:
    assert isinstance(node_from_labels("n", labels(), {"nvidia.com/gpu": "4"}), Node)


def test_configurable_gpu_resource_and_absent_resource() -> None:
    amd = node_from_labels("mi-01", labels(), {"amd.com/gpu": "8"}, resource="amd.com/gpu")
    none = node_from_labels("mi-02", labels(), {"amd.com/gpu": "8"})
    assert isinstance(amd, Node) and amd.gpus == 8
    assert isinstance(none, Node) and none.gpus == 0


@pytest.mark.parametrize(
    ("value", "gpus"),
    [("8", 8), (" 4 ", 4), ("8000m", 8), ("1k", 1000), ("2.5", 2), ("-1", 0), ("x", 0), ("", 0)],
)
def test_parse_gpu_quantity(value: str, gpus: int) -> None:
    assert parse_gpu_quantity(value) == gpus


# --------------------------------------------------------------------------- snapshot queries


def test_build_counts_open_leases_and_free_per_domain() -> None:
    nodes = domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 1)
    t = topo(nodes, [lease("nv-a-01", 6), lease("nv-a-01", 1, name="x"), lease("nv-b-01", 8)])
    assert len(t) == 3
    assert t.used("nv-a-01") == 7 and t.free("nv-a-01") == 1
    assert t.free("nv-b-01") == 0
    assert t.domains(FLAVOR) == {dom("gpu-a", "nv-a"): 9, dom("gpu-b", "nv-b"): 0}
    assert [n.name for n in t.nodes_in(FLAVOR, dom("gpu-a", "nv-a"))] == ["nv-a-01", "nv-a-02"]
    assert t.domains("B200") == {}
    assert t.nodes_in("B200", dom()) == ()


def test_closed_leases_do_not_count() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 1), [lease("nv-a-01", 8, end=T0)])
    assert t.used("nv-a-01") == 0 and t.free("nv-a-01") == 8


def test_cordoned_keeps_usage_but_offers_nothing_and_not_ready_offers_nothing() -> None:
    t = topo(
        [node("c-01", cordoned=True), node("d-01", ready=False), node("ok-01")],
        [lease("c-01", 2)],
    )
    assert t.used("c-01") == 2
    assert t.free("c-01") == 0 and t.free("d-01") == 0 and t.free("ok-01") == 8
    assert t.domains(FLAVOR) == {dom(): 8}


def test_overcommitted_node_has_zero_free_not_negative() -> None:
    t = topo([node("n-01", gpus=4)], [lease("n-01", 8)])
    assert t.used("n-01") == 8 and t.free("n-01") == 0
    assert t.domains(FLAVOR)[dom()] == 0


def test_unknown_node_queries() -> None:
    t = topo([node("n-01")])
    assert t.node("ghost") is None
    assert t.free("ghost") == 0 and t.used("ghost") == 0
    assert "n-01" in t and "ghost" not in t


# --------------------------------------------------------------------------- updates


def test_with_lease_is_idempotent_and_closed_lease_releases() -> None:
    t = topo([node("n-01")])
    held = lease("n-01", 4, name="l1")
    t1 = t.with_lease(held).with_lease(held)
    assert t1.used("n-01") == 4
    assert t1.with_lease(replace(held, end=T0)).used("n-01") == 0
    assert t1.without_lease(held).used("n-01") == 0
    assert t.used("n-01") == 0, "updates never mutate the original snapshot"


def test_lease_seen_before_its_node_counts_once_node_appears() -> None:
    t = topo([]).with_lease(lease("late-01", 3))
    assert t.used("late-01") == 3 and t.orphan_usage() == {"late-01": 3}
    t = t.with_node(node("late-01"))
    assert t.free("late-01") == 5 and t.orphan_usage() == {}


def test_in_use_lists_nodes_under_open_leases_including_unknown_ones() -> None:
    t = topo([node("n-01"), node("n-02"), node("n-03")], [lease("n-01", 8), lease("n-02", 2)])
    t = t.with_lease(lease("gone-01", 4, name="orphan"))
    assert t.in_use() == {"n-01", "n-02", "gone-01"}
    assert t.in_use() == {n.name for n in t if t.used(n.name) > 0} | set(t.orphan_usage())


def test_without_node_remembers_usage_and_restores_it() -> None:
    t = topo([node("n-01"), node("n-02")], [lease("n-01", 8)])
    gone = t.without_node("n-01")
    assert len(gone) == 1 and gone.node("n-01") is None
    assert gone.domains(FLAVOR) == {dom(): 8}
    assert gone.with_node(node("n-01")).used("n-01") == 8
    assert gone.without_node("n-01") is gone


def test_with_node_relabel_moves_node_and_its_leases() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2), [lease("nv-a-01", 2)])
    moved = t.with_node(node("nv-a-01", cluster="gpu-b", fabric="nv-b"))
    assert moved.domains(FLAVOR) == {dom("gpu-a", "nv-a"): 8, dom("gpu-b", "nv-b"): 6}
    assert moved.domain_of("nv-a-01") == dom("gpu-b", "nv-b")
    assert t.domain_of("nv-a-01") == dom("gpu-a", "nv-a")


def test_last_node_leaving_drops_domain_and_flavor() -> None:
    t = topo([node("n-01", flavor="B200")])
    assert t.flavors() == ("B200",)
    empty = t.without_node("n-01")
    assert empty.flavors() == () and empty.domains("B200") == {}


def test_updates_share_untouched_domains() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2) + domain_nodes("gpu-b", "nv-b", 2))
    t2 = t.with_lease(lease("nv-a-01", 4)).with_node(node("nv-a-03", fabric="nv-a"))
    assert t2.nodes_in(FLAVOR, dom("gpu-b", "nv-b")) is t.nodes_in(FLAVOR, dom("gpu-b", "nv-b"))


def test_with_leases_batch_equals_one_by_one() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 3))
    ls = [lease(f"nv-a-0{i}", i, name=f"l{i}") for i in (1, 2, 3)]
    one_by_one = t
    for item in ls:
        one_by_one = one_by_one.with_lease(item)
    batch = t.with_leases(ls)
    assert batch.domains(FLAVOR) == one_by_one.domains(FLAVOR)
    assert batch.without_leases(ls).domains(FLAVOR) == t.domains(FLAVOR)


def test_iteration_is_sorted_by_flavor_domain_name() -> None:
    t = topo([node("z", cluster="b"), node("a", cluster="b"), node("m", cluster="a")])
    assert [n.name for n in t] == ["m", "a", "z"]


# --------------------------------------------------------------------------- property

NODE_NAMES = [f"n{i}" for i in range(6)]
_node_st = st.builds(
    lambda name, fabric, flavor, gpus, ready, cordoned: node(
        name, fabric=fabric, flavor=flavor, gpus=gpus, ready=ready, cordoned=cordoned
    ),
    st.sampled_from(NODE_NAMES),
    st.sampled_from(["nv-a", "nv-b"]),
    st.sampled_from([FLAVOR, "B200"]),
    st.sampled_from([0, 4, 8]),
    st.booleans(),
    st.booleans(),
)
_lease_st = st.builds(
    lambda n, g, k, closed: lease(n, g, name=f"l{k}-{n}", end=T0 if closed else None),
    st.sampled_from(NODE_NAMES),
    st.integers(1, 8),
    st.integers(0, 5),
    st.booleans(),
)
_op_st = st.one_of(
    st.tuples(st.just("node"), _node_st),
    st.tuples(st.just("drop"), st.sampled_from(NODE_NAMES)),
    st.tuples(st.just("lease"), _lease_st),
    st.tuples(st.just("unlease"), _lease_st),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_op_st, max_size=25))
def test_incremental_updates_equal_a_fresh_build(ops: list[tuple[str, object]]) -> None:
    """Any sequence of updates gives the same view as building from the final state."""
    t = Topology.empty()
    nodes: dict[str, Node] = {}
    leases: dict[str, object] = {}
    for kind, arg in ops:
        if kind == "node":
            assert isinstance(arg, Node)
            t, nodes[arg.name] = t.with_node(arg), arg
        elif kind == "drop":
            assert isinstance(arg, str)
            t = t.without_node(arg)
            nodes.pop(arg, None)
        elif kind == "lease":
            t = t.with_lease(arg)  # type: ignore[arg-type]
            if arg.open:  # type: ignore[attr-defined]
                leases[arg.name] = arg  # type: ignore[attr-defined]
            else:
                leases.pop(arg.name, None)  # type: ignore[attr-defined]
        else:
            t = t.without_lease(arg)  # type: ignore[arg-type]
            leases.pop(arg.name, None)  # type: ignore[attr-defined]
    fresh = Topology.build(nodes.values(), leases.values())  # type: ignore[arg-type]
    assert len(t) == len(fresh)
    assert list(t) == list(fresh)
    for flavor in (FLAVOR, "B200"):
        assert dict(t.domains(flavor)) == dict(fresh.domains(flavor))
        assert sum(t.domains(flavor).values()) >= 0
    for name in NODE_NAMES:
        assert t.used(name) == fresh.used(name)
        assert t.free(name) == fresh.free(name)
        assert t.free(name) >= 0
