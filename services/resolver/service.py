"""The resolver: Reservation activation and node-failure plans, committed through the binder.

* ``ACTIVATE`` (from the forecaster's timer): load the Reservation and its Run, snapshot the
  cache and let ``shared.control.activation.decide`` choose — bind now, or cut (drop spares,
  shrink, seeded lottery) and bind, all in ONE ``COMMIT`` — or Blocked. The seed is published in
  ``status.audit`` before the commit; afterwards the audit gets the draws and ended leases, the
  Reservation is Released (``releasedAt``) and one log line carries ``RandomPreempt(<seed>)``,
  the seed and the conflict set. Field manager ``jobtree-resolver``.
  The request names the Reservation only: the activation instant that seeds the lottery is the
  Reservation's ``status.activatedAt`` (written once: by the forecaster when it activates, else
  here as ``earliestStart``), so the sender cannot pick the draw. An ACTIVATE before
  ``earliestStart`` is refused (``Early``); one for a Reservation already settled answers from
  its status.
* ``NODE_FAILED`` (durable): the engine's swap / shrink / requeue plan as binder commits; a
  rejected commit fails the handler so JetStream redelivers and the plan is recomputed. The event
  is a claim: it is acted on only when the node, read fresh from the API server, is deleted or
  NotReady past the grace (``shared.control.node_health.has_failed``); otherwise it is dropped
  (``jobtree_resolver_events_refused_total``).

Runs cut entirely are not requeued here: their leases end with the cut's closure and admission
requeues them (checkpoint, restarts left) from the closures, as for any other lease end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes_asyncio.client import ApiClient

from services.resolver import metrics
from shared.api import ReservationState
from shared.bus import (
    ACTIVATE,
    COMMIT,
    NODE_FAILED,
    RUN_CHANGED,
    ActivateReply,
    ActivateRequest,
    BusError,
    CommitReply,
    CommitRequest,
    NodeFailed,
    RunChanged,
    RunRef,
    ServiceConfig,
    ServiceRuntime,
)
from shared.bus.process import serve_service
from shared.control import reservations as rv
from shared.control.activation import (
    Activation,
    Outcome,
    Target,
    activation_commit,
    decide,
    failure_commits,
    failure_domains,
)
from shared.control.node_health import has_failed, node_condition
from shared.engine.failures import FailurePlan, on_node_failure
from shared.engine.model import RunKey, run_label
from shared.engine.resolver import audit_line
from shared.engine.state import ClusterState, Settings
from shared.engine.topology import DEFAULT_GPU_RESOURCE
from shared.kube import writer
from shared.kube.cache import ClusterCache
from shared.kube.informer import Obj
from shared.kube.resources import NODES, RESERVATIONS, RUNS
from shared.kube.translate import TranslateError, rfc3339, run_request

log = logging.getLogger(__name__)

FIELD_MANAGER = rv.RESOLVER_MANAGER
EARLY_TOLERANCE = timedelta(seconds=1)
"""How much before ``earliestStart`` an ACTIVATE is still on time (whole-second timestamps)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ResolverOptions:
    """Operator knobs of the resolver."""

    commit_timeout: float = 60.0
    commit_resends: int = 2
    """An unanswered (timed out, failed) COMMIT is sent again this many times."""
    conflict_retries: int = 3
    """Binder rejections retried with a fresh snapshot before giving up for now."""
    retry_delay: float = 0.5
    settle_seconds: float = 10.0
    """At activation, how long to wait for leases past their walltime to be ended by the binder
    (``TimeLimit``) before deciding without them (then they may be cut like any other)."""
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    namespace: str | None = None
    """Only Runs and Reservations of this namespace (None: every namespace)."""
    settings: Settings = field(default_factory=Settings)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def restarts_of(obj: Mapping[str, Any]) -> int:
    value = (obj.get("status") or {}).get("restarts")
    return value if isinstance(value, int) and value >= 0 else 0


class _Rejected(Exception):
    """The binder refused a commit (stale view): recompute on a fresh snapshot."""


