"""The fleet as pack sees it: labelled GPU nodes, GPUs held by open leases, per-domain free index.

SPEC §1: a node belongs to exactly one flavor and one domain (region, cluster, fabric.domain), and
only Ready, uncordoned nodes take new work. Pack runs for every admission, grow and forecast step,
so the snapshot keeps a per-flavor → per-domain index of free GPUs: pack ranks domains from that
index and only looks at the nodes of the few domains it actually uses. The GPUs a node has in use
are its physical occupancy (``occupancy``): opportunistic fill sits inside spare GPUs, so a
``Borrowed`` lease is not counted on top of the spare it fills.

A ``Topology`` is immutable. Every update returns a new snapshot that shares all untouched domains
with the old one, so a watch cache can keep publishing snapshots cheaply and a planner can keep
working on the version it started with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import MappingProxyType

from shared.engine.model import (
    DOMAIN_LABELS,
    FLAVOR_LABEL,
    REQUIRED_LABELS,
    DomainKey,
    Lease,
    Node,
    Role,
)

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

Held = tuple[int, Role]
"""GPUs and role of one open lease: what a node's occupancy is computed from."""

_ACTIVE, _SPARE = Role.ACTIVE, Role.SPARE
_HELD: dict[Held, Held] = {}
"""Interned (GPUs, role) pairs: 100,000 open leases share a handful of tuples."""

_EMPTY: Mapping[str, Held] = MappingProxyType({})
_NO_GPUS: Mapping[str, int] = MappingProxyType({})
_NO_DOMAINS: Mapping[DomainKey, int] = MappingProxyType({})

_QUANTITY = re.compile(r"^([+-]?[0-9]+(?:\.[0-9]*)?|[+-]?\.[0-9]+)([a-zA-Z]*)$")
_SUFFIX: Mapping[str, Decimal] = MappingProxyType(
    {
        "": Decimal(1),
        "m": Decimal("0.001"),
        "k": Decimal(10) ** 3,
        "M": Decimal(10) ** 6,
        "G": Decimal(10) ** 9,
        "T": Decimal(10) ** 12,
        "Ki": Decimal(2) ** 10,
        "Mi": Decimal(2) ** 20,
        "Gi": Decimal(2) ** 30,
    }
)


@dataclass(frozen=True, slots=True)
class MissingLabels:
    """A node that cannot join the topology: the caller emits a warning event/metric for it."""

    node: str
    missing: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"node {self.node} is missing required labels: {', '.join(self.missing)}"


def parse_gpu_quantity(value: str | None) -> int:
    """Whole GPUs in a Kubernetes quantity string; anything unparsable or negative counts as 0.

    Extended resources are integers in practice ("8"), but the API allows any quantity form, and a
    malformed node must never crash the packer.
    """
    if value is None:
        return 0
    match = _QUANTITY.match(value.strip())
    if match is None or match.group(2) not in _SUFFIX:
        return 0
    try:
        amount = Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        return 0
    return max(0, int(amount))


def node_from_labels(
    name: str,
    labels: Mapping[str, str],
    allocatable: Mapping[str, str],
    *,
    resource: str = DEFAULT_GPU_RESOURCE,
    ready: bool = True,
    cordoned: bool = False,
) -> Node | MissingLabels:
    """Translate a Kubernetes node into an engine ``Node``, or say which labels it lacks.

    An empty label value counts as missing: it would silently merge unrelated nodes into one
    domain. GPU capacity is the allocatable extended resource (0 when absent).
    """
    missing = tuple(k for k in REQUIRED_LABELS if not labels.get(k))
    if missing:
        return MissingLabels(node=name, missing=missing)
    region, cluster, fabric = (labels[k] for k in DOMAIN_LABELS)
    return Node(
        name=name,
        flavor=labels[FLAVOR_LABEL],
        domain=(region, cluster, fabric),
        labels=MappingProxyType(dict(labels)),
        gpus=parse_gpu_quantity(allocatable.get(resource)),
        ready=ready,
        cordoned=cordoned,
    )


def _held(lease: Lease) -> Held:
    """The (GPUs, role) a topology remembers for an open lease (one shared tuple per value)."""
    key = (lease.gpus, lease.role)
    return _HELD.setdefault(key, key)


def occupancy(held: Iterable[Held]) -> int:
    """Physical GPUs the leases of one node hold: active + max(spare, borrowed).

    Opportunistic fill (``Borrowed``) lives inside other runs' spare GPUs, so it only takes room of
    its own where it outgrows them.
    """
    active = spare = borrowed = 0
    for gpus, role in held:
        if role is _ACTIVE:
            active += gpus
        elif role is _SPARE:
            spare += gpus
        else:
            borrowed += gpus
    return active + max(spare, borrowed)


