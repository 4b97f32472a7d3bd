"""The Kubernetes resources Jobtree reads and writes, and how their REST paths are spelled.

Services talk to the API server with raw REST calls (list, watch, server-side apply) on plain
dicts, so one small table of group/version/plural replaces the generated typed clients and keeps
the Jobtree CRDs and the core kinds on exactly the same code path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.api import GROUP, VERSION


@dataclass(frozen=True, slots=True)
class Resource:
    """One served resource: where it lives in the REST tree and whether it is namespaced."""

    group: str
    """API group; ``""`` for the core group (``/api/v1``)."""
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        """The ``apiVersion`` of its objects: ``v1`` or ``<group>/<version>``."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        """REST path of the collection, one object, or one object's subresource.

        A namespaced resource without a namespace is the all-namespaces collection; naming an
        object then, or passing a namespace for a cluster-scoped resource, is a caller bug.
        """
        if namespace is not None and not self.namespaced:
            raise ValueError(f"{self.plural} are cluster-scoped: no namespace expected")
        if name is None and subresource is not None:
            raise ValueError("a subresource needs an object name")
        if self.namespaced and namespace is None and name is not None:
            raise ValueError(f"{self.plural} are namespaced: {name!r} needs a namespace")
        parts = ["/api", self.version] if not self.group else ["/apis", self.group, self.version]
        if namespace is not None:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
PODS = Resource("", "v1", "pods", "Pod", namespaced=True)
SERVICES = Resource("", "v1", "services", "Service", namespaced=True)
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", namespaced=True)
EVENTS = Resource("", "v1", "events", "Event", namespaced=True)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
COORDINATION_LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)
RUNS = Resource(GROUP, VERSION, "runs", "Run", namespaced=True)
BUDGETS = Resource(GROUP, VERSION, "budgets", "Budget", namespaced=False)
RESERVATIONS = Resource(GROUP, VERSION, "reservations", "Reservation", namespaced=True)
GPU_LEASES = Resource(GROUP, VERSION, "leases", "Lease", namespaced=False)
"""The Jobtree ledger kind (``leases.rq.davidlangworthy.io``), not the coordination Lease."""


def object_key(obj: Mapping[str, Any]) -> str:
    """Cache key of an object: ``namespace/name``, or ``name`` when it has no namespace.

    Raises ValueError for an object without a name: it cannot be tracked.
    """
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("object has no metadata.name")
    namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
    return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name
