"""A read-only watch cache of the cluster, kept as engine records for cheap snapshots.

Each service decides on a :class:`ClusterState`. Rebuilding one from raw objects on every
decision would cost O(cluster) each time, so the cache translates every change once, as it
arrives, into the engine's views: an immutable :class:`Topology` (built once from the records
of the first lists, then advanced with ``with_node``/``without_node``/``with_lease``/
``with_pods``), the ledger of Leases (closed ones stay: accounting needs their GPU-hours), Budgets
(the Family index is advanced with ``Family.updated`` when a Budget really changed, keeping the
relations it cannot have changed),
RunRequests and reservation claims. ``snapshot`` then only assembles them.

Pods are watched in every namespace whatever the cache's scope (a node's capacity is shared by
all of them), only bound and non-terminal ones (a field selector), each kept as a ``slim_pod``:
its identity and counted requests, nothing else.

``version`` counts changes that altered those views (status-only updates and node heartbeats do
not); a proposal carries the version it was computed on, so the binder can tell stale ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Literal

from kubernetes_asyncio.client import ApiClient

from shared.engine.accounting import Settled, usage_from_ledger
from shared.engine.capacity import PodUse
from shared.engine.family import Family
from shared.engine.model import Budget, Lease, Node, ReservationClaim, RunKey, RunRequest
from shared.engine.state import ClusterState, Settings
from shared.engine.topology import DEFAULT_GPU_RESOURCE, MissingLabels, PodChange, Topology
from shared.kube.informer import EventType, Informer, Listener, Obj
from shared.kube.resources import (
    BUDGETS,
    GPU_LEASES,
    NODES,
    PODS,
    RESERVATIONS,
    RUNS,
    Resource,
    object_key,
)
from shared.kube.translate import (
    TranslateError,
    budget_record,
    claim_record,
    lease_record,
    node_record,
    reservation_run_key,
    run_request,
    slim_pod,
    slim_usage,
)

log = logging.getLogger(__name__)

Kind = Literal["nodes", "budgets", "runs", "reservations", "leases", "pods"]
KINDS: tuple[Kind, ...] = ("nodes", "budgets", "runs", "reservations", "leases", "pods")
RESOURCES: Mapping[Kind, Resource] = MappingProxyType(
    {
        "nodes": NODES,
        "budgets": BUDGETS,
        "runs": RUNS,
        "reservations": RESERVATIONS,
        "leases": GPU_LEASES,
        "pods": PODS,
    }
)
HOLDING_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
"""Pods that can hold node capacity: bound and not terminal (one leaving the set is DELETED)."""


def _name(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def _pod_changes(items: Mapping[str, Obj]) -> Iterator[tuple[str, str, PodUse]]:
    """(key, node, counted requests) of every cached slim pod that holds capacity."""
    for key, obj in items.items():
        used = slim_usage(obj)
        if used is not None:
            yield key, used[0], used[1]


def _run_key(obj: Obj) -> RunKey:
    meta = obj["metadata"]
    return str(meta.get("namespace") or ""), str(meta["name"])


class ClusterCache:
    """Informers for the chosen kinds plus the engine views derived from them.

    The cache's own listeners run first, so a listener added with :meth:`add_listener` sees the
    views already updated for the event it receives.
    """

    def __init__(
        self,
        api: ApiClient,
        *,
        kinds: Iterable[Kind] = KINDS,
        gpu_resource: str = DEFAULT_GPU_RESOURCE,
        namespace: str | None = None,
        label_selector: str | None = None,
        node_selector: str | None = None,
    ) -> None:
        """``namespace`` limits Runs and Reservations; ``label_selector`` applies to every kind
        but Pods (``node_selector`` replaces it for Nodes)."""
        self._gpu_resource = gpu_resource
        handlers = {
            "nodes": self._on_node,
            "budgets": self._on_budget,
            "runs": self._on_run,
            "reservations": self._on_reservation,
            "leases": self._on_lease,
            "pods": self._on_pod,
        }
        self._informers: dict[Kind, Informer] = {}
        for kind in dict.fromkeys(kinds):
            resource = RESOURCES[kind]
            if kind == "pods":
                informer = Informer(
                    api,
                    resource,
                    field_selector=HOLDING_PODS,
                    transform=lambda obj: slim_pod(obj, resource=gpu_resource),
                )
            else:
                selector = node_selector if kind == "nodes" and node_selector else label_selector
                informer = Informer(
                    api,
                    resource,
                    namespace=namespace if resource.namespaced else None,
                    label_selector=selector,
                )
            informer.add_listener(handlers[kind])
            self._informers[kind] = informer
        self._topology: Topology | None = None
        """Built on first read from the records below; advanced event by event after that."""
        self._nodes: dict[str, Node] = {}
        self._missing: dict[str, MissingLabels] = {}
        self._leases: dict[str, Lease] = {}
        self._run_leases: dict[RunKey, set[str]] = {}
        self._settled = Settled()
        """Ended leases, summed once: a snapshot replays only the open ones."""
        self._unsettled: dict[str, Lease] = {}
        self._unsettled_view: tuple[Lease, ...] | None = None
        self._budgets: dict[str, Budget] = {}
        self._runs: dict[RunKey, RunRequest] = {}
        self._claims: dict[str, ReservationClaim] = {}
        self._claim_errors: dict[str, str] = {}
        self._family: Family | None = None
        self._ledger: tuple[Lease, ...] | None = None
        self._runs_view: Mapping[RunKey, RunRequest] | None = None
        self._claims_view: tuple[ReservationClaim, ...] | None = None
        self._version = 0
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every informer in the background (idempotent while running)."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(inf.run(), name=f"cache-{kind}")
                for kind, inf in self._informers.items()
            ]

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until every informer has completed its first list (TimeoutError after ``timeout``)."""
        waits = (inf.ready.wait() for inf in self._informers.values())
        await asyncio.wait_for(asyncio.gather(*waits), timeout)

    async def stop(self) -> None:
        for informer in self._informers.values():
            informer.stop()
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks, return_exceptions=True)

    def add_listener(self, kind: Kind, callback: Listener) -> None:
        self._informers[kind].add_listener(callback)

    def informer(self, kind: Kind) -> Informer:
        return self._informers[kind]

    # ------------------------------------------------------------------ reads

    @property
    def version(self) -> int:
        """Monotone count of changes applied to the engine views."""
        return self._version

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            pods = self._informers.get("pods")
            self._topology = Topology.build(
                self._nodes.values(),
                self._unsettled.values(),
                _pod_changes(pods.items if pods is not None else {}),
            )
        return self._topology

    @property
    def missing_label_nodes(self) -> int:
        """Nodes ignored because they lack required topology labels."""
        return len(self._missing)

    @property
    def missing_labels(self) -> Mapping[str, MissingLabels]:
        """Why each ignored node is ignored (for warning events)."""
        return MappingProxyType(self._missing)

    def objects(self, kind: Kind) -> Mapping[str, Obj]:
        """Raw cached objects of one kind by ``namespace/name`` (or ``name``)."""
        return self._informers[kind].items

    def _object(self, kind: Kind, key: str) -> Obj | None:
        informer = self._informers.get(kind)
        return None if informer is None else informer.get(key)

    def run_object(self, key: RunKey) -> Obj | None:
        return self._object("runs", f"{key[0]}/{key[1]}")

    def run_request(self, key: RunKey) -> RunRequest | None:
        return self._runs.get(key)

    def node_object(self, name: str) -> Obj | None:
        return self._object("nodes", name)

    def lease(self, name: str) -> Lease | None:
        return self._leases.get(name)

    def leases_of(self, run: RunKey) -> tuple[Lease, ...]:
        """The Run's leases, open and closed, by name."""
        return tuple(self._leases[n] for n in sorted(self._run_leases.get(run, ())))

    def lease_objects_of(self, run: RunKey) -> tuple[Obj, ...]:
        """The Run's Lease objects, open and closed, by name."""
        found = (self._object("leases", n) for n in sorted(self._run_leases.get(run, ())))
        return tuple(obj for obj in found if obj is not None)

    def reservation_objects(self) -> tuple[Obj, ...]:
        informer = self._informers.get("reservations")
        return () if informer is None else tuple(informer.items[k] for k in sorted(informer.items))

    def snapshot(self, now: datetime, settings: Settings | None = None) -> ClusterState:
        """The engine's view at ``now``; usage is replayed from the cached ledger."""
        settings = settings or Settings()
        if self._family is None:
            self._family = Family(self._budgets.values())
        if self._ledger is None:
            self._ledger = tuple(self._leases[n] for n in sorted(self._leases))
        if self._runs_view is None:
            self._runs_view = MappingProxyType(dict(self._runs))
        if self._claims_view is None:
            self._claims_view = tuple(self._claims[k] for k in sorted(self._claims))
        if self._unsettled_view is None:
            self._unsettled_view = tuple(self._unsettled.values())
        usage = usage_from_ledger(
            self._unsettled_view,
            self._family.caps(),
            now=now,
            spare_factor=settings.spare_factor,
            settled=self._settled,
        )
        return ClusterState(
            now=now,
            topology=self.topology,
            family=self._family,
            ledger=self._ledger,
            usage=usage,
            runs=self._runs_view,
            claims=self._claims_view,
            settings=settings,
        )

    # ------------------------------------------------------------------ event handlers

    def _edit(self, change: Callable[[Topology], Topology]) -> None:
        """Apply a change to the built topology (before the first read the records suffice)."""
        if self._topology is not None:
            self._topology = change(self._topology)
        self._version += 1

    def _on_node(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        name = _name(obj)
        record = None
        if event != "DELETED":
            try:
                record = node_record(obj, resource=self._gpu_resource)
            except TranslateError as exc:
                log.warning("node %s ignored: %s", name, exc)
        if isinstance(record, MissingLabels):
            if self._missing.get(name) != record:
                log.warning("%s; ignored until labelled", record.message)
            self._missing[name] = record
        else:
            self._missing.pop(name, None)
        if record is None or isinstance(record, MissingLabels):
            if self._nodes.pop(name, None) is not None:
                self._edit(lambda t: t.without_node(name))
        elif self._nodes.get(name) != record:
            self._nodes[name] = record
            self._edit(lambda t: t.with_node(record))

    def _on_lease(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        name = _name(obj)
        prev = self._leases.get(name)
        lease = None
        if event != "DELETED":
            try:
                lease = lease_record(obj)
            except TranslateError as exc:  # the ledger keeps what it knew of the lease
                log.error("lease %s ignored: %s", name, exc)
                return
        if lease == prev:
            return
        topology = self._topology
        if prev is not None:
            self._leases.pop(name)
            self._run_leases[prev.run].discard(name)
            if not self._run_leases[prev.run]:
                del self._run_leases[prev.run]
            if topology is not None:
                topology = topology.without_lease(prev)
            self._settled.discard(name)
            self._unsettled.pop(name, None)
        if lease is not None:
            self._leases[name] = lease
            self._run_leases.setdefault(lease.run, set()).add(name)
            if topology is not None:
                topology = topology.with_lease(lease)
            if lease.end is None:
                self._unsettled[name] = lease
            else:
                self._settled.add(lease)
        self._topology = topology
        self._ledger = None
        self._unsettled_view = None
        self._version += 1

    def _on_pod(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        """The informer keeps the slim copies; the one replaced says what to take back."""
        key = object_key(obj)
        prev = slim_usage(old)
        now = None if event == "DELETED" else slim_usage(obj)
        if now == prev:
            return
        changes: list[tuple[str, str, PodUse | None]] = []
        if prev is not None:
            changes.append((key, prev[0], None))
        if now is not None:
            changes.append((key, now[0], now[1]))
        self._edit(lambda t: t.with_pods(changes))

    def assume_pods(self, pods: Sequence[PodChange]) -> None:
        """Count pods the caller is about to create before the pod watch shows them (Kueue's
        ``assumeWorkload``), so two commits on one node cannot together ask it for more CPU or
        memory than it has. Keys are the watch's (``namespace/name``): the watch's own event for
        the pod later replaces the entry, so nothing is counted twice."""
        if pods:
            changes = list(pods)
            self._edit(lambda t: t.with_pods(changes))

    def forget_pods(self, pods: Sequence[PodChange]) -> None:
        """Take back assumed pods the watch does not show: their creation did not happen."""
        watched = self._informers["pods"].items if "pods" in self._informers else {}
        gone = [(key, node, None) for key, node, _ in pods if key not in watched]
        if gone:
            self._edit(lambda t: t.with_pods(gone))

    def _on_budget(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        name = _name(obj)
        budget = None
        if event != "DELETED":
            try:
                budget = budget_record(obj)
            except TranslateError as exc:
                log.error("budget %s ignored: %s", name, exc)
        if budget == self._budgets.get(name):
            return
        if budget is None:
            self._budgets.pop(name, None)
        else:
            self._budgets[name] = budget
        if self._family is not None:
            try:
                self._family = self._family.updated(
                    upserts=() if budget is None else (budget,),
                    deletes=(name,) if budget is None else (),
                )
            except ValueError as exc:  # a key clash: snapshot() rebuilds and reports it
                log.error("budget %s: %s", name, exc)
                self._family = None
        self._version += 1

    def _on_run(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        key = _run_key(obj)
        request = None
        if event != "DELETED":
            try:
                request = run_request(obj)
            except TranslateError as exc:
                log.error("run %s/%s ignored: %s", *key, exc)
        if request == self._runs.get(key):
            return
        if request is None:
            self._runs.pop(key, None)
        else:
            self._runs[key] = request
        self._runs_view = None
        self._version += 1
        reservations = self._informers.get("reservations")
        for res_key, res in reservations.items.items() if reservations else ():
            if self._serves(res, key):
                self._refresh_claim(res_key, res)

    def _on_reservation(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        self._refresh_claim(object_key(obj), None if event == "DELETED" else obj)

    @staticmethod
    def _serves(reservation: Obj, run: RunKey) -> bool:
        try:
            return reservation_run_key(reservation) == run
        except TranslateError:
            return False

    def _refresh_claim(self, key: str, obj: Obj | None) -> None:
        """Recompute one reservation's claim (it may depend on its Run's demand)."""
        claim = None
        if obj is not None:
            try:
                claim = claim_record(obj, self._runs.get(reservation_run_key(obj)))
                self._claim_errors.pop(key, None)
            except TranslateError as exc:
                if self._claim_errors.get(key) != str(exc):
                    log.warning("reservation %s claims nothing: %s", key, exc)
                self._claim_errors[key] = str(exc)
        if claim == self._claims.get(key):
            return
        if claim is None:
            self._claims.pop(key, None)
        else:
            self._claims[key] = claim
        self._claims_view = None
        self._version += 1
