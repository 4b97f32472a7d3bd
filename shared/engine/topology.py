"""The fleet as pack sees it: labelled GPU nodes, GPUs held by open leases and by other pods,
and a per-domain free index.

SPEC §1: a node belongs to exactly one flavor and one domain (region, cluster, fabric.domain), and
only Ready, uncordoned nodes take new work. Pack runs for every admission, grow and forecast step,
so the snapshot keeps a per-flavor → per-domain index of free GPUs: pack ranks domains from that
index and only looks at the nodes of the few domains it actually uses. The GPUs a node has in use
are its physical occupancy (``occupancy``): opportunistic fill sits inside spare GPUs, so a
``Borrowed`` lease is not counted on top of the spare it fills. Every other non-terminal pod bound
to a node is remembered by its counted requests (``shared.engine.capacity``): its GPUs (only for
pods Jobtree did not create: a Jobtree pod's GPUs are its Lease's) come off the node's free GPUs,
and its CPU, memory, ephemeral storage and pod slot make up the node's ``Load``.

A ``Topology`` is immutable. Every update returns a new snapshot that shares all untouched domains
with the old one, so a watch cache can keep publishing snapshots cheaply and a planner can keep
working on the version it started with.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

from shared.engine.capacity import (
    NO_LOAD,
    Load,
    PodUse,
    load_of,
    parse_gpu_quantity,
)
from shared.engine.model import (
    DOMAIN_LABELS,
    FLAVOR_LABEL,
    REQUIRED_LABELS,
    DomainKey,
    Lease,
    Node,
    NodeCapacity,
    Role,
    Taint,
    TaintEffect,
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
_NO_PODS: Mapping[str, PodUse] = MappingProxyType({})
_USES: dict[PodUse, PodUse] = {}
"""Interned pod requests: 100,000 pods of a few shapes share a handful of tuples."""

PodChange = tuple[str, str, PodUse | None]
"""(pod key ``namespace/name``, node, counted requests) — ``None`` removes the pod."""


@dataclass(frozen=True, slots=True)
class MissingLabels:
    """A node that cannot join the topology: the caller emits a warning event/metric for it."""

    node: str
    missing: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"node {self.node} is missing required labels: {', '.join(self.missing)}"


def node_from_labels(
    name: str,
    labels: Mapping[str, str],
    allocatable: Mapping[str, str],
    *,
    resource: str = DEFAULT_GPU_RESOURCE,
    ready: bool = True,
    cordoned: bool = False,
    capacity: NodeCapacity | None = None,
    taints: tuple[Taint, ...] = (),
) -> Node | MissingLabels:
    """Translate a Kubernetes node into an engine ``Node``, or say which labels it lacks.

    An empty label value counts as missing: it would silently merge unrelated nodes into one
    domain. GPU capacity is the allocatable extended resource (0 when absent); ``capacity`` is
    the rest of its allocatable (``shared.kube.translate.node_record`` always passes it).
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
        capacity=capacity,
        taints=taints,
    )


def _held(lease: Lease) -> Held:
    """The (GPUs, role) a topology remembers for an open lease (one shared tuple per value)."""
    key = (lease.gpus, lease.role)
    return _HELD.setdefault(key, key)


def pod_use(use: PodUse) -> PodUse:
    """The shared tuple for these counted requests (pods of one shape share one)."""
    return _USES.setdefault(use, use)


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


@contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection while a snapshot is built: the build allocates a few hundred
    thousand acyclic containers, and the collections they trigger cost as much as the build."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def node_free(node: Node, used: int, load: Load = NO_LOAD) -> int:
    """GPUs a node can take for new work: none unless schedulable, never negative."""
    if not node.schedulable:
        return 0
    return max(0, node.gpus - used - load.gpus)


_NO_SCHEDULE = (TaintEffect.NO_SCHEDULE.value, TaintEffect.NO_EXECUTE.value)