class Resolver:
    """ACTIVATE endpoint and NODE_FAILED consumer over one watch cache."""

    def __init__(
        self, runtime: ServiceRuntime, api: ApiClient, options: ResolverOptions | None = None
    ) -> None:
        self.runtime = runtime
        self.api = api
        self.options = options or ResolverOptions()
        self.cache = ClusterCache(
            api, gpu_resource=self.options.gpu_resource, namespace=self.options.namespace
        )
        self._lock = asyncio.Lock()
        """One decision at a time: two activations must not plan on the same free GPUs."""

    async def start(self) -> None:
        await self.runtime.start()
        await self.cache.start()
        await self.cache.wait_ready()
        self.runtime.endpoint(ACTIVATE, self.activate)
        self.runtime.subscribe(NODE_FAILED, self.on_node_failed, durable="resolver")
        self.runtime.set_ready(True)
        log.info("resolver serving")

    async def stop(self) -> None:
        self.runtime.set_ready(False)
        await self.cache.stop()
        await self.runtime.stop()

    def snapshot(self, now: datetime) -> tuple[ClusterState, int]:
        version = self.cache.version
        return self.cache.snapshot(now, self.options.settings), version

    def _runs_by_key(self) -> dict[RunKey, Obj]:
        out: dict[RunKey, Obj] = {}
        for obj in self.cache.objects("runs").values():
            meta = _meta(obj)
            out[(str(meta.get("namespace") or ""), str(meta.get("name") or ""))] = obj
        return out

    def _restarts(self) -> dict[RunKey, int]:
        return {key: restarts_of(obj) for key, obj in self._runs_by_key().items()}

    async def _run_object(self, key: RunKey) -> Obj | None:
        """The Run from the cache, else straight from the API server (just created)."""
        obj = self.cache.run_object(key)
        if obj is None:
            obj = await writer.get(self.api, RUNS, key[1], key[0])
        return obj

    async def _status(self, view: rv.ReservationView, status: dict[str, Any]) -> None:
        await writer.patch_status(
            self.api,
            RESERVATIONS,
            view.name,
            status,
            namespace=view.namespace,
            field_manager=FIELD_MANAGER,
        )

    async def _nudge(self, runs: set[RunKey]) -> None:
        """Tell admission the Runs changed (bound, cut) instead of waiting for its resync."""
        for key in sorted(runs):
            try:
                await self.runtime.publish(RUN_CHANGED, RunChanged(namespace=key[0], name=key[1]))
            except Exception as exc:  # a lost nudge only delays admission
                log.debug("RUN_CHANGED not sent", extra={"run": run_label(key), "error": repr(exc)})

    # ------------------------------------------------------------------ ACTIVATE

    async def activate(self, req: ActivateRequest) -> ActivateReply:
        """Resolve and bind one Reservation (idempotent: a Released one answers released)."""
        async with self._lock:
            try:
                return await self._activate(req)
            except BusError as exc:
                metrics.ACTIVATIONS.labels("Unavailable").inc()
                log.warning(
                    "activation deferred: binder unavailable",
                    extra={"reservation": f"{req.namespace}/{req.name}", "error": str(exc)},
                )
                return ActivateReply(released=False, seed=None, message=f"binder: {exc}")

    async def _activate(self, req: ActivateRequest) -> ActivateReply:
        key = f"{req.namespace}/{req.name}"
        for attempt in range(self.options.conflict_retries):
            obj = await writer.get(self.api, RESERVATIONS, req.name, req.namespace)
            if obj is None or (req.uid and _meta(obj).get("uid") != req.uid):
                return ActivateReply(released=False, seed=None, message=f"{key} not found")
            view = rv.read_reservation(obj)
            done = self._settled(view)
            if done is not None:
                return done
            if utcnow() + EARLY_TOLERANCE < view.earliest_start:
                metrics.ACTIVATIONS.labels("Early").inc()
                log.warning("early ACTIVATE refused", extra={"reservation": key})
                return ActivateReply(
                    released=False,
                    seed=None,
                    message=f"Early: {key} starts at {rfc3339(view.earliest_start)}",
                )
            view = await self._activated_view(view)
            at = view.activated_at or view.earliest_start
            run_obj = await self._run_object(view.run)
            if run_obj is None:
                return await self._cancel(view, "RunDeleted", f"Run {run_label(view.run)} is gone")
            try:
                request = run_request(run_obj)
            except TranslateError as exc:
                return await self._block(view, None, "InvalidRun", str(exc), at)
            now = utcnow()
            state, version = self.snapshot(now)
            target = Target(
                view.namespace,
                view.name,
                view.uid,
                at,
                nodes=view.nodes,
                strict=not view.managed,
            )
            ref = RunRef.of(run_obj)
            act = decide(
                request,
                state,
                target,
                generation=ref.generation,
                attempt=restarts_of(run_obj),
                restarts_used=self._restarts(),
            )
            settle_until = time.monotonic() + self.options.settle_seconds
            if act.outcome is Outcome.WAIT:
                log.info("activation waits: %s", act.message, extra={"reservation": key})
            while act.outcome is Outcome.WAIT:
                # Leases past their walltime hold the room: the binder is ending them.
                settle = time.monotonic() < settle_until
                if settle:
                    await asyncio.sleep(self.options.retry_delay)
                now = utcnow()
                state, version = self.snapshot(now)
                act = decide(
                    request,
                    state,
                    target,
                    generation=ref.generation,
                    attempt=restarts_of(run_obj),
                    restarts_used=self._restarts(),
                    settle=settle,
                )
            if act.outcome is Outcome.BLOCKED:
                return await self._block(view, act, act.reason, act.message, at)
            if act.outcome is Outcome.ALREADY_RUNNING:
                await self._release(view, act, now, at)
                return ActivateReply(released=True, seed=None, message=act.message)
            try:
                return await self._commit(view, act, target, ref, version, now)
            except _Rejected as exc:
                metrics.ACTIVATIONS.labels("Conflict").inc()
                log.info(
                    "activation commit rejected (%s); recomputing",
                    exc,
                    extra={"reservation": key, "attempt": attempt, "conflict": str(exc)},
                )
                await asyncio.sleep(self.options.retry_delay * (attempt + 1))
        return ActivateReply(
            released=False, seed=None, message="the binder kept rejecting the activation"
        )

    async def _activated_view(self, view: rv.ReservationView) -> rv.ReservationView:
        """The Reservation in state Active with its ``activatedAt`` on record (written once).

        The forecaster normally did both before sending ACTIVATE; otherwise the instant is the
        Reservation's own ``earliestStart``, never a time the request could choose. The binder
        accepts an activation's commit only for an Active Reservation.
        """
        if view.state is ReservationState.ACTIVE and view.activated_at is not None:
            return view
        status = {
            "state": ReservationState.ACTIVE.value,
            **_activated(view.activated_at or view.earliest_start),
        }
        obj = await writer.patch_status(
            self.api,
            RESERVATIONS,
            view.name,
            status,
            namespace=view.namespace,
            field_manager=FIELD_MANAGER,
        )
        return rv.read_reservation(obj)

    @staticmethod
    def _settled(view: rv.ReservationView) -> ActivateReply | None:
        """The answer for a Reservation whose activation already has an outcome."""
        if view.state is ReservationState.RELEASED:
            seed = (view.status.get("audit") or {}).get("seed") or None
            return ActivateReply(released=True, seed=seed, message="already released")
        if view.state in (ReservationState.BLOCKED, ReservationState.CANCELED):
            return ActivateReply(
                released=False, seed=None, message=f"reservation is {view.state.value}"
            )
        return None

    async def _commit(
        self,
        view: rv.ReservationView,
        act: Activation,
        target: Target,
        ref: RunRef,
        version: int,
        now: datetime,
    ) -> ActivateReply:
        commit = activation_commit(act, target, ref, version)
        if act.resolution is not None and act.resolution.actions:
            # The seed, the tokens and the draws are published before any lease ends.
            audit = rv.audit_record(act.resolution, act.scope, act.deficit, act.funding_envelope)
            await self._status(
                view,
                {"state": ReservationState.ACTIVE.value, "audit": audit, **_activated(target.at)},
            )
        reply = await self._send(commit)
        if not reply.ok:
            raise _Rejected(reply.conflict)
        await self._release(view, act, now, target.at)
        self._record(view, act)
        cut = {action.run for action in act.resolution.actions} if act.resolution else set()
        await self._nudge({view.run, *cut})
        return ActivateReply(released=True, seed=act.seed, message=act.message)

    async def _send(self, commit: CommitRequest) -> CommitReply:
        """COMMIT, re-sent as it is when no answer came: commits are idempotent (same key and
        lease names), so a commit the binder applied but could not confirm succeeds as a no-op."""
        for attempt in range(self.options.commit_resends + 1):
            try:
                return await self.runtime.request(
                    COMMIT, commit, timeout=self.options.commit_timeout
                )
            except BusError as exc:
                if attempt == self.options.commit_resends:
                    raise
                log.info(
                    "COMMIT unanswered (%s); sending it again",
                    exc,
                    extra={"key": commit.key, "attempt": attempt},
                )
                await asyncio.sleep(self.options.retry_delay)
        raise AssertionError("unreachable")

    async def _release(
        self, view: rv.ReservationView, act: Activation, now: datetime, at: datetime
    ) -> None:
        status: dict[str, Any] = {
            "state": ReservationState.RELEASED.value,
            "reason": act.reason,
            "message": act.message,
            "releasedAt": rfc3339(now.replace(microsecond=0)),
            **_activated(at),
        }
        if act.resolution is not None and act.resolution.actions:
            status["audit"] = rv.audit_record(
                act.resolution, act.scope, act.deficit, act.funding_envelope
            )
        elif "audit" in view.status:
            # An earlier attempt cut and bound, but its answer was lost: keep its record.
            status["audit"] = view.status["audit"]
        await self._status(view, status)

    def _record(self, view: rv.ReservationView, act: Activation) -> None:
        """Metrics and the one grep-able log line of the activation."""
        metrics.ACTIVATIONS.labels(act.outcome.value).inc()
        metrics.ACTIONS.labels("Bind").inc()
        res = act.resolution
        if res is None:
            log.info(
                "reservation released",
                extra={"reservation": view.key, "outcome": act.outcome.value},
            )
            return
        for action in res.actions:
            metrics.ACTIONS.labels(action.kind).inc()
            metrics.PREEMPTIONS.labels(act.scope.label, action.kind).inc(len(action.lease_names))
        if res.seed is not None:
            metrics.DRAWS.inc(len(res.draws))
            metrics.LOTTERIES.labels("cleared" if res.remaining_deficit == 0 else "short").inc()
        log.info(
            audit_line(res, act.scope, view.key),
            extra={
                "reservation": view.key,
                "outcome": act.outcome.value,
                "scope": act.scope.label,
                "seed": res.seed,
                "conflictSet": [run_label(k) for k in res.conflict_set],
                "draws": [
                    {"step": d.step, "owner": d.owner, "run": run_label(d.token.run)}
                    for d in res.draws
                ],
                "endedLeases": [name for name, _ in res.ended_leases],
                "requeue": [run_label(k) for k in res.requeue],
                "failed": [run_label(k) for k in res.failed],
            },
        )

    async def _block(
        self,
        view: rv.ReservationView,
        act: Activation | None,
        reason: str,
        message: str,
        at: datetime,
    ) -> ActivateReply:
        metrics.ACTIVATIONS.labels(Outcome.BLOCKED.value).inc()
        metrics.ACTIONS.labels("Blocked").inc()
        status = {
            "state": ReservationState.BLOCKED.value,
            "reason": reason,
            "message": message,
            **_activated(at),
        }
        await self._status(view, status)
        log.info(
            "reservation blocked",
            extra={
                "reservation": view.key,
                "reason": reason,
                "detail": message,
                "deficit": act.deficit if act is not None else None,
            },
        )
        await self._nudge({view.run})
        return ActivateReply(released=False, seed=None, message=f"{reason}: {message}")

    async def _cancel(self, view: rv.ReservationView, reason: str, message: str) -> ActivateReply:
        metrics.ACTIVATIONS.labels("Canceled").inc()
        now = rfc3339(utcnow().replace(microsecond=0))
        await self._status(
            view,
            {
                "state": ReservationState.CANCELED.value,
                "reason": reason,
                "message": message,
                "canceledAt": now,
            },
        )
        return ActivateReply(released=False, seed=None, message=f"{reason}: {message}")

    # ------------------------------------------------------------------ NODE_FAILED

    async def _node_failed(self, name: str, now: datetime) -> bool:
        """Whether the node is deleted or NotReady past the grace, read fresh from the API
        server (the cache may lag behind the packer that announced it)."""
        obj = await writer.get(self.api, NODES, name)
        return has_failed(
            None if obj is None else node_condition(obj), now, self.options.settings.node_grace
        )

    async def on_node_failed(self, event: NodeFailed) -> None:
        """Commit the engine's plan for a failed node; raising makes JetStream redeliver.

        The event is verified first: for a node that is Ready (or NotReady for less than the
        grace) nothing happens, whoever published it.
        """
        if not await self._node_failed(event.node, utcnow()):
            metrics.EVENTS_REFUSED.labels("NodeNotFailed").inc()
            log.warning(
                "NODE_FAILED refused: the node has not failed",
                extra={"node": event.node, "reason": event.reason},
            )
            return
        async with self._lock:
            for attempt in range(self.options.conflict_retries):
                now = utcnow()
                state, version = self.snapshot(now)
                leases = state.open_leases
                if self.options.namespace is not None:
                    leases = tuple(x for x in leases if x.run[0] == self.options.namespace)
                plan = on_node_failure(
                    event.node,
                    leases,
                    state.runs,
                    node_domains=failure_domains(state, event.node),
                    now=now,
                    restarts_used=self._restarts(),
                )
                refs = {key: RunRef.of(obj) for key, obj in self._runs_by_key().items()}
                commits = failure_commits(plan, state, refs, version)
                if not commits:
                    log.info("node failure: nothing to do", extra={"node": event.node})
                    return
                try:
                    for commit in commits:
                        reply = await self._send(commit)
                        if not reply.ok:
                            raise _Rejected(reply.conflict)
                except _Rejected as exc:
                    log.info(
                        "node failure commit rejected (%s); recomputing",
                        exc,
                        extra={"node": event.node, "attempt": attempt, "conflict": str(exc)},
                    )
                    await asyncio.sleep(self.options.retry_delay * (attempt + 1))
                    continue
                self._record_failure(plan, state)
                await self._nudge(
                    {*plan.requeue, *plan.failed, *(run for run, _ in plan.shrunk)}
                    | {start.run for start in plan.starts}
                )
                return
        raise RuntimeError(f"node {event.node}: the binder kept rejecting the failure plan")

    def _record_failure(self, plan: FailurePlan, state: ClusterState) -> None:
        moves = len(plan.pod_moves)
        if moves:
            metrics.ACTIONS.labels("Swap").inc(moves)
        if plan.shrunk:
            metrics.ACTIONS.labels("FailureShrink").inc(len(plan.shrunk))
        if plan.requeue:
            metrics.ACTIONS.labels("Requeue").inc(len(plan.requeue))
        if plan.failed:
            metrics.ACTIONS.labels("Fail").inc(len(plan.failed))
        node = state.topology.node(plan.node)
        scope = "/".join(node.domain) if node is not None else plan.node
        reclaimed = sum(1 for _, closure in plan.ends if closure == "ReclaimedBySpare")
        if reclaimed:
            metrics.PREEMPTIONS.labels(scope, "ReclaimedBySpare").inc(reclaimed)
        log.info(
            "node failure committed",
            extra={
                "node": plan.node,
                "ends": [f"{name}:{closure}" for name, closure in plan.ends],
                "swaps": [
                    f"{run_label(m.run)}#{m.rank}:{m.from_node}->{m.to_node}"
                    for m in plan.pod_moves
                ],
                "requeue": [run_label(k) for k in plan.requeue],
                "failed": [run_label(k) for k in plan.failed],
                "shrunk": [f"{run_label(k)}#{g}" for k, g in plan.shrunk],
            },
        )


def _activated(at: datetime) -> dict[str, str]:
    """``activatedAt`` in every status the resolver applies: the instant seeds the lottery, so it
    stays on record (server-side apply drops a field its manager stops sending; the forecaster,
    when it activated, holds the same value)."""
    return {"activatedAt": rfc3339(at)}


async def serve(cfg: ServiceConfig, options: ResolverOptions) -> int:
    """Run one resolver process until SIGTERM/SIGINT (exit status 0)."""
    await serve_service(cfg, lambda runtime, api: Resolver(runtime, api, options))
    log.info("resolver stopped")
    return 0


__all__ = ["FIELD_MANAGER", "Resolver", "ResolverOptions", "serve"]
