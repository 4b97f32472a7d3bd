"""The packer: answers ``PLAN`` on its topology view and announces node failures.

It keeps watch caches of Nodes, Leases and Reservations (and Runs, which size administrator
Reservations that carry no GPU count) and writes nothing. ``PLAN`` runs the engine's ``pack`` on
the latest snapshot, with the GPUs promised to other Reservations protected, and stamps the cache
version the plan was computed on; an opportunistic Run is first tried as fill inside other Runs'
spare GPUs (``shared.engine.fill``). Placements it handed out are *assumed* (their GPUs kept from
other Runs' plans) until its cache shows the committed Leases or ``assume_seconds`` pass, so
concurrent proposers do not all get the same nodes and collide at the binder. A health loop
turns node observations into ``NODE_FAILED`` events (``shared.control.node_health``): a node
under open leases that is deleted, or NotReady for longer than ``--node-grace-seconds``, is
announced once per failure episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from kubernetes_asyncio.client import ApiClient

from services.packer import metrics
from shared.bus import (
    NODE_FAILED,
    PLAN,
    BusError,
    NodeFailed,
    PlanReply,
    PlanRequest,
    ServiceConfig,
    ServiceRuntime,
)
from shared.bus.process import serve_service
from shared.control.node_health import (
    HealthState,
    NodeCondition,
    NodeFailure,
    evaluate,
    node_condition,
)
from shared.engine.admit import claim_protection
from shared.engine.fill import as_fill, fill_topology
from shared.engine.fleet import fleet_cells
from shared.engine.model import Role, RunKey, RunRequest
from shared.engine.pack import NoFit, Placement, needs_more_offers, pack
from shared.engine.state import ClusterState, Settings
from shared.engine.topology import DEFAULT_GPU_RESOURCE, Topology
from shared.kube.cache import ClusterCache
from shared.kube.informer import Obj

log = logging.getLogger(__name__)

ASSUME_SECONDS = 10.0
"""How long a placement handed out keeps its GPUs from other plans unless its Leases show up."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PackerOptions:
    """Operator knobs of the packer."""

    gpu_resource: str = DEFAULT_GPU_RESOURCE
    assume_seconds: float = ASSUME_SECONDS
    """How long a placement handed out is kept from other plans unless its Leases show up."""
    settings: Settings = field(default_factory=Settings)
    """Engine settings (``shared.bus.settings``): the snapshot's spare factor, the node grace."""

    @property
    def tick_seconds(self) -> float:
        """Health re-check period: fine enough to honour the grace to within a quarter."""
        return max(0.05, min(1.0, self.settings.node_grace.total_seconds() / 4))


def plan(
    req: PlanRequest,
    state: ClusterState,
    version: int,
    assumed: Mapping[str, int] | None = None,
    assumed_fill: Mapping[str, int] | None = None,
) -> PlanReply:
    """The engine's pack on ``state``, with other Reservations' GPUs protected (pure).

    Claims of the planned Run itself, and the Reservation named by ``own_claim``, never block
    it: the binder re-checks commits by the same rule. ``assumed`` (node → GPUs) are GPUs of
    placements handed out to other Runs and not committed yet: the plan avoids them when it can,
    and takes them when nothing else fits (an assumption is a guess, never a reason for NoFit;
    the binder's re-check decides).

    An opportunistic Run is first placed as fill inside other Runs' spare GPUs (``Borrowed``
    ranks, no spares of its own; ``assumed_fill`` is spare room handed out to other fill and
    not committed yet); only when no fill fits does it get an ordinary placement. Claims do not
    apply to fill: it takes no GPUs beyond the spares it sits in.
    """
    request = req.request
    if request.opportunistic:
        room = fill_topology(state.topology, state.open_leases, request.key)
        if len(room):
            fill = replace(request, spares_per_group=0)
            filled = _pack_around(req, fill, room, {}, assumed_fill)
            if isinstance(filled, Placement):
                return PlanReply(version=version, placement=as_fill(filled))
            if needs_more_offers(filled):  # the fill answer may change with every offer
                return PlanReply(
                    version=version, reason=filled.reason.value, message=filled.message
                )
    at = req.at or state.now
    claims = tuple(c for c in state.claims if c.run != request.key)
    protected = claim_protection(request, claims, state.topology, at, own=req.own_claim)
    placed = _pack_around(req, request, state.topology, protected, assumed)
    if isinstance(placed, NoFit):
        return PlanReply(version=version, reason=placed.reason.value, message=placed.message)
    return PlanReply(version=version, placement=placed)