@dataclass(frozen=True, slots=True)
class Floor:
    """What every schedulable node of a domain still offers: lets pack skip per-node checks.

    ``room`` is the smallest allocatable-minus-load of each resource over the domain's
    schedulable nodes that declare capacity (None when none does); ``tainted`` says some
    schedulable node carries a ``NoSchedule``/``NoExecute`` taint, ``disfavoured`` a
    ``PreferNoSchedule`` one.
    """

    room: NodeCapacity | None
    tainted: bool
    disfavoured: bool


class _Domain:
    """One (flavor, domain) cell: its nodes, their open leases and pods, the GPUs they offer."""

    __slots__ = (
        "_floor",
        "free",
        "free_by_node",
        "leases",
        "loads",
        "nodes",
        "ordered",
        "pods",
        "used",
    )

    def __init__(
        self,
        nodes: Mapping[str, Node],
        leases: Mapping[str, Mapping[str, Held]],
        pods: Mapping[str, Mapping[str, PodUse]],
        used: Mapping[str, int],
        loads: Mapping[str, Load],
        ordered: tuple[Node, ...],
        free_by_node: Mapping[str, int],
        free: int,
    ) -> None:
        self.nodes = nodes
        self.leases = leases
        """Node name → open lease name → (GPUs, role); only nodes holding leases."""
        self.pods = pods
        """Node name → pod key → counted requests; only nodes with pods."""
        self.used = used
        """Node name → lease occupancy; only nodes holding leases."""
        self.loads = loads
        """Node name → load of its pods; only nodes with pods."""
        self.ordered = ordered
        """Nodes sorted by name: the stable order every consumer iterates in."""
        self.free_by_node = free_by_node
        self.free = free
        self._floor: Floor | None = None

    @property
    def floor(self) -> Floor:
        """Computed on first use and kept: a snapshot's untouched cells share theirs."""
        if self._floor is None:
            self._floor = _floor_of(self)
        return self._floor


def _floor_of(cell: _Domain) -> Floor:
    cpu = memory = ephemeral = pods = -1
    bounded = tainted = disfavoured = False
    for node in cell.ordered:
        if not node.schedulable:
            continue
        if node.taints:
            for taint in node.taints:
                if taint.effect in _NO_SCHEDULE:
                    tainted = True
                elif taint.effect == TaintEffect.PREFER_NO_SCHEDULE.value:
                    disfavoured = True
        cap = node.capacity
        if cap is None:
            continue
        load = cell.loads.get(node.name, NO_LOAD)
        values = (
            cap.cpu - load.cpu,
            cap.memory - load.memory,
            cap.ephemeral - load.ephemeral,
            cap.pods - load.pods,
        )
        if not bounded:
            cpu, memory, ephemeral, pods = values
            bounded = True
        else:
            cpu, memory = min(cpu, values[0]), min(memory, values[1])
            ephemeral, pods = min(ephemeral, values[2]), min(pods, values[3])
    room = NodeCapacity(cpu, memory, ephemeral, pods) if bounded else None
    return Floor(room, tainted, disfavoured)


def _make_domain(
    nodes: dict[str, Node],
    leases: Mapping[str, Mapping[str, Held]],
    pods: Mapping[str, Mapping[str, PodUse]],
) -> _Domain:
    """A cell built in one pass over its nodes (the snapshot build is paid at every relist).

    ``nodes`` becomes the cell's own; the per-node lease and pod maps must be read-only from now
    on (fresh from a build, or an older cell's), so they are kept, not copied.
    """
    ordered = tuple([nodes[name] for name in sorted(nodes)])
    used: dict[str, int] = {}
    loads: dict[str, Load] = {}
    free_by_node: dict[str, int] = {}
    kept_leases: dict[str, Mapping[str, Held]] = {}
    kept_pods: dict[str, Mapping[str, PodUse]] = {}
    free = 0
    for node in ordered:
        name = node.name
        taken = 0
        held = leases.get(name)
        if held:
            kept_leases[name] = held
            if len(held) == 1:
                for gpus, _ in held.values():
                    taken = gpus
            else:
                taken = occupancy(held.values())
            used[name] = taken
        on = pods.get(name) if pods else None
        if on:
            kept_pods[name] = on
            load = loads[name] = load_of(on.values())
            taken += load.gpus
        if node.ready and not node.cordoned and node.gpus > taken:
            free_by_node[name] = node.gpus - taken
            free += node.gpus - taken
        else:
            free_by_node[name] = 0
    return _Domain(
        MappingProxyType(nodes),
        MappingProxyType(kept_leases),
        MappingProxyType(kept_pods),
        MappingProxyType(used),
        MappingProxyType(loads),
        ordered,
        MappingProxyType(free_by_node),
        free,
    )