def node_free(node: Node, used: int) -> int:
    """GPUs a node can take for new work: none unless schedulable, never negative."""
    if not node.schedulable:
        return 0
    return max(0, node.gpus - used)


@dataclass(frozen=True, slots=True)
class _Domain:
    """One (flavor, domain) cell: its nodes, their open leases and the free GPUs they offer."""

    nodes: Mapping[str, Node]
    leases: Mapping[str, Mapping[str, Held]]
    """Node name → open lease name → (GPUs, role)."""
    used: Mapping[str, int]
    ordered: tuple[Node, ...]
    """Nodes sorted by name: the stable order every consumer iterates in."""
    free_by_node: Mapping[str, int]
    free: int


def _make_domain(nodes: Mapping[str, Node], leases: Mapping[str, Mapping[str, Held]]) -> _Domain:
    used = {name: occupancy(held.values()) if (held := leases.get(name)) else 0 for name in nodes}
    ordered = tuple(nodes[name] for name in sorted(nodes))
    free_by_node = {n.name: node_free(n, used[n.name]) for n in ordered}
    kept = {k: MappingProxyType(dict(v)) for k, v in leases.items() if v and k in nodes}
    return _Domain(
        nodes=MappingProxyType(dict(nodes)),
        leases=MappingProxyType(kept),
        used=MappingProxyType(used),
        ordered=ordered,
        free_by_node=MappingProxyType(free_by_node),
        free=sum(free_by_node.values()),
    )


def _update_domain(cell: _Domain, edits: Mapping[str, Mapping[str, Held]]) -> _Domain:
    """``cell`` with the open leases of a few of its nodes replaced (``edits``: node → leases).

    Only the edited nodes are recounted; everything else is shared with ``cell``, so applying a
    bind costs what it touches, not the size of the domain.
    """
    leases = dict(cell.leases)
    used = dict(cell.used)
    free_by_node = dict(cell.free_by_node)
    free = cell.free
    for name, held in edits.items():
        if held:
            leases[name] = MappingProxyType(dict(held))
        else:
            leases.pop(name, None)
        used[name] = occupancy(held.values())
        before, free_by_node[name] = free_by_node[name], node_free(cell.nodes[name], used[name])
        free += free_by_node[name] - before
    return _Domain(
        nodes=cell.nodes,
        leases=MappingProxyType(leases),
        used=MappingProxyType(used),
        ordered=cell.ordered,
        free_by_node=MappingProxyType(free_by_node),
        free=free,
    )


_Loc = tuple[str, DomainKey]