def _pack_around(
    req: PlanRequest,
    request: RunRequest,
    topology: Topology,
    protected: Mapping[str, int],
    assumed: Mapping[str, int] | None,
) -> Placement | NoFit:
    """Pack ``request`` around the ``assumed`` GPUs, or (nothing fits around them) without."""

    def attempt(avoid: Mapping[str, int]) -> Placement | NoFit:
        return pack(
            request,
            topology,
            req.funding,
            gpus=req.gpus,
            first_group=req.first_group,
            first_rank=req.first_rank,
            used_domains=tuple(req.used_domains),
            protected=avoid,
        )

    if assumed:
        avoid = dict(protected)
        for node, gpus in assumed.items():
            avoid[node] = avoid.get(node, 0) + gpus
        placed = attempt(avoid)
        if isinstance(placed, Placement) or needs_more_offers(placed):
            return placed
    return attempt(protected)


@dataclass(frozen=True, slots=True)
class Assumption:
    """GPUs per node of a placement handed out for a Run, until committed or expired."""

    gpus: Mapping[str, int]
    """Physical GPUs (actives and spares)."""
    fill: Mapping[str, int]
    """Spare room its ``Borrowed`` ranks take (fill holds no GPUs of its own)."""
    expires: float
    """``time.monotonic()`` deadline."""


def placement_gpus(placement: Placement, *, fill: bool = False) -> dict[str, int]:
    """Node → GPUs a placement takes: physical GPUs (spares included: they hold GPUs too), or
    with ``fill`` the spare room its ``Borrowed`` ranks occupy."""
    out: dict[str, int] = {}
    for s in placement.slices:
        if (s.role is Role.BORROWED) is fill:
            out[s.node] = out.get(s.node, 0) + s.gpus
    return out


def _result(reply: PlanReply) -> str:
    """The ``result`` label of a plan: ``fill``, ``fit`` or the NoFit reason."""
    if reply.placement is None:
        return reply.reason
    return "fill" if placement_gpus(reply.placement, fill=True) else "fit"