def _update_domain(
    cell: _Domain,
    lease_edits: Mapping[str, Mapping[str, Held]],
    pod_edits: Mapping[str, Mapping[str, PodUse]],
) -> _Domain:
    """``cell`` with the open leases or pods of a few of its nodes replaced (node → all of them).

    Only the edited nodes are recounted; everything else is shared with ``cell``, so applying a
    bind costs what it touches, not the size of the domain.
    """
    leases = dict(cell.leases)
    used = dict(cell.used)
    pods = dict(cell.pods)
    loads = dict(cell.loads)
    free_by_node = dict(cell.free_by_node)
    free = cell.free
    for name, held in lease_edits.items():
        if held:
            leases[name] = MappingProxyType(dict(held))
            used[name] = occupancy(held.values())
        else:
            leases.pop(name, None)
            used.pop(name, None)
    for name, on in pod_edits.items():
        if on:
            pods[name] = MappingProxyType(dict(on))
            loads[name] = load_of(on.values())
        else:
            pods.pop(name, None)
            loads.pop(name, None)
    for name in lease_edits.keys() | pod_edits.keys():
        now = node_free(cell.nodes[name], used.get(name, 0), loads.get(name, NO_LOAD))
        free += now - free_by_node[name]
        free_by_node[name] = now
    return _Domain(
        cell.nodes,
        MappingProxyType(leases),
        MappingProxyType(pods),
        MappingProxyType(used),
        MappingProxyType(loads),
        cell.ordered,
        MappingProxyType(free_by_node),
        free,
    )


_Loc = tuple[str, DomainKey]


