"""The forecaster: Reservations, their ETA, risk and countdown, and activation at earliestStart.

* ``RESERVE`` (from admission): snapshot the cache, run the engine forecast for the blocked Run,
  create its Reservation (deterministic name, immutable spec: intended slice, paying envelope,
  earliestStart, claim size) and apply the status (Pending, typed reason, forecast block) under
  the field manager ``jobtree-forecast``. A Run that already has a live Reservation gets it back;
  one whose location holds no node of its flavor is refused with a typed ``NoNodesInScope``.
* A timer (``--tick-seconds``) walks every Reservation (``shared.control.reservations.next_step``):
  fresh countdowns; administrator Reservations get a status and their Run recorded on first
  sight; a Reservation whose Run was deleted or changed spec is Canceled; at earliestStart the
  state goes Active (``activatedAt`` seeds the lottery) and ``ACTIVATE`` goes to the resolver.
* Runs in the conflict set of a live Reservation carry the ``AtRisk`` condition with their kill
  probability; the mark is removed when no Reservation backs it any more.

All decisions are pure functions of ``shared.control``; this module only reads the cache,
writes objects and talks on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes_asyncio.client import ApiClient

from services.forecast import metrics
from services.forecast.config import ForecastOptions
from shared.api import ReservationState
from shared.api.lease import label_value
from shared.bus import (
    ACTIVATE,
    LEDGER,
    RESERVE,
    UNRESERVABLE,
    ActivateRequest,
    BusError,
    LedgerEvent,
    Refused,
    ReserveReply,
    ReserveRequest,
    RunRef,
    ServiceConfig,
    ServiceRuntime,
)
from shared.bus.process import serve_service
from shared.control import reservations as rv
from shared.control.activation import Target, preview
from shared.engine.admit import Blocked
from shared.engine.durations import DurationModel, expected_start, learn
from shared.engine.forecast import forecast, open_claims, reforecast_instead, request_scope
from shared.engine.model import Role, RunKey, run_label
from shared.engine.state import ClusterState
from shared.kube import writer
from shared.kube.cache import ClusterCache
from shared.kube.client import KubeError
from shared.kube.informer import EventType, Obj
from shared.kube.resources import RESERVATIONS, RUNS
from shared.kube.translate import rfc3339

log = logging.getLogger(__name__)

SNAPSHOT_REUSE = timedelta(seconds=1)
"""How long a snapshot serves later requests while the cache version stays the same."""

FIELD_MANAGER = rv.FORECAST_MANAGER


def utcnow() -> datetime:
    return datetime.now(UTC)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


class Forecaster:
    """RESERVE endpoint, Reservation timer and the cache they read."""

    def __init__(
        self, runtime: ServiceRuntime, api: ApiClient, options: ForecastOptions | None = None
    ) -> None:
        self.runtime = runtime
        self.api = api
        self.options = options or ForecastOptions()
        self.cache = ClusterCache(
            api, gpu_resource=self.options.gpu_resource, namespace=self.options.namespace
        )
        self._lock = asyncio.Lock()
        self._snapshot: tuple[int, ClusterState] | None = None
        self._durations: tuple[int, DurationModel] | None = None
        self._parsed: dict[str, tuple[str, rv.ReservationView]] = {}
        self._risk_sent: dict[RunKey, tuple[str, dict[str, Any]]] = {}
        self._next_round = 0.0
        self._wake = asyncio.Event()
        self._activating: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._bad: dict[str, str] = {}
        self._stale_forecasts = False
        self._last_refresh = 0.0
        self._synced = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, sync the caches, serve RESERVE and start the timer."""
        self.cache.add_listener("reservations", self._on_reservation)
        self.cache.add_listener("runs", self._poke)
        await self.runtime.start()
        await self.cache.start()
        await self.cache.wait_ready()
        self._synced = True
        self.runtime.endpoint(RESERVE, self.reserve)
        self.runtime.subscribe(LEDGER, self._on_ledger, durable="forecast")
        self._tasks.append(asyncio.create_task(self._timer(), name="forecast-timer"))
        self.runtime.set_ready(True)
        log.info("forecast serving", extra={"tick_seconds": self.options.tick_seconds})

    async def stop(self) -> None:
        self.runtime.set_ready(False)
        tasks = [*self._tasks, *self._activating.values()]
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.cache.stop()
        await self.runtime.stop()

    def _poke(self, *_: object) -> None:
        self._wake.set()

    def _on_reservation(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        """Count state entries (every service's writes) and wake the timer."""
        if event != "DELETED" and self._synced:
            state = (obj.get("status") or {}).get("state")
            before = ((old or {}).get("status") or {}).get("state")
            if isinstance(state, str) and state != before:
                metrics.RESERVATIONS_TOTAL.labels(state).inc()
        self._wake.set()

    async def _on_ledger(self, event: LedgerEvent) -> None:
        """Capacity changed: the forecasts of Pending Reservations are due for a refresh."""
        self._stale_forecasts = True
        self._wake.set()

    def snapshot(self, now: datetime) -> ClusterState:
        """The engine's view, shared by the requests of a burst while the cache is unchanged.

        Rebuilding it replays the whole ledger; one taken under the same cache version less than
        ``SNAPSHOT_REUSE`` ago differs only by that instant's GPU-hours.
        """
        version = self.cache.version
        if self._snapshot is not None:
            seen, state = self._snapshot
            if seen == version and timedelta(0) <= now - state.now < SNAPSHOT_REUSE:
                return state
        state = self.cache.snapshot(now, self.options.settings)
        self._snapshot = (version, state)
        return state

    def durations(self, state: ClusterState) -> DurationModel:
        """What the owners' completed Runs say about walltimes, learnt once per cache version."""
        version = self.cache.version
        if self._durations is None or self._durations[0] != version:
            self._durations = (version, learn(state.ledger))
        return self._durations[1]

    # ------------------------------------------------------------------ RESERVE

    async def reserve(self, req: ReserveRequest) -> ReserveReply:
        """Create (or return) the blocked Run's Reservation with its computed ETA."""
        started = time.perf_counter()
        try:
            async with self._lock:
                return await self._reserve(req)
        finally:
            metrics.FORECAST_LATENCY.observe(time.perf_counter() - started)

    def _views(self) -> list[rv.ReservationView]:
        """Every valid Reservation, each parsed once per resourceVersion (a burst re-reads all
        of them on every request)."""
        views = []
        parsed: dict[str, tuple[str, rv.ReservationView]] = {}
        for obj in self.cache.reservation_objects():
            meta = _meta(obj)
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            version = str(meta.get("resourceVersion") or "")
            known = self._parsed.get(key)
            if known is not None and version and known[0] == version:
                parsed[key] = known
                views.append(known[1])
                continue
            try:
                view = rv.read_reservation(obj)
                self._bad.pop(key, None)
            except ValueError as exc:
                if self._bad.get(key) != str(exc):
                    log.warning("reservation ignored", extra={"key": key, "error": str(exc)})
                self._bad[key] = str(exc)
                continue
            parsed[key] = (version, view)
            views.append(view)
        self._parsed = parsed
        return views

    async def _live_for(self, run: RunRef, now: datetime) -> rv.ReservationView | None:
        """The Run's live Reservation for this incarnation and spec, if any (earliest first);
        live ones made for an older spec or incarnation are canceled on the way."""
        facts = rv.RunFacts(run.uid, run.generation)
        found = []
        for view in self._views():
            if view.run != run.key or not view.live:
                continue
            why = rv.cancel_reason(view, facts)
            if why is not None and view.key not in self._activating:
                await self._status(view, rv.canceled_status(view.status, now, *why))
                continue
            if view.run_uid in (None, label_value(run.uid)):
                found.append(view)
        return min(found, key=lambda v: (v.earliest_start, v.name)) if found else None

    async def _reserve(self, req: ReserveRequest) -> ReserveReply:
        now = utcnow()
        state = self.snapshot(now)
        live = await self._live_for(req.run, now)
        if live is not None:
            confidence = (live.status.get("forecast") or {}).get("confidence")
            if live.state is None:
                await self._initialise(live, state, now)
            log.info(
                "run already reserved",
                extra={"run": run_label(req.run.key), "reservation": live.key},
            )
            return ReserveReply(
                reservation=live.name,
                earliest_start=live.earliest_start,
                confidence=str(confidence or ""),
            )
        why = rv.unreservable(request_scope(req.request, state), req.request.selector)
        if why is not None:
            log.info("run not reservable", extra={"run": run_label(req.run.key), "why": why})
            raise Refused(UNRESERVABLE, why)
        blocked = Blocked(req.stage, req.reason, req.message, req.shortfall)
        fc = forecast(req.request, state, blocked)
        expected = expected_start(req.request, state, self.durations(state), fc.earliest_start)
        taken = [v.name for v in self._views() if v.namespace == req.run.namespace]
        name = rv.next_reservation_name(req.run.name, req.run.uid, taken)
        manifest = rv.reservation_manifest(name, req.run, req.request, fc, state.topology)
        obj = await writer.create(self.api, RESERVATIONS, manifest)
        view = rv.read_reservation(obj)
        if view.state is None:
            obj = await writer.patch_status(
                self.api,
                RESERVATIONS,
                name,
                rv.pending_status(fc, now, expected),
                namespace=req.run.namespace,
                field_manager=FIELD_MANAGER,
            )
            metrics.ETA.observe(max(0.0, (view.earliest_start - now).total_seconds()))
        log.info(
            "reservation planned",
            extra={
                "run": run_label(req.run.key),
                "reservation": view.key,
                "earliestStart": rfc3339(view.earliest_start),
                "confidence": fc.confidence.value,
                "reason": req.reason,
                "deficit": fc.deficit_gpus,
                "conflictSet": [run_label(k) for k in fc.remedies.conflict_set],
            },
        )
        self._wake.set()  # the timer marks the conflict set: once for a whole burst
        return ReserveReply(
            reservation=name,
            earliest_start=view.earliest_start,
            confidence=fc.confidence.value,
        )

    # ------------------------------------------------------------------ the timer

    async def _timer(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.tick_seconds)
            self._wake.clear()
            periodic = time.monotonic() >= self._next_round
            if periodic:
                self._next_round = time.monotonic() + self.options.tick_seconds
            try:
                async with self._lock:
                    await self.tick(utcnow(), periodic=periodic)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("forecast tick failed")

    async def tick(self, now: datetime, *, periodic: bool) -> None:
        """One pass over every Reservation, then the AtRisk marks and the gauges.

        Passes woken by events (every write of a burst wakes the timer) only take the steps
        that change a state; countdowns and AtRisk marks, which every new Reservation moves,
        are written on the periodic pass, once per ``--tick-seconds``.
        """
        views = self._views()
        refresh = self._stale_forecasts and (
            time.monotonic() - self._last_refresh >= self.options.refresh_seconds
        )
        if refresh:
            self._stale_forecasts = False
            self._last_refresh = time.monotonic()
        state: ClusterState | None = None
        retry = timedelta(seconds=self.options.retry_seconds)
        for view in views:
            facts = self._facts(view)
            step = rv.next_step(
                view, facts, now, retry_after=retry, in_flight=view.key in self._activating
            )
            try:
                if step is rv.Step.INITIALISE or (refresh and step is rv.Step.REFRESH):
                    state = state or self.snapshot(now)
                    view = await self._initialise(view, state, now)
                    step = rv.next_step(view, facts, now, retry_after=retry)
                if periodic or step is not rv.Step.REFRESH:
                    await self._act(view, step, now)
            except KubeError as exc:
                log.warning(
                    "reservation update failed",
                    extra={"reservation": view.key, "step": step.value, "error": str(exc)},
                )
            except Exception:  # one bad Reservation must not starve the others
                log.exception(
                    "reservation step failed", extra={"reservation": view.key, "step": step.value}
                )
        if periodic:
            await self._reconcile_risk(now)
        self._gauges(self._views(), now)

    @staticmethod
    def _identity(run_obj: Obj) -> tuple[str, int]:
        ref = RunRef.of(run_obj)
        return ref.uid, ref.generation

    async def _act(self, view: rv.ReservationView, step: rv.Step, now: datetime) -> None:
        if step is rv.Step.NOTHING or step is rv.Step.INITIALISE:
            return
        if step is rv.Step.CANCEL:
            why = rv.cancel_reason(view, self._facts(view))
            reason, message = why or ("RunDeleted", "the Run is gone")
            await self._status(view, rv.canceled_status(view.status, now, reason, message))
            log.info(
                "reservation canceled",
                extra={"reservation": view.key, "reason": reason, "detail": message},
            )
        elif step is rv.Step.WAIT_FOR_RUN:
            await self._status(view, rv.waiting_status(view, now), only_if_changed=True)
        elif step is rv.Step.REFRESH:
            await self._status(
                view,
                rv.refreshed_status(view.status, view.earliest_start, now),
                only_if_changed=True,
            )
        elif step is rv.Step.ACTIVATE:
            if await self._reforecast(view, now):
                return
            at = now.replace(microsecond=0)  # published in activatedAt; seeds the lottery
            await self._status(view, rv.active_status(view.status, at))
            self._spawn_activation(view, at)
        elif step is rv.Step.RETRY:
            self._spawn_activation(view, view.activated_at or now)

    async def _reforecast(self, view: rv.ReservationView, now: datetime) -> bool:
        """A conservative promise reached without room while walltimes now bound the wait:
        cancel it with reason ``Reforecast`` (admission reserves the Run again at the honest
        ETA) instead of activating and cutting other Runs. True when it did."""
        request = self.cache.run_request(view.run)
        if not view.managed or request is None or not rv.is_conservative(view):
            return False
        later = reforecast_instead(request, self.snapshot(now), view.name)
        if later is None:
            return False
        reason, message = rv.reforecast_reason(*later)
        await self._status(view, rv.canceled_status(view.status, now, reason, message))
        metrics.REFORECASTS.inc()
        log.info("reservation re-forecast", extra={"reservation": view.key, "detail": message})
        return True

    def _facts(self, view: rv.ReservationView) -> rv.RunFacts | None:
        run_obj = self.cache.run_object(view.run)
        if run_obj is None:
            return None
        running = any(
            lease.open and lease.role is not Role.SPARE for lease in self.cache.leases_of(view.run)
        )
        return rv.RunFacts(*self._identity(run_obj), running=running)

    async def _status(
        self, view: rv.ReservationView, status: dict[str, Any], *, only_if_changed: bool = False
    ) -> Obj:
        if only_if_changed and rv.owned_status(view.status) == status:
            return {}
        return await writer.patch_status(
            self.api,
            RESERVATIONS,
            view.name,
            status,
            namespace=view.namespace,
            field_manager=FIELD_MANAGER,
        )

    async def _initialise(
        self, view: rv.ReservationView, state: ClusterState, now: datetime
    ) -> rv.ReservationView:
        """Record the Run incarnation (an administrator's) and publish the slice's forecast."""
        run_obj = self.cache.run_object(view.run)
        request = self.cache.run_request(view.run)
        if run_obj is None or request is None:
            return view
        if view.run_uid is None:
            meta = rv.run_identity_metadata(view, RunRef.of(run_obj))
            await writer.apply(
                self.api,
                RESERVATIONS,
                {"metadata": meta},
                field_manager=FIELD_MANAGER,
            )
        target = Target(
            view.namespace,
            view.name,
            view.uid,
            now,
            nodes=view.nodes,
            strict=not view.managed,
        )
        seen = preview(request, state, target)
        confidence = (view.status.get("forecast") or {}).get("confidence")
        expected = expected_start(
            request, state, self.durations(state), view.earliest_start, own_claim=view.name
        )
        status = rv.preview_status(
            deficit=seen.deficit,
            scope=seen.scope,
            remedies=seen.remedies,
            reason=seen.reason if view.state is None or not view.managed else _reason(view),
            message=seen.message if view.state is None or not view.managed else _message(view),
            earliest_start=view.earliest_start,
            now=now,
            confidence=confidence if isinstance(confidence, str) else None,
            funding_envelope=seen.funding_envelope,
            expected=expected,
            open_claims=open_claims(state.claims, seen.scope, view.name),
        )
        for key in ("activatedAt", "canceledAt"):
            if key in view.status:
                status[key] = view.status[key]
        if view.state is ReservationState.ACTIVE:
            status["state"] = view.state.value
        obj = await self._status(view, status, only_if_changed=True)
        if view.state is None:
            log.info(
                "reservation initialised",
                extra={
                    "reservation": view.key,
                    "run": run_label(view.run),
                    "earliestStart": rfc3339(view.earliest_start),
                    "deficit": seen.deficit,
                },
            )
        return rv.read_reservation(obj) if obj else view

    def _spawn_activation(self, view: rv.ReservationView, at: datetime) -> None:
        task = asyncio.create_task(self._activate(view, at), name=f"activate-{view.key}")
        self._activating[view.key] = task

    async def _activate(self, view: rv.ReservationView, at: datetime) -> None:
        # No time in the request: the resolver reads activatedAt (published above) itself.
        request = ActivateRequest(namespace=view.namespace, name=view.name, uid=view.uid)
        log.info("activating reservation", extra={"reservation": view.key, "at": rfc3339(at)})
        try:
            reply = await self.runtime.request(
                ACTIVATE, request, timeout=self.options.activate_timeout
            )
            result = "released" if reply.released else "not_released"
            log.info(
                "reservation activation answered",
                extra={
                    "reservation": view.key,
                    "released": reply.released,
                    "seed": reply.seed,
                    "detail": reply.message,
                },
            )
        except BusError as exc:
            result = "error"
            log.warning(
                "ACTIVATE failed; retried later",
                extra={"reservation": view.key, "error": str(exc)},
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            result = "error"
            log.exception("ACTIVATE failed", extra={"reservation": view.key})
        finally:
            self._activating.pop(view.key, None)
            self._wake.set()
        metrics.ACTIVATIONS.labels(result).inc()

    # ------------------------------------------------------------------ AtRisk

    async def _reconcile_risk(self, now: datetime) -> None:
        """Bring every Run's AtRisk condition in line with the live Reservations."""
        current = rv.risks(self._views())
        runs: dict[RunKey, Obj] = {}
        for obj in self.cache.objects("runs").values():
            meta = _meta(obj)
            key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            if key in current or (rv.condition_of(obj) or {}).get("status") == "True":
                runs[key] = obj
        plan = rv.risk_plan(current, runs, now, self._unseen_marks())
        for key, condition in [*plan.mark.items(), *plan.clear.items()]:
            await self._run_condition(key, condition)
        metrics.AT_RISK.set(len([k for k in current if k in runs]))

    def _unseen_marks(self) -> dict[RunKey, dict[str, Any]]:
        """AtRisk conditions written to Runs (same incarnation) the cache does not show yet."""
        unseen: dict[RunKey, dict[str, Any]] = {}
        for key, (uid, condition) in list(self._risk_sent.items()):
            obj = self.cache.run_object(key)
            if (
                obj is None
                or RunRef.of(obj).uid != uid
                or rv.same_mark(rv.condition_of(obj), condition)
            ):
                del self._risk_sent[key]
            else:
                unseen[key] = condition
        return unseen

    async def _run_condition(self, key: RunKey, condition: dict[str, Any]) -> None:
        body: dict[str, Any] = {"conditions": [condition]}
        try:
            obj = await writer.patch_status(
                self.api, RUNS, key[1], body, namespace=key[0], field_manager=FIELD_MANAGER
            )
        except KubeError as exc:
            if exc.status != 404:
                log.warning("AtRisk update failed: %s", exc, extra={"run": run_label(key)})
            return
        self._risk_sent[key] = (RunRef.of(obj).uid, condition)

    # ------------------------------------------------------------------ gauges

    def _gauges(self, views: list[rv.ReservationView], now: datetime) -> None:
        counts = dict.fromkeys((s.value for s in ReservationState), 0)
        backlog = 0
        for view in views:
            state = view.state.value if view.state is not None else ReservationState.PENDING.value
            counts[state] += 1
            if state == ReservationState.PENDING.value:
                backlog += rv.countdown(view.earliest_start, now)
        for state, count in counts.items():
            metrics.RESERVATIONS.labels(state).set(count)
        metrics.BACKLOG.set(backlog)


def _reason(view: rv.ReservationView) -> str:
    value = view.status.get("reason")
    return value if isinstance(value, str) and value else "Reserved"


def _message(view: rv.ReservationView) -> str:
    value = view.status.get("message")
    return value if isinstance(value, str) else ""


async def serve(cfg: ServiceConfig, options: ForecastOptions) -> int:
    """Run one forecaster process until SIGTERM/SIGINT (exit status 0)."""
    await serve_service(cfg, lambda runtime, api: Forecaster(runtime, api, options))
    log.info("forecast stopped")
    return 0
