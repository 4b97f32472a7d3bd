"""The topology snapshot build as it was before pods were counted: the in-run baseline of
``topology_build_10k_nodes`` in ``bench_pack`` (issue: the build is paid at every service start
and relist, so it is measured against the code it replaced on the same machine, in the same run).

It reproduces only the old algorithm's work (per-cell dict comprehensions and read-only views)
on the engine's node and lease records; nothing in the product calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from shared.engine.model import DomainKey, Lease, Node
from shared.engine.topology import Held, node_free, occupancy


def _cell(nodes: Mapping[str, Node], leases: Mapping[str, Mapping[str, Held]]) -> dict[str, Any]:
    used = {name: occupancy(held.values()) if (held := leases.get(name)) else 0 for name in nodes}
    ordered = tuple(nodes[name] for name in sorted(nodes))
    free_by_node = {n.name: node_free(n, used[n.name]) for n in ordered}
    kept = {k: MappingProxyType(dict(v)) for k, v in leases.items() if v and k in nodes}
    return {
        "nodes": MappingProxyType(dict(nodes)),
        "leases": MappingProxyType(kept),
        "used": MappingProxyType(used),
        "ordered": ordered,
        "free_by_node": MappingProxyType(free_by_node),
        "free": sum(free_by_node.values()),
    }


def legacy_build(nodes: Iterable[Node], leases: Iterable[Lease] = ()) -> dict[str, Any]:
    """The old ``Topology.build``: same inputs, same index, as plain dicts."""
    by_name: dict[str, Node] = {}
    for node in nodes:
        by_name[node.name] = node
    lease_map: dict[str, dict[str, Held]] = {}
    for lease in leases:
        if lease.open:
            lease_map.setdefault(lease.node, {})[lease.name] = (lease.gpus, lease.role)
    cells: dict[str, dict[DomainKey, dict[str, Node]]] = {}
    where: dict[str, tuple[str, DomainKey]] = {}
    for name, node in by_name.items():
        cells.setdefault(node.flavor, {}).setdefault(node.domain, {})[name] = node
        where[name] = (node.flavor, node.domain)
    index: dict[str, Mapping[DomainKey, dict[str, Any]]] = {}
    free: dict[str, Mapping[DomainKey, int]] = {}
    for flavor, domains in cells.items():
        built = {
            dom: _cell(members, {n: lease_map[n] for n in members if n in lease_map})
            for dom, members in domains.items()
        }
        index[flavor] = built
        free[flavor] = MappingProxyType({dom: cell["free"] for dom, cell in built.items()})
    return {"where": where, "index": index, "free": free}