class Topology:
    """Immutable snapshot of labelled nodes, the GPUs open leases hold and the pods on them.

    Leases are tracked by name (a Lease is immutable, so one name always means one node), so
    applying the same lease twice (a replayed watch event) is harmless, and usage on a node that is
    not (or no longer) known is remembered until the node appears or the lease closes. Pods are
    tracked the same way by ``namespace/name``.
    """

    __slots__ = ("_count", "_free", "_index", "_orphan_pods", "_orphans", "_where")

    def __init__(
        self,
        where: Mapping[str, _Loc],
        index: Mapping[str, Mapping[DomainKey, _Domain]],
        free: Mapping[str, Mapping[DomainKey, int]],
        orphans: Mapping[str, Mapping[str, Held]],
        orphan_pods: Mapping[str, Mapping[str, PodUse]],
    ) -> None:
        """Internal: use ``Topology.build`` or ``Topology.empty``."""
        self._where = where
        self._index = index
        self._free = free
        self._orphans = orphans
        self._orphan_pods = orphan_pods
        self._count = len(where)

    # ----------------------------------------------------------------- construction

    @classmethod
    def empty(cls) -> Topology:
        return cls({}, {}, {}, {}, {})

    @classmethod
    def build(
        cls,
        nodes: Iterable[Node],
        leases: Iterable[Lease] = (),
        pods: Iterable[PodChange] = (),
    ) -> Topology:
        """Snapshot of the given nodes (last one wins on duplicate names), open leases and pods
        (``(key, node, counted requests)``; a ``None`` use is skipped)."""
        with _no_gc():
            cells: dict[_Loc, dict[str, Node]] = {}
            where: dict[str, _Loc] = {}
            for node in nodes:
                name = node.name
                loc = (node.flavor, node.domain)
                old = where.get(name)
                if old is not None:
                    del cells[old][name]
                where[name] = loc
                members = cells.get(loc)
                if members is None:
                    members = cells[loc] = {}
                members[name] = node
            lease_map: dict[str, dict[str, Held]] = {}
            for lease in leases:
                if lease.end is None:
                    on = lease_map.get(lease.node)
                    if on is None:
                        on = lease_map[lease.node] = {}
                    on[lease.name] = _held(lease)
            pod_map: dict[str, dict[str, PodUse]] = {}
            for key, node_name, use in pods:
                if use is not None:
                    pod_map.setdefault(node_name, {})[key] = pod_use(use)
            # Fresh maps nothing else holds: the cells keep them as they are (read-only by use).
            lease_views: Mapping[str, Mapping[str, Held]] = lease_map
            pod_views: Mapping[str, Mapping[str, PodUse]] = pod_map
            index: dict[str, dict[DomainKey, _Domain]] = {}
            frees: dict[str, dict[DomainKey, int]] = {}
            for (flavor, dom), members in cells.items():
                if not members:
                    continue
                cell = _make_domain(members, lease_views, pod_views)
                if flavor not in index:
                    index[flavor], frees[flavor] = {}, {}
                index[flavor][dom] = cell
                frees[flavor][dom] = cell.free
            free = {flavor: MappingProxyType(f) for flavor, f in frees.items()}
            orphans = {n: ls for n, ls in lease_views.items() if n not in where}
            orphan_pods = {n: ps for n, ps in pod_views.items() if n not in where}
            return cls(where, index, free, orphans, orphan_pods)

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
        return cell.used.get(name, 0)

    def load(self, name: str) -> Load:
        """What the node's other pods request (foreign GPUs, CPU, memory, storage, pod slots)."""
        cell = self._cell_of(name)
        if cell is None:
            return load_of(self._orphan_pods.get(name, _NO_PODS).values())
        return cell.loads.get(name, NO_LOAD)

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

    def pods_on(self, name: str) -> Mapping[str, PodUse]:
        """Pod key → counted requests of the non-terminal pods bound to the node."""
        cell = self._cell_of(name)
        if cell is None:
            return self._orphan_pods.get(name, _NO_PODS)
        return cell.pods.get(name, _NO_PODS)

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

    def floor(self, flavor: str, domain: DomainKey) -> Floor:
        """What every schedulable node of the domain still offers (see ``Floor``)."""
        cell = self._index.get(flavor, {}).get(domain)
        return Floor(None, False, False) if cell is None else cell.floor

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

    def pod_count(self) -> int:
        """Non-terminal pods counted on the nodes (known or not)."""
        known = sum(
            len(on)
            for cells in self._index.values()
            for c in cells.values()
            for on in c.pods.values()
        )
        return known + sum(len(on) for on in self._orphan_pods.values())

    # ----------------------------------------------------------------- updates

    def _replace_cells(
        self,
        changes: Mapping[_Loc, _Domain | None],
        where: Mapping[str, _Loc] | None = None,
        orphans: Mapping[str, Mapping[str, Held]] | None = None,
        orphan_pods: Mapping[str, Mapping[str, PodUse]] | None = None,
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
            self._orphan_pods if orphan_pods is None else orphan_pods,
        )

    def with_node(self, node: Node) -> Topology:
        """Add or replace a node; its open leases and pods (and any seen before it) stay counted."""
        old_loc = self._where.get(node.name)
        new_loc: _Loc = (node.flavor, node.domain)
        changes: dict[_Loc, _Domain | None] = {}
        orphans: Mapping[str, Mapping[str, Held]] | None = None
        orphan_pods: Mapping[str, Mapping[str, PodUse]] | None = None
        if old_loc is None:
            node_leases = self._orphans.get(node.name, _EMPTY)
            node_pods = self._orphan_pods.get(node.name, _NO_PODS)
            if node.name in self._orphans:
                orphans = {k: v for k, v in self._orphans.items() if k != node.name}
            if node.name in self._orphan_pods:
                orphan_pods = {k: v for k, v in self._orphan_pods.items() if k != node.name}
        else:
            old = self._index[old_loc[0]][old_loc[1]]
            node_leases = old.leases.get(node.name, _EMPTY)
            node_pods = old.pods.get(node.name, _NO_PODS)
            if old_loc != new_loc:
                changes[old_loc] = _make_domain(
                    {k: v for k, v in old.nodes.items() if k != node.name}, old.leases, old.pods
                )
        target = self._index.get(new_loc[0], {}).get(new_loc[1])
        nodes = dict(target.nodes) if target is not None else {}
        leases = dict(target.leases) if target is not None else {}
        pods = dict(target.pods) if target is not None else {}
        nodes[node.name] = node
        if node_leases:
            leases[node.name] = node_leases
        if node_pods:
            pods[node.name] = node_pods
        changes[new_loc] = _make_domain(nodes, leases, pods)
        where: Mapping[str, _Loc] | None = None
        if old_loc != new_loc:
            where = dict(self._where)
            where[node.name] = new_loc
        return self._replace_cells(changes, where=where, orphans=orphans, orphan_pods=orphan_pods)

    def without_node(self, name: str) -> Topology:
        """Drop a node (deleted or lost its labels); its leases and pods are kept as orphans."""
        loc = self._where.get(name)
        if loc is None:
            return self
        cell = self._index[loc[0]][loc[1]]
        orphans: Mapping[str, Mapping[str, Held]] | None = None
        orphan_pods: Mapping[str, Mapping[str, PodUse]] | None = None
        if cell.leases.get(name):
            orphans = dict(self._orphans)
            orphans[name] = cell.leases[name]
        if cell.pods.get(name):
            orphan_pods = dict(self._orphan_pods)
            orphan_pods[name] = cell.pods[name]
        changed = _make_domain(
            {k: v for k, v in cell.nodes.items() if k != name}, cell.leases, cell.pods
        )
        where = {k: v for k, v in self._where.items() if k != name}
        return self._replace_cells(
            {loc: changed}, where=where, orphans=orphans, orphan_pods=orphan_pods
        )

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

    def with_pods(self, changes: Iterable[PodChange]) -> Topology:
        """Apply pod changes ``(key, node, counted requests or None to remove)`` in one step."""
        return self._apply((), changes)

    def _apply(
        self, changes: Iterable[tuple[Lease, bool]], pod_changes: Iterable[PodChange] = ()
    ) -> Topology:
        cell_leases: dict[_Loc, dict[str, dict[str, Held]]] = {}
        cell_pods: dict[_Loc, dict[str, dict[str, PodUse]]] = {}
        orphan_edits: dict[str, dict[str, Held]] = {}
        orphan_pod_edits: dict[str, dict[str, PodUse]] = {}
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
        for key, node_name, use in pod_changes:
            loc = self._where.get(node_name)
            if loc is None:
                if node_name not in orphan_pod_edits:
                    orphan_pod_edits[node_name] = dict(self._orphan_pods.get(node_name, _NO_PODS))
                on = orphan_pod_edits[node_name]
            else:
                pod_edits = cell_pods.setdefault(loc, {})
                if node_name not in pod_edits:
                    cell = self._index[loc[0]][loc[1]]
                    pod_edits[node_name] = dict(cell.pods.get(node_name, _NO_PODS))
                on = pod_edits[node_name]
            if use is None:
                on.pop(key, None)
            else:
                on[key] = pod_use(use)
        if not (cell_leases or cell_pods or orphan_edits or orphan_pod_edits):
            return self
        changed: dict[_Loc, _Domain | None] = {}
        for loc in cell_leases.keys() | cell_pods.keys():
            changed[loc] = _update_domain(
                self._index[loc[0]][loc[1]], cell_leases.get(loc, {}), cell_pods.get(loc, {})
            )
        orphans: Mapping[str, Mapping[str, Held]] | None = None
        if orphan_edits:
            merged = dict(self._orphans)
            for name, ls in orphan_edits.items():
                if ls:
                    merged[name] = MappingProxyType(ls)
                else:
                    merged.pop(name, None)
            orphans = merged
        orphan_pods: Mapping[str, Mapping[str, PodUse]] | None = None
        if orphan_pod_edits:
            merged_pods = dict(self._orphan_pods)
            for name, ps in orphan_pod_edits.items():
                if ps:
                    merged_pods[name] = MappingProxyType(ps)
                else:
                    merged_pods.pop(name, None)
            orphan_pods = merged_pods
        return self._replace_cells(changed, orphans=orphans, orphan_pods=orphan_pods)
