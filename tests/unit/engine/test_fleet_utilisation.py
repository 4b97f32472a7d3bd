"""Fleet utilisation per (flavor, domain): allocatable GPUs and what open leases hold."""

from __future__ import annotations

from dataclasses import replace

from shared.engine.fleet import FleetCell, fleet_cells
from shared.engine.model import Role

from .fleet import FLAVOR, T0, dom, domain_nodes, lease, node, topo


def test_cells_sum_allocatable_and_held_gpus_per_domain() -> None:
    nodes = [
        *domain_nodes("gpu-a", "nv-a", 2),
        *domain_nodes("gpu-b", "nv-b", 1),
        node("h-01", flavor="B200", gpus=4),
    ]
    leases = [
        lease("nv-a-01", 6),
        replace(lease("nv-a-02", 2, name="spare"), role=Role.SPARE),
        lease("nv-b-01", 8, end=T0),  # closed: holds nothing
        lease("h-01", 4),
    ]
    cells = fleet_cells(topo(nodes, leases))
    assert cells == (
        FleetCell("B200", dom(), 4, 4),
        FleetCell(FLAVOR, dom("gpu-a", "nv-a"), 16, 8),
        FleetCell(FLAVOR, dom("gpu-b", "nv-b"), 8, 0),
    )


def test_unschedulable_nodes_keep_their_gpus_and_usage_and_overbooking_is_capped() -> None:
    nodes = [node("c-01", cordoned=True), node("d-01", ready=False), node("o-01", gpus=4)]
    cells = fleet_cells(topo(nodes, [lease("c-01", 3), lease("o-01", 8)]))
    assert cells == (FleetCell(FLAVOR, dom(), 20, 7),)


def test_an_empty_fleet_has_no_cells() -> None:
    assert fleet_cells(topo([], [])) == ()


def test_gpus_of_pods_jobtree_did_not_create_count_as_in_use() -> None:
    t = topo(domain_nodes("gpu-a", "nv-a", 2), [lease("nv-a-01", 2)])
    t = t.with_pods([("notebooks/jupyter", "nv-a-02", (4, 1000, 2**30, 0))])
    assert fleet_cells(t) == (FleetCell(FLAVOR, dom("gpu-a", "nv-a"), 16, 6),)
