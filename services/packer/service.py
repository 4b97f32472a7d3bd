"""The packer: answers ``PLAN`` on its topology view and announces node failures.

It keeps watch caches of Nodes, Leases and Reservations (and Runs, which size administrator
Reservations that carry no GPU count) and writes nothing. ``PLAN`` runs the engine's ``pack`` on
the latest snapshot, with the GPUs promised to other Reservations protected, and stamps the cache
version the plan was computed on. A health loop turns node observations into ``NODE_FAILED``
events (``shared.control.node_health``): a node under open leases that is deleted, or NotReady
for longer than ``--node-grace-seconds``, is announced once per failure episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

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
from shared.control.node_health import (
    DEFAULT_GRACE,
    HealthState,
    NodeFailure,
    evaluate,
    node_condition,
)
from shared.engine.admit import claim_protection
from shared.engine.pack import NoFit, pack
from shared.engine.state import ClusterState, Settings
from shared.engine.topology import DEFAULT_GPU_RESOURCE, Topology
from shared.kube.cache import ClusterCache
from shared.kube.client import make_client

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PackerOptions:
    """Operator knobs of the packer."""

    gpu_resource: str = DEFAULT_GPU_RESOURCE
    node_grace: timedelta = DEFAULT_GRACE
    """How long a leased node may be NotReady before it counts as failed."""
    settings: Settings = field(default_factory=Settings)

    @property
    def tick_seconds(self) -> float:
        """Health re-check period: fine enough to honour the grace to within a quarter."""
        return max(0.05, min(1.0, self.node_grace.total_seconds() / 4))


def plan(req: PlanRequest, state: ClusterState, version: int) -> PlanReply:
    """The engine's pack on ``state``, with other Reservations' GPUs protected (pure).

    Claims of the planned Run itself, and the Reservation named by ``own_claim``, never block
    it: the binder re-checks commits by the same rule.
    """
    at = req.at or state.now
    claims = tuple(c for c in state.claims if c.run != req.request.key)
    protected = claim_protection(req.request, claims, state.topology, at, own=req.own_claim)
    placed = pack(
        req.request,
        state.topology,
        req.funding,
        gpus=req.gpus,
        first_group=req.first_group,
        first_rank=req.first_rank,
        used_domains=tuple(req.used_domains),
        protected=protected,
    )
    if isinstance(placed, NoFit):
        return PlanReply(version=version, reason=placed.reason.value, message=placed.message)
    return PlanReply(version=version, placement=placed)


def leased_nodes(topology: Topology) -> set[str]:
    """Nodes holding open leases, including nodes the topology no longer knows (deleted)."""
    held = {node.name for node in topology if topology.used(node.name) > 0}
    held.update(name for name, gpus in topology.orphan_usage().items() if gpus > 0)
    return held


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
            kinds=("nodes", "leases", "reservations", "runs"),
            gpu_resource=self.options.gpu_resource,
        )
        self.health = HealthState()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        """Connect, sync the caches, then serve PLAN and watch node health."""
        await self.runtime.start()
        for kind in ("nodes", "leases"):
            self.cache.add_listener(kind, self._poke)
        await self.cache.start()
        await self.cache.wait_ready()
        self.runtime.endpoint(PLAN, self.plan)
        self._tasks.append(asyncio.create_task(self._health_loop(), name="packer-health"))
        self.runtime.set_ready(True)
        log.info("packer serving plans", extra={"grace_s": self.options.node_grace.total_seconds()})

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
            reply = plan(req, state, version)
        finally:
            metrics.PLAN_SECONDS.observe(time.perf_counter() - started)
        metrics.PLANS.labels("fit" if reply.fits else reply.reason).inc()
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

    async def check_nodes(self, now: datetime | None = None) -> tuple[NodeFailure, ...]:
        """One health pass: announce new failures; returns them."""
        now = now or utcnow()
        metrics.NODES_MISSING_LABELS.set(self.cache.missing_label_nodes)
        topology = self.cache.topology
        metrics.TOPOLOGY_NODES.set(len(topology))
        nodes = {name: node_condition(obj) for name, obj in self.cache.objects("nodes").items()}
        failures, self.health = evaluate(
            nodes, leased_nodes(topology), self.health, now, self.options.node_grace
        )
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
    api = await make_client(cfg.kubeconfig)
    runtime = ServiceRuntime.from_config(cfg)
    packer = Packer(runtime, api, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    starting = asyncio.create_task(packer.start())
    try:
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            failure = starting.exception()
            if failure is not None:
                raise failure
            await stopping
    finally:
        starting.cancel()
        stopping.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        await packer.stop()
        await api.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("packer stopped")
    return 0
