"""Fake GPU nodes for KWOK, labelled with the topology keys Jobtree packs by.

They carry no taint: the local control plane runs nothing but KWOK, so there is no real workload
to keep off them, and Jobtree's pods carry only their template's tolerations (a test that wants a
tainted node taints one itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"


def node_manifest(
    name: str, labels: Mapping[str, str], *, gpus: int = 8, resource: str = "nvidia.com/gpu"
) -> dict[str, Any]:
    """One KWOK-managed node advertising ``gpus`` allocatable GPUs."""
    capacity = {
        "cpu": "64",
        "memory": "512Gi",
        "ephemeral-storage": "1Ti",
        "pods": "110",
        resource: str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, **labels},
        },
        "status": {"allocatable": capacity, "capacity": capacity},
    }


def fleet_manifest(
    prefix: str,
    count: int,
    labels: Mapping[str, str],
    *,
    gpus: int = 8,
    resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    """``count`` nodes named ``<prefix>-01`` … as one v1 List."""
    items = [
        node_manifest(f"{prefix}-{i:02d}", labels, gpus=gpus, resource=resource)
        for i in range(1, count + 1)
    ]
    return {"apiVersion": "v1", "kind": "List", "items": items}


SEED_FLEET = (
    (
        "gpu-a",
        {
            "region": "us-west",
            "cluster": "gpu-a",
            "fabric.domain": "nv-a",
            "rack": "r01",
            "gpu.flavor": "H100-80GB",
        },
    ),
    (
        "gpu-b",
        {
            "region": "us-west",
            "cluster": "gpu-b",
            "fabric.domain": "nv-b",
            "rack": "r09",
            "gpu.flavor": "H100-80GB",
        },
    ),
)
"""The administrator guide's two 16-node groups and their labels."""
