"""The packer's Prometheus metrics (process-wide)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from shared.engine.fleet import FleetCell

PLANS = Counter(
    "jobtree_packer_plans_total",
    "PLAN requests answered, by result: fit, or the NoFit reason (NoCapacity, …).",
    ["result"],
)

PLAN_SECONDS = Histogram(
    "jobtree_packer_plan_seconds",
    "Time to answer one PLAN (snapshot, claim protection and pack).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

NODE_FAILURES = Counter(
    "jobtree_node_failures_total",
    "Node failure episodes under open leases announced as NODE_FAILED, by reason "
    "(NodeDeleted, NotReady).",
    ["reason"],
)

NODES_MISSING_LABELS = Gauge(
    "jobtree_nodes_missing_labels",
    "Nodes ignored because they lack a required topology label (region, cluster, "
    "fabric.domain, gpu.flavor).",
)

TOPOLOGY_NODES = Gauge(
    "jobtree_packer_topology_nodes",
    "Labelled GPU nodes in the packer's topology view.",
)

FLEET_ALLOCATABLE = Gauge(
    "jobtree_fleet_allocatable_gpus",
    "Allocatable GPUs of the labelled nodes per flavor and domain (region, cluster, domain).",
    ["flavor", "region", "cluster", "domain"],
)

FLEET_ALLOCATED = Gauge(
    "jobtree_fleet_allocated_gpus",
    "GPUs held by open leases per flavor and domain; divide by jobtree_fleet_allocatable_gpus "
    "for the fleet's utilisation.",
    ["flavor", "region", "cluster", "domain"],
)

FleetLabels = tuple[str, str, str, str]


def export_fleet(cells: Iterable[FleetCell], previous: set[FleetLabels]) -> set[FleetLabels]:
    """Set both fleet gauges from the snapshot's cells and drop the series of cells that are
    gone (a domain whose last node left); returns the label sets now exported."""
    current: set[FleetLabels] = set()
    for cell in cells:
        labels = (cell.flavor, *cell.domain)
        FLEET_ALLOCATABLE.labels(*labels).set(cell.allocatable)
        FLEET_ALLOCATED.labels(*labels).set(cell.allocated)
        current.add(labels)
    for labels in previous - current:
        FLEET_ALLOCATABLE.remove(*labels)
        FLEET_ALLOCATED.remove(*labels)
    return current