class Topology:
    """Immutable snapshot of labelled nodes and the GPUs open leases hold on them.

    Leases are tracked by name (a Lease is immutable, so one name always means one node), so
    applying the same lease twice (a replayed watch event) is harmless, and usage on a node that is
    not (or no longer) known is remembered until the node appears or the lease closes.
    """

    __slots__ = ("_count", "_free", "_index", "_orphans", "_where")

    def __init__(
        self,
        where: Mapping[str, _Loc],
        index: Mapping[str, Mapping[DomainKey, _Domain]],
        free: Mapping[str, Mapping[DomainKey, int]],
        orphans: Mapping[str, Mapping[str, Held]],
    ) -> None:
        """Internal: use ``Topology.build`` or ``Topology.empty``."""
        self._where = where
        self._index = index
        self._free = free
        self._orphans = orphans
        self._count = len(where)

    # ----------------------------------------------------------------- construction

    @classmethod
    def empty(cls) -> Topology:
        return cls({}, {}, {}, {})

    @classmethod
    def build(cls, nodes: Iterable[Node], leases: Iterable[Lease] = ()) -> Topology:
        """Snapshot of the given nodes (last one wins on duplicate names) and open leases."""
        by_name: dict[str, Node] = {}
        for node in nodes:
            by_name[node.name] = node
        lease_map: dict[str, dict[str, Held]] = {}
        for lease in leases:
            if lease.open:
                lease_map.setdefault(lease.node, {})[lease.name] = _held(lease)
        cells: dict[str, dict[DomainKey, dict[str, Node]]] = {}
        where: dict[str, _Loc] = {}
        for name, node in by_name.items():
            cells.setdefault(node.flavor, {}).setdefault(node.domain, {})[name] = node
            where[name] = (node.flavor, node.domain)
        index: dict[str, Mapping[DomainKey, _Domain]] = {}
        free: dict[str, Mapping[DomainKey, int]] = {}
        for flavor, domains in cells.items():
            built = {
                dom: _make_domain(members, {n: lease_map[n] for n in members if n in lease_map})
                for dom, members in domains.items()
            }
            index[flavor] = built
            free[flavor] = MappingProxyType({dom: cell.free for dom, cell in built.items()})
        orphans = {n: MappingProxyType(ls) for n, ls in lease_map.items() if n not in where and ls}
        return cls(where, index, free, orphans)

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        return self._count

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[Node]:
        """All nodes, by flavor, then domain, then name."""
        for flavor in sorted(self._index):
            cells = self._index[flavor]
            for dom in sorted(cells):
                yield from cells[dom].ordered

    def _cell_of(self, name: str) -> _Domain | None:
        loc = self._where.get(name)
        if loc is None:
            return None
        return self._index[loc[0]][loc[1]]

    def node(self, name: str) -> Node | None:
        cell = self._cell_of(name)
        return None if cell is None else cell.nodes[name]

    def used(self, name: str) -> int:
        """GPUs held on the node by open leases (also for nodes not in the snapshot)."""
        cell = self._cell_of(name)
        if cell is None:
            return occupancy(self._orphans.get(name, _EMPTY).values())
        return cell.used[name]

    def free(self, name: str) -> int:
        """GPUs the node can take for new work: 0 if unknown or not schedulable."""
        cell = self._cell_of(name)
        return 0 if cell is None else cell.free_by_node[name]

    def leases_on(self, name: str) -> Mapping[str, Held]:
        """Open lease name → (GPUs, role) on the node."""
        cell = self._cell_of(name)
        if cell is None:
            return self._orphans.get(name, _EMPTY)
        return cell.leases.get(name, _EMPTY)

    def flavors(self) -> tuple[str, ...]:
        return tuple(sorted(self._index))

    def domains(self, flavor: str) -> Mapping[DomainKey, int]:
        """Free schedulable GPUs per domain of the flavor (domains with 0 free included)."""
        return self._free.get(flavor, _NO_DOMAINS)

    def nodes_in(self, flavor: str, domain: DomainKey) -> Sequence[Node]:
        """Nodes of the flavor in the domain, sorted by name."""
        cell = self._index.get(flavor, {}).get(domain)
        return () if cell is None else cell.ordered

    def free_in(self, flavor: str, domain: DomainKey) -> Mapping[str, int]:
        """Free GPUs per node of one domain (0 for unschedulable nodes): one lookup for pack."""
        cell = self._index.get(flavor, {}).get(domain)
        return _NO_GPUS if cell is None else cell.free_by_node

    def domain_of(self, name: str) -> DomainKey | None:
        loc = self._where.get(name)
        return None if loc is None else loc[1]

    def in_use(self) -> set[str]:
        """Nodes holding GPUs of open leases, known to this snapshot or not (deleted nodes)."""
        held = {
            name
            for cells in self._index.values()
            for cell in cells.values()
            for name, used in cell.used.items()
            if used > 0
        }
        held.update(name for name, leases in self._orphans.items() if occupancy(leases.values()))
        return held

    def orphan_usage(self) -> Mapping[str, int]:
        """GPUs held by open leases on nodes this snapshot does not know (e.g. deleted nodes)."""
        return MappingProxyType({n: occupancy(ls.values()) for n, ls in self._orphans.items()})

    # ----------------------------------------------------------------- updates

    def _replace_cells(
        self,
        changes: Mapping[_Loc, _Domain | None],
        where: Mapping[str, _Loc] | None = None,
        orphans: Mapping[str, Mapping[str, Held]] | None = None,
    ) -> Topology:
        """New snapshot with some cells replaced (``None`` drops an emptied cell)."""
        index = dict(self._index)
        free = dict(self._free)
        touched: dict[str, tuple[dict[DomainKey, _Domain], dict[DomainKey, int]]] = {}
        for (flavor, dom), cell in changes.items():
            if flavor not in touched:
                touched[flavor] = (dict(index.get(flavor, {})), dict(free.get(flavor, {})))
            cells, frees = touched[flavor]
            if cell is None or not cell.nodes:
                cells.pop(dom, None)
                frees.pop(dom, None)
            else:
                cells[dom] = cell
                frees[dom] = cell.free
        for flavor, (cells, frees) in touched.items():
            if cells:
                index[flavor] = cells
                free[flavor] = MappingProxyType(frees)
            else:
                index.pop(flavor, None)
                free.pop(flavor, None)
        return Topology(
            self._where if where is None else where,
            index,
            free,
            self._orphans if orphans is None else orphans,
        )

    def with_node(self, node: Node) -> Topology:
        """Add or replace a node; its open leases (and any seen before it existed) stay counted."""
        old_loc = self._where.get(node.name)
        new_loc: _Loc = (node.flavor, node.domain)
        changes: dict[_Loc, _Domain | None] = {}
        orphans: Mapping[str, Mapping[str, Held]] | None = None
        if old_loc is None:
            node_leases = self._orphans.get(node.name, _EMPTY)
            if node.name in self._orphans:
                orphans = {k: v for k, v in self._orphans.items() if k != node.name}
        else:
            old = self._index[old_loc[0]][old_loc[1]]
            node_leases = old.leases.get(node.name, _EMPTY)
            if old_loc != new_loc:
                changes[old_loc] = _make_domain(
                    {k: v for k, v in old.nodes.items() if k != node.name},
                    {k: v for k, v in old.leases.items() if k != node.name},
                )
        target = self._index.get(new_loc[0], {}).get(new_loc[1])
        nodes = dict(target.nodes) if target is not None else {}
        leases = dict(target.leases) if target is not None else {}
        nodes[node.name] = node
        if node_leases:
            leases[node.name] = node_leases
        changes[new_loc] = _make_domain(nodes, leases)
        where: Mapping[str, _Loc] | None = None
        if old_loc != new_loc:
            where = dict(self._where)
            where[node.name] = new_loc
        return self._replace_cells(changes, where=where, orphans=orphans)

    def without_node(self, name: str) -> Topology:
        """Drop a node (deleted or lost its labels); its open leases are remembered as orphans."""
        loc = self._where.get(name)
        if loc is None:
            return self
        cell = self._index[loc[0]][loc[1]]
        orphans: Mapping[str, Mapping[str, Held]] | None = None
        if cell.leases.get(name):
            orphans = dict(self._orphans)
            orphans[name] = cell.leases[name]
        changed = _make_domain(
            {k: v for k, v in cell.nodes.items() if k != name},
            {k: v for k, v in cell.leases.items() if k != name},
        )
        where = {k: v for k, v in self._where.items() if k != name}
        return self._replace_cells({loc: changed}, where=where, orphans=orphans)

    def with_lease(self, lease: Lease) -> Topology:
        """Apply a lease's current state: open holds its GPUs, closed releases them."""
        return self.with_leases((lease,))

    def without_lease(self, lease: Lease) -> Topology:
        """Forget a lease's GPUs (it closed or was never committed)."""
        return self._apply(((lease, False),))

    def with_leases(self, leases: Iterable[Lease]) -> Topology:
        """Apply many leases in one step (one rebuild per touched domain), e.g. a whole bind."""
        return self._apply((lease, lease.open) for lease in leases)

    def without_leases(self, leases: Iterable[Lease]) -> Topology:
        return self._apply((lease, False) for lease in leases)

    def _apply(self, changes: Iterable[tuple[Lease, bool]]) -> Topology:
        cell_leases: dict[_Loc, dict[str, dict[str, Held]]] = {}
        orphan_edits: dict[str, dict[str, Held]] = {}
        for lease, hold in changes:
            loc = self._where.get(lease.node)
            if loc is None:
                if lease.node not in orphan_edits:
                    orphan_edits[lease.node] = dict(self._orphans.get(lease.node, _EMPTY))
                current = orphan_edits[lease.node]
            else:
                edits = cell_leases.setdefault(loc, {})
                if lease.node not in edits:
                    cell = self._index[loc[0]][loc[1]]
                    edits[lease.node] = dict(cell.leases.get(lease.node, _EMPTY))
                current = edits[lease.node]
            if hold:
                current[lease.name] = _held(lease)
            else:
                current.pop(lease.name, None)
        if not cell_leases and not orphan_edits:
            return self
        changed: dict[_Loc, _Domain | None] = {}
        for loc, edits in cell_leases.items():
            changed[loc] = _update_domain(self._index[loc[0]][loc[1]], edits)
        orphans: Mapping[str, Mapping[str, Held]] | None = None
        if orphan_edits:
            merged = dict(self._orphans)
            for name, ls in orphan_edits.items():
                if ls:
                    merged[name] = MappingProxyType(ls)
                else:
                    merged.pop(name, None)
            orphans = merged
        return self._replace_cells(changed, orphans=orphans)
