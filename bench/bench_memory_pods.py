"""Resident memory of the packer's pod view: 10,000 nodes and 100,000 other pods bound to them.

What a service cache holds for pods is the informer's slim copies (``translate.slim_pod``: name,
namespace, uid, resourceVersion and counted requests) and the topology's per-node pod maps.
Measured in a fresh interpreter as the RSS growth from before building to after, each pod
generated as a realistic full object (labels, owner reference, two containers with env and
mounts, conditions) and reduced one at a time, as the watch delivers them.
``full_pods_per_1000_mb`` is the growth of keeping 1,000 whole objects instead, for scale.
"""

from __future__ import annotations

import gc
import json
from typing import Any

from bench.bench_memory import rss_mb
from bench.common import machine
from shared.engine.model import Node, NodeCapacity
from shared.engine.topology import PodChange, Topology, node_from_labels
from shared.kube.resources import object_key
from shared.kube.translate import slim_pod, slim_usage

NODES = 10_000
PODS = 100_000
CAPACITY = NodeCapacity(cpu=192_000, memory=2048 * 2**30, ephemeral=4096 * 2**30, pods=110)


def full_pod(i: int) -> dict[str, Any]:
    """A pod as the API server lists it (managedFields already dropped by the informer)."""
    container = {
        "name": "main",
        "image": "registry.example.com/team/app:1.2.3",
        "env": [{"name": f"VAR_{k}", "value": f"value-{k}"} for k in range(6)],
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"agent-{i:06d}",
            "namespace": f"team-{i % 50}",
            "uid": f"00000000-0000-0000-0000-{i:012d}",
            "resourceVersion": str(100_000 + i),
            "labels": {"app": "agent", "pod-template-hash": "5d8f7c9b6d"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "d-1"}
            ],
        },
        "spec": {
            "nodeName": f"node-{i % NODES:05d}",
            "containers": [container, {**container, "name": "sidecar"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "tolerations": [{"operator": "Exists"}],
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": t, "status": "True"} for t in ("Ready", "Initialized")],
            "podIP": "10.0.0.1",
        },
    }


def nodes() -> list[Node]:
    out = []
    for i in range(NODES):
        labels = {
            "region": "us-west",
            "cluster": f"c{i // 1000}",
            "fabric.domain": f"f{i // 16}",
            "gpu.flavor": "H100-80GB",
        }
        built = node_from_labels(
            f"node-{i:05d}", labels, {"nvidia.com/gpu": "8"}, capacity=CAPACITY
        )
        assert isinstance(built, Node)
        out.append(built)
    return out


def main() -> None:
    fleet = nodes()
    gc.collect()
    before = rss_mb()
    items: dict[str, dict[str, Any]] = {}
    for i in range(PODS):
        slim = slim_pod(full_pod(i))
        items[object_key(slim)] = slim
    changes: list[PodChange] = []
    for key, slim in items.items():
        used = slim_usage(slim)
        assert used is not None
        changes.append((key, used[0], used[1]))
    topology = Topology.build(fleet, (), changes)
    del changes
    gc.collect()
    after = rss_mb()
    whole = [full_pod(i) for i in range(1000)]
    gc.collect()
    full = rss_mb() - after
    print(
        json.dumps(
            {
                "figure": "packer_pod_view_memory_10k_nodes_100k_pods",
                "rss_growth_mb": round(after - before, 1),
                "full_pods_per_1000_mb": round(full, 1),
                "interpreter_baseline_mb": round(before, 1),
                "nodes": len(topology),
                "pods": topology.pod_count(),
                "machine": machine(),
            }
        ),
        flush=True,
    )
    assert len(whole) == 1000 and len(items) == PODS


if __name__ == "__main__":
    main()
