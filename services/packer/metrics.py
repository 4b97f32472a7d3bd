"""The packer's Prometheus metrics (process-wide)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