class Packer:
    """PLAN endpoint and node health loop over one cluster cache."""

    def __init__(
        self, runtime: ServiceRuntime, api: ApiClient, options: PackerOptions | None = None
    ) -> None:
        self.runtime = runtime
        self.api = api
        self.options = options or PackerOptions()
        self.cache = ClusterCache(
            api,
            kinds=("nodes", "leases", "reservations", "runs", "pods"),
            gpu_resource=self.options.gpu_resource,
        )
        self.health = HealthState()
        self._conditions: dict[str, tuple[object, NodeCondition]] = {}
        self._fleet: set[metrics.FleetLabels] = set()
        self._fleet_of: Topology | None = None
        """Node → (resourceVersion, its readiness): parsed again only when the Node changes."""
        self.assumed: dict[RunKey, Assumption] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        """Connect, sync the caches, then serve PLAN and watch node health."""
        await self.runtime.start()
        for kind in ("nodes", "leases"):
            self.cache.add_listener(kind, self._poke)
        self.cache.add_listener("leases", self._settle)
        self.cache.add_listener("runs", self._settle)
        await self.cache.start()
        await self.cache.wait_ready()
        self.runtime.endpoint(PLAN, self.plan)
        self._tasks.append(asyncio.create_task(self._health_loop(), name="packer-health"))
        self.runtime.set_ready(True)
        log.info(
            "packer serving plans",
            extra={"grace_s": self.options.settings.node_grace.total_seconds()},
        )

    async def stop(self) -> None:
        self._stopping = True
        self.runtime.set_ready(False)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.cache.stop()
        await self.runtime.stop()

    def _poke(self, *_: object) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ PLAN

    async def plan(self, req: PlanRequest) -> PlanReply:
        """Handle one plan request (the ``PLAN`` endpoint)."""
        started = time.perf_counter()
        try:
            version = self.cache.version
            state = self.cache.snapshot(utcnow(), self.options.settings)
            key = req.request.key
            reply = plan(req, state, version, *self._assumed_for(key))
            if reply.placement is not None:
                self.assumed[key] = Assumption(
                    placement_gpus(reply.placement),
                    placement_gpus(reply.placement, fill=True),
                    time.monotonic() + self.options.assume_seconds,
                )
            else:
                self.assumed.pop(key, None)
        finally:
            metrics.PLAN_SECONDS.observe(time.perf_counter() - started)
        metrics.PLANS.labels(_result(reply)).inc()
        log.debug(
            "plan",
            extra={
                "run": f"{req.run.namespace}/{req.run.name}",
                "version": version,
                "fits": reply.fits,
                "reason": reply.reason,
            },
        )
        return reply

    def _settle(self, event: str, obj: Obj, old: Obj | None) -> None:
        """A Lease of an assumed Run was written (its commit landed), or the Run is gone: its
        placement is no longer a guess."""
        if not self.assumed:
            return
        if "runRef" in (obj.get("spec") or {}):
            ref = obj["spec"]["runRef"] or {}
            key = (str(ref.get("namespace") or ""), str(ref.get("name") or ""))
        elif event == "DELETED":
            meta = obj.get("metadata") or {}
            key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        else:
            return
        self.assumed.pop(key, None)

    def _assumed_for(self, run: RunKey) -> tuple[dict[str, int], dict[str, int]]:
        """GPUs and spare room per node of other Runs' placements not yet seen committed
        (expired ones and those whose Leases the cache shows are dropped first)."""
        now = time.monotonic()
        for key, assumption in list(self.assumed.items()):
            held = {lease.node for lease in self.cache.leases_of(key) if lease.open}
            nodes = assumption.gpus.keys() | assumption.fill.keys()
            if assumption.expires <= now or held >= nodes:
                del self.assumed[key]
        gpus: dict[str, int] = {}
        fill: dict[str, int] = {}
        for key, assumption in self.assumed.items():
            if key == run:
                continue
            for into, taken in ((gpus, assumption.gpus), (fill, assumption.fill)):
                for node, count in taken.items():
                    into[node] = into.get(node, 0) + count
        return gpus, fill

    # ------------------------------------------------------------------ node health

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.tick_seconds)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.check_nodes()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node health pass failed")

    def _condition(self, obj: Obj) -> NodeCondition:
        meta = obj.get("metadata") or {}
        name, version = str(meta.get("name") or ""), meta.get("resourceVersion")
        known = self._conditions.get(name)
        if known is not None and version is not None and known[0] == version:
            return known[1]
        condition = node_condition(obj)
        self._conditions[name] = (version, condition)
        return condition

    async def check_nodes(self, now: datetime | None = None) -> tuple[NodeFailure, ...]:
        """One health pass: announce new failures; returns them."""
        now = now or utcnow()
        metrics.NODES_MISSING_LABELS.set(self.cache.missing_label_nodes)
        topology = self.cache.topology
        metrics.TOPOLOGY_NODES.set(len(topology))
        if topology is not self._fleet_of:  # snapshots are immutable: same object, same figures
            self._fleet = metrics.export_fleet(fleet_cells(topology), self._fleet)
            self._fleet_of = topology
        # Only nodes under open leases can fail a gang: reading every node's conditions each
        # pass cost half the packer's CPU on a 1,000-node fleet.
        leased = topology.in_use()
        objects = self.cache.objects("nodes")
        nodes = {name: self._condition(objects[name]) for name in leased if name in objects}
        failures, self.health = evaluate(
            nodes, leased, self.health, now, self.options.settings.node_grace
        )
        if len(self._conditions) > 2 * len(objects):  # forget nodes that are gone
            self._conditions = {n: c for n, c in self._conditions.items() if n in objects}
        for failure in failures:
            event = NodeFailed(node=failure.node, at=failure.since, reason=failure.reason)
            msg_id = f"{failure.node}:{failure.reason}:{failure.since.isoformat()}"
            try:
                await self.runtime.publish(NODE_FAILED, event, msg_id=msg_id)
            except BusError as exc:  # not announced: report it again next pass
                log.warning("node failure not published", extra={"error": str(exc)})
                self.health = replace(self.health, reported=self.health.reported - {failure.node})
                continue
            metrics.NODE_FAILURES.labels(failure.reason).inc()
            log.warning(
                "node failed",
                extra={"node": failure.node, "reason": failure.reason, "since": failure.since},
            )
        return failures


# --------------------------------------------------------------------------- process entry


async def serve(cfg: ServiceConfig, options: PackerOptions) -> int:
    """Run one packer process until SIGTERM/SIGINT."""
    await serve_service(cfg, lambda runtime, api: Packer(runtime, api, options))
    log.info("packer stopped")
    return 0
