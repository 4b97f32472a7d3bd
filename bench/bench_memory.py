"""Resident memory of an engine snapshot: 10,000 nodes and 100,000 open leases (target ≤ 200 MB).

Measured in a fresh interpreter as the growth of RSS from before building to after, with the
interpreter's own baseline (imports done, nothing built) reported beside it.
"""

from __future__ import annotations

import gc
import json
from datetime import UTC, datetime, timedelta

from bench.common import load, machine
from shared.engine.accounting import usage_from_ledger
from shared.engine.model import FundingKind, Lease, Node, Role
from shared.engine.topology import Topology, node_from_labels

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def build() -> tuple[Topology, object]:
    nodes: list[Node] = []
    for i in range(10_000):
        labels = {
            "region": "us-west",
            "cluster": f"c{i // 1000}",
            "fabric.domain": f"f{i // 16}",
            "rack": f"r{i // 4}",
            "gpu.flavor": "H100-80GB",
        }
        built = node_from_labels(f"node-{i:05d}", labels, {"nvidia.com/gpu": "8"})
        assert isinstance(built, Node)
        nodes.append(built)
    leases = [
        Lease(
            name=f"lease-{j:06d}",
            run=("ns", f"run-{j // 8}"),
            owner=f"org:ai:t{j % 40}",
            node=nodes[j // 10].name,
            gpus=1,
            role=Role.ACTIVE,
            group=j % 8,
            rank=j % 8,
            envelope=f"t{j % 40}/west",
            payer_owner=f"org:ai:t{j % 40}",
            funding=FundingKind.OWNED,
            start=T0,
            expected_end=T0 + timedelta(hours=j % 100 + 1),
        )
        for j in range(100_000)
    ]
    topology = Topology.build(nodes, leases)
    usage = usage_from_ledger(leases, now=T0 + timedelta(minutes=5))
    return topology, (leases, usage)


def main() -> None:
    gc.collect()
    before = rss_mb()
    snapshot = build()
    gc.collect()
    after = rss_mb()
    topology, _ = snapshot
    print(
        json.dumps(
            {
                "figure": "engine_snapshot_memory_10k_nodes_100k_leases",
                "rss_growth_mb": round(after - before, 1),
                "interpreter_baseline_mb": round(before, 1),
                "target_mb": 200,
                "nodes": len(topology),
                "open_leases": 100_000,
                "machine": machine(),
                "load": load(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
