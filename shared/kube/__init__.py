"""Kubernetes plumbing shared by the services: client, resources, informers, cache, writes.

Everything here is the imperative shell around the pure engine: ``translate`` is the only module
that interprets object fields, and it is pure; the rest moves dicts to and from the API server.
"""

from shared.kube.client import KubeError, make_client
from shared.kube.resources import (
    BUDGETS,
    COORDINATION_LEASES,
    EVENTS,
    GPU_LEASES,
    NAMESPACES,
    NODES,
    PODS,
    RESERVATIONS,
    RUNS,
    SERVICES,
    Resource,
    object_key,
)

__all__ = [
    "BUDGETS",
    "COORDINATION_LEASES",
    "EVENTS",
    "GPU_LEASES",
    "NAMESPACES",
    "NODES",
    "PODS",
    "RESERVATIONS",
    "RUNS",
    "SERVICES",
    "KubeError",
    "Resource",
    "make_client",
    "object_key",
]
