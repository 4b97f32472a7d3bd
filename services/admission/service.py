"""The admission service: a thin async shell around ``shared.control.run_status`` and friends.

It watches Runs, Budgets, Leases, Nodes, Reservations (``ClusterCache``) and Namespaces, and
reconciles one Run at a time per key (``WorkQueue``) whenever a Run, Lease, Reservation or
Namespace changes, a ``LEDGER`` or ``RUN_CHANGED`` event arrives, or the periodic resync fires.
Every decision is a pure function (``assess``, cover, bind plan, grow, shrink); this module only
gathers facts, sends ``PLAN``/``COMMIT``/``RESERVE`` requests and applies status with server-side
apply under the field manager ``jobtree-admission``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes_asyncio.client import ApiClient

from services.admission import metrics
from services.admission.config import FIELD_MANAGER, AdmissionConfig
from services.admission.queue import WorkQueue
from shared.api.lease import label_value
from shared.bus import (
    COMMIT,
    LEDGER,
    PLAN,
    RESERVE,
    RUN_CHANGED,
    UNRESERVABLE,
    BusError,
    CommitRequest,
    LeaseEnd,
    LedgerEvent,
    PlanRequest,
    ReserveRequest,
    RunChanged,
    RunRef,
    ServiceRuntime,
)
from shared.bus.tracing import run_decision
from shared.control import run_status as rs
from shared.control.budget_status import budget_status, envelope_figures, material
from shared.control.dependencies import check_after
from shared.control.pod_policy import check_template
from shared.control.reservations import LABEL_MANAGED_BY, MANAGED_BY
from shared.control.run_metrics import (
    PHASES,
    first_start_wait,
    phase_counts,
    run_flavor,
)
from shared.control.tenancy import check_owner
from shared.engine.admit import Blocked, resources_refusal, widths
from shared.engine.bindplan import BindIntent, bind_plan, to_leases
from shared.engine.capacity import RESOURCES_DO_NOT_FIT
from shared.engine.cover import CoverDenied, cover
from shared.engine.elasticity import Grow, grow
from shared.engine.fill import is_fill
from shared.engine.model import Closure, CoverFailure, Lease, LeaseReason, RunKey, RunRequest
from shared.engine.offers import Funding
from shared.engine.pack import PackFailure
from shared.kube import BUDGETS, NAMESPACES, RUNS, KubeError, make_client
from shared.kube.cache import ClusterCache
from shared.kube.informer import EventType, Informer, Obj
from shared.kube.translate import (
    LABEL_RUN_UID,
    TranslateError,
    budget_record,
    reservation_run_key,
    run_request,
)
from shared.kube.writer import get, patch_status

log = logging.getLogger(__name__)

LIVE_RESERVATION_STATES = (None, "", "Pending", "Active")
INFLIGHT_TIMEOUT = 30.0
BUDGET_STALE = timedelta(minutes=5)
PACKER_UNAVAILABLE = "PackerUnavailable"
BINDER_UNAVAILABLE = "BinderUnavailable"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _rv(obj: Obj | None) -> int:
    text = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(text))
    except ValueError:
        return -1


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _run_ref(request: RunRequest, generation: int) -> RunRef:
    return RunRef(
        namespace=request.key[0], name=request.key[1], uid=request.uid, generation=generation
    )


def _budget_of(envelopes: Sequence[str]) -> dict[str, str]:
    """Envelope key ``<budget>/<envelope>`` → Budget name, for the binder."""
    return {key: key.rpartition("/")[0] for key in envelopes}


# -- outcomes of one start attempt ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bound:
    intent: BindIntent
    width: int


@dataclass(frozen=True, slots=True)
class _Conflict:
    message: str


@dataclass(frozen=True, slots=True)
class _Unavailable:
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class _Invalid:
    """Refused for good: the request is malformed, or no node could ever hold a rank."""

    message: str
    reason: str = rs.INVALID_REQUEST


_Attempt = _Bound | _Conflict | _Unavailable | _Invalid | Blocked


class AdmissionService:
    """One admission process: caches, work queue, workers, budget writer, optional webhook."""

    def __init__(
        self,
        config: AdmissionConfig,
        *,
        api: ApiClient | None = None,
        runtime: ServiceRuntime | None = None,
    ) -> None:
        self.config = config
        self._api = api
        self._own_api = api is None
        self.runtime = runtime or ServiceRuntime.from_config(config.service)
        self.queue: WorkQueue[RunKey] = WorkQueue()
        self._cache: ClusterCache | None = None
        self._namespaces: Informer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._written: dict[RunKey, Obj] = {}
        self._backoff: dict[RunKey, tuple[int, float]] = {}
        self._inflight: dict[RunKey, tuple[frozenset[str], bool, float]] = {}
        self._early: set[RunKey] = set()
        """Reserved Runs to try starting now (capacity or money freed since they reserved)."""
        self._seen: dict[str, float] = {}
        self._measured: set[str] = set()
        self._dirty_budgets: set[str] = set()
        self._budget_full = True
        self._gauges: dict[str, set[tuple[str, ...]]] = {}
        self._flavors: set[str] = set()
        self._ready = asyncio.Event()
        self.webhook: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def api(self) -> ApiClient:
        if self._api is None:
            raise RuntimeError("admission is not started")
        return self._api

    @property
    def cache(self) -> ClusterCache:
        if self._cache is None:
            raise RuntimeError("admission is not started")
        return self._cache

    @property
    def ready(self) -> asyncio.Event:
        """Set once the caches are synced and the workers run."""
        return self._ready

    async def start(self) -> None:
        """Connect, start caches, subscriptions, workers, loops (and the webhook if configured)."""
        if self._api is None:
            self._api = await make_client(self.config.service.kubeconfig)
        cache = self._cache = ClusterCache(self.api)
        cache.add_listener("runs", self._on_run)
        cache.add_listener("leases", self._on_lease)
        cache.add_listener("reservations", self._on_reservation)
        cache.add_listener("budgets", self._on_budget)
        self._namespaces = Informer(self.api, NAMESPACES)
        self._namespaces.add_listener(self._on_namespace)
        self.runtime.subscribe(LEDGER, self._on_ledger, durable="admission")
        self.runtime.subscribe(RUN_CHANGED, self._on_run_changed, queue="admission")
        await self.runtime.start()
        await cache.start()
        self._spawn(self._namespaces.run(), "namespaces")
        self._spawn(self._boot(), "boot")
        if self.config.webhook_port is not None:
            from services.admission.webhook import WebhookServer

            self.webhook = WebhookServer.from_config(self.config, self._namespace_annotations)
            await self.webhook.start()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"admission-{name}"))

    async def _boot(self) -> None:
        assert self._namespaces is not None
        while True:
            try:
                await self.cache.wait_ready(timeout=60)
                await asyncio.wait_for(self._namespaces.ready.wait(), 60)
                break
            except TimeoutError:
                log.warning("caches not synced after 60s; still waiting")
        for _ in range(self.config.workers):
            self._spawn(self._worker(), "worker")
        self._spawn(self._resync_loop(), "resync")
        self._spawn(self._budget_loop(), "budgets")
        for key in self._run_keys():
            self.queue.add(key, refresh=True)
        self.runtime.set_ready(True)
        self._ready.set()
        log.info("admission ready", extra={"runs": len(self._run_keys())})

    async def stop(self) -> None:
        """Stop loops, caches, the webhook and the runtime (drains NATS)."""
        self.runtime.set_ready(False)
        self.queue.close()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.webhook is not None:
            await self.webhook.stop()
        if self._namespaces is not None:
            self._namespaces.stop()
        if self._cache is not None:
            await self._cache.stop()
        await self.runtime.stop()
        if self._own_api and self._api is not None:
            await self._api.close()

    async def run_until_stopped(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop cleanly."""
        try:
            await self.runtime.run_until_stopped()
        finally:
            await self.stop()

    # ------------------------------------------------------------------ triggers

    def _run_keys(self) -> list[RunKey]:
        keys = []
        for obj in self.cache.objects("runs").values():
            meta = _meta(obj)
            keys.append((str(meta.get("namespace")), str(meta.get("name"))))
        return keys

    def _enqueue_waiting(self, namespace: str | None = None, *, growing: bool = False) -> None:
        """Queue Runs that may be able to start now (not started), and with ``growing`` (capacity
        or money freed) also running Runs below their desired width and Reserved Runs, which
        then try to start before their Reservation's earliestStart."""
        for obj in self.cache.objects("runs").values():
            meta = _meta(obj)
            if namespace is not None and meta.get("namespace") != namespace:
                continue
            status = obj.get("status") or {}
            phase = status.get("phase") or ""
            key = (str(meta.get("namespace")), str(meta.get("name")))
            if growing and phase == rs.RESERVED:
                self._early.add(key)
                self.queue.add(key)
            elif phase in ("", rs.PENDING) or (growing and rs.may_grow(status)):
                self.queue.add(key)

    def _on_run(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        meta = _meta(obj)
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event == "DELETED":
            uid = str(meta.get("uid") or "")
            self._seen.pop(uid, None)
            self._measured.discard(uid)
            self._written.pop(key, None)
            self._backoff.pop(key, None)
            self._inflight.pop(key, None)
            self._early.discard(key)
            return
        self.queue.add(key)
        phase = (obj.get("status") or {}).get("phase")
        old_phase = ((old or {}).get("status") or {}).get("phase")
        if phase != old_phase and phase in rs.TERMINAL:
            for other in self.cache.objects("runs").values():
                ometa = _meta(other)
                after = (other.get("spec") or {}).get("after") or []
                if ometa.get("namespace") == key[0] and key[1] in after:
                    self.queue.add((key[0], str(ometa.get("name"))))

    def _on_lease(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        spec = obj.get("spec") or {}
        ref = spec.get("runRef") or {}
        if ref.get("namespace") and ref.get("name"):
            self.queue.add((str(ref["namespace"]), str(ref["name"])))
        if spec.get("paidByBudget"):
            self._dirty_budgets.add(str(spec["paidByBudget"]))
        closed = (obj.get("status") or {}).get("closed")
        if closed and not ((old or {}).get("status") or {}).get("closed"):
            self._enqueue_waiting(growing=True)

    def _on_reservation(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        with contextlib.suppress(TranslateError, KeyError):
            self.queue.add(reservation_run_key(obj))

    def _on_budget(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        self._dirty_budgets.add(str(_meta(obj).get("name")))
        if old is None or _meta(old).get("generation") != _meta(obj).get("generation"):
            self._enqueue_waiting(growing=True)  # a spec change may fund a waiting Run

    def _on_namespace(self, event: EventType, obj: Obj, old: Obj | None) -> None:
        before = _meta(old or {}).get("annotations") or {}
        after = _meta(obj).get("annotations") or {}
        if before != after and self._cache is not None:
            self._enqueue_waiting(str(_meta(obj).get("name")))

    async def _on_ledger(self, event: LedgerEvent) -> None:
        self.queue.add(event.run)
        budget = event.envelope.rpartition("/")[0]
        if budget:
            self._dirty_budgets.add(budget)
        if event.kind == "closed" and self._cache is not None:
            self._enqueue_waiting(growing=True)

    async def _on_run_changed(self, event: RunChanged) -> None:
        self.queue.add((event.namespace, event.name))

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key in self._run_keys():
                self.queue.add(key, refresh=True)
            self._budget_full = True

    # ------------------------------------------------------------------ workers

    async def _worker(self) -> None:
        while True:
            key, refresh = await self.queue.get()
            try:
                await self.reconcile(key, refresh=refresh)
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.RECONCILES.labels("error").inc()
                log.exception("reconcile failed", extra={"run": "/".join(key)})
                self.queue.add_after(key, self.config.backoff_seconds)
            finally:
                self.queue.done(key)

    def _current(self, key: RunKey) -> Obj | None:
        """The cached Run, or the newer object our last status write returned."""
        cached = self.cache.run_object(key)
        written = self._written.get(key)
        if cached is None:
            return None
        if written is not None:
            same = _meta(written).get("uid") == _meta(cached).get("uid")
            if same and _rv(written) > _rv(cached):
                return written
            if not same or _rv(cached) >= _rv(written):
                self._written.pop(key, None)
        return cached

    async def reconcile(self, key: RunKey, *, refresh: bool = False) -> None:
        """Bring one Run's status (and its start, growth or shrink) up to date."""
        obj = self._current(key)
        if obj is None or _meta(obj).get("deletionTimestamp"):
            return
        now = utcnow()
        meta = _meta(obj)
        uid = str(meta.get("uid") or "")
        generation = int(meta.get("generation") or 0)
        status = obj.get("status") or {}
        try:
            request = run_request(obj)
        except TranslateError as exc:
            await self._invalid(key, obj, str(exc), now)
            return
        self._first_seen(uid, request.flavor, status)
        try:
            annotations = await self._namespace_annotations(key[0])
        except KubeError as exc:  # no start while tenancy cannot be checked; not a verdict either
            log.warning("namespace %s unreadable: %s", key[0], exc)
            self.queue.add_after(key, self.config.backoff_seconds)
            return
        facts = rs.Facts(
            request=request,
            generation=generation,
            status=status,
            leases=self._leases_of(key, uid, meta),
            now=now,
            denied=check_owner(request.owner, key[0], annotations, self.config.default_owner_globs),
            policy=check_template((obj.get("spec") or {}).get("template"), self.config.pod_policy),
            dependency=check_after((obj.get("spec") or {}).get("after"), self._phases(key[0])),
            reservation=self._live_reservation(key, uid),
            spare_factor=self.config.settings.spare_factor,
            grace=timedelta(seconds=self.config.grace_seconds),
        )
        verdict = rs.assess(facts)
        if isinstance(verdict, rs.Hold):
            metrics.RECONCILES.labels("hold").inc()
            if verdict.retry is not None:
                self.queue.add_after(key, verdict.retry.total_seconds())
        elif isinstance(verdict, rs.Settle):
            metrics.RECONCILES.labels("settle").inc()
            await self._write(key, obj, verdict.status, hours_matter=refresh)
            if verdict.result:
                self._measure(uid, request.flavor, verdict.result)
            early = key in self._early
            self._early.discard(key)
            resv = facts.reservation if verdict.result == "reserved" else None
            if early and resv is not None and resv.may_start_early:
                with run_decision(key[0], key[1], uid):
                    await self._start_early(key, obj, facts)
        elif isinstance(verdict, rs.Observe):
            metrics.RECONCILES.labels("observe").inc()
            await self._write(key, obj, verdict.status, hours_matter=refresh)
            self._measure(uid, request.flavor, "bound")
            await self._elastic(key, facts, verdict)
        else:
            metrics.RECONCILES.labels("start").inc()
            with run_decision(key[0], key[1], uid):  # the root span of the Run's trace
                await self._start(key, obj, facts)

    # ------------------------------------------------------------------ facts

    def _leases_of(self, key: RunKey, uid: str, meta: Mapping[str, Any]) -> tuple[Lease, ...]:
        """This incarnation's Leases: the run-uid label when present, else started after the
        Run's creation (a re-created Run with the same name never inherits old Leases)."""
        created = rs.parse_stamp(meta.get("creationTimestamp"))
        want = label_value(uid) if uid else None
        out = []
        for obj in self.cache.lease_objects_of(key):
            lease = self.cache.lease(str(_meta(obj).get("name")))
            if lease is None:
                continue
            label = (_meta(obj).get("labels") or {}).get(LABEL_RUN_UID)
            if label is not None and want is not None:
                if label != want:
                    continue
            elif created is not None and lease.start < created - timedelta(seconds=1):
                continue
            out.append(lease)
        return tuple(out)

    def _phases(self, namespace: str) -> dict[str, str | None]:
        phases: dict[str, str | None] = {}
        for obj in self.cache.objects("runs").values():
            meta = _meta(obj)
            if meta.get("namespace") == namespace:
                phases[str(meta.get("name"))] = (obj.get("status") or {}).get("phase")
        return phases

    def _live_reservation(self, key: RunKey, uid: str) -> rs.LiveReservation | None:
        """The Run's Pending/Active Reservation (earliest first); one labelled for another
        incarnation of the Run (run-uid label) does not count."""
        live = []
        want = label_value(uid) if uid else None
        for obj in self.cache.reservation_objects():
            try:
                if reservation_run_key(obj) != key:
                    continue
            except TranslateError:
                continue
            label = (_meta(obj).get("labels") or {}).get(LABEL_RUN_UID)
            if label is not None and want is not None and label != want:
                continue
            status = obj.get("status") or {}
            if status.get("state") not in LIVE_RESERVATION_STATES:
                continue
            at = rs.parse_stamp((obj.get("spec") or {}).get("earliestStart"))
            if at is None:
                continue
            labels = _meta(obj).get("labels") or {}
            live.append(
                rs.LiveReservation(
                    name=str(_meta(obj).get("name")),
                    earliest_start=at,
                    state=str(status.get("state") or "Pending"),
                    message=str(status.get("message") or ""),
                    managed=labels.get(LABEL_MANAGED_BY) == MANAGED_BY,
                )
            )
        return min(live, key=lambda r: (r.earliest_start, r.name)) if live else None

    async def _namespace_annotations(self, namespace: str) -> Mapping[str, str] | None:
        """The Namespace's annotations (read through when the cache has not seen it yet); None
        when it does not exist (which authorises nobody). A failed lookup raises ``KubeError``:
        the webhook then denies, the reconcile retries later without starting the Run."""
        obj = self._namespaces.get(namespace) if self._namespaces is not None else None
        if obj is None:
            obj = await get(self.api, NAMESPACES, namespace)
        if obj is None:
            return None
        annotations = _meta(obj).get("annotations")
        return annotations if isinstance(annotations, Mapping) else {}

    # ------------------------------------------------------------------ writes and metrics

    async def _write(
        self, key: RunKey, obj: Obj, status: dict[str, Any], *, hours_matter: bool
    ) -> None:
        if not rs.needs_write(obj.get("status"), status, hours_matter=hours_matter):
            return
        try:
            stored = await patch_status(
                self.api, RUNS, key[1], status, namespace=key[0], field_manager=FIELD_MANAGER
            )
        except KubeError as exc:
            if exc.status == 404:
                return
            raise
        self._written[key] = stored
        waited = first_start_wait(obj, status, utcnow())
        if waited is not None:
            metrics.RUN_START_WAIT.labels(run_flavor(obj)).observe(waited)
        log.info(
            "run status",
            extra={
                "run": "/".join(key),
                "phase": status.get("phase"),
                "status_message": status.get("message"),
            },
        )

    async def _invalid(self, key: RunKey, obj: Obj, problem: str, now: datetime) -> None:
        status = obj.get("status") or {}
        if status.get("phase") in rs.TERMINAL:
            return
        meta = _meta(obj)
        message = rs.typed_message(rs.INVALID_REQUEST, problem)
        generation = int(meta.get("generation") or 0)
        doc: dict[str, Any] = {
            "phase": rs.FAILED,
            "message": message,
            "restarts": status.get("restarts") or 0,
            "observedGeneration": generation,
            "conditions": rs.merge_conditions(
                status,
                [rs.Cond(rs.FAILED_CONDITION, "True", rs.INVALID_REQUEST, message)],
                now=now,
                generation=generation,
            ),
        }
        await self._write(key, obj, doc, hours_matter=True)

    def _first_seen(self, uid: str, flavor: str, status: Mapping[str, Any]) -> None:
        if uid in self._seen or uid in self._measured:
            return
        if status.get("phase"):
            self._measured.add(uid)  # decided before this process saw it: no latency sample
            return
        self._seen[uid] = time.monotonic()
        metrics.RUNS_SUBMITTED.labels(flavor).inc()

    def _measure(self, uid: str, flavor: str, result: str) -> None:
        started = self._seen.pop(uid, None)
        if started is None or uid in self._measured:
            return
        self._measured.add(uid)
        metrics.ADMISSION_LATENCY.labels(flavor, result).observe(time.monotonic() - started)

    # ------------------------------------------------------------------ start: cover, PLAN, COMMIT

    async def _start(self, key: RunKey, obj: Obj, facts: rs.Facts) -> None:
        gen = facts.generation
        backoff = self._backoff.get(key)
        if backoff is not None and backoff[0] == gen and backoff[1] > time.monotonic():
            self.queue.add_after(key, backoff[1] - time.monotonic())
            return
        self._backoff.pop(key, None)
        request, uid = facts.request, facts.request.uid
        outcome: _Attempt | None = None
        for attempt in range(max(1, self.config.conflict_retries)):
            outcome = await self._attempt(request, facts)
            if not isinstance(outcome, _Conflict):
                break
            metrics.COMMITS.labels("Start", "conflict").inc()
            log.info("bind conflict", extra={"run": "/".join(key), "conflict": outcome.message})
            await asyncio.sleep(0.2 * (attempt + 1))
        assert outcome is not None
        if isinstance(outcome, _Bound):
            metrics.COMMITS.labels("Start", "ok").inc()
            status = rs.bound_status(facts, to_leases(outcome.intent))
            await self._write(key, obj, status, hours_matter=True)
            self._measure(uid, request.flavor, "bound")
            self.queue.add_after(key, 2.0)
            return
        if isinstance(outcome, _Invalid):
            status = rs.failed_status(facts, outcome.reason, outcome.message)
            await self._write(key, obj, status, hours_matter=True)
            self._measure(uid, request.flavor, "failed")
            return
        if isinstance(outcome, Blocked):
            await self._reserve(key, obj, facts, outcome)
            return
        if isinstance(outcome, _Conflict):
            reason = rs.BIND_CONFLICT
            message = (
                f"{reason}: the binder rejected the bind {self.config.conflict_retries} times "
                f"({outcome.message}); retrying"
            )
        else:
            reason, message = outcome.reason, outcome.message
        await self._write(key, obj, rs.pending_status(facts, reason, message), hours_matter=True)
        self._back_off(key, gen)

    async def _start_early(self, key: RunKey, obj: Obj, facts: rs.Facts) -> None:
        """A Reserved Run tries to start now: capacity or money freed before its ETA. Only a bind
        changes anything (the forecaster then cancels the Reservation, ``StartedEarly``); a Run
        that still does not fit keeps its Reservation, which still protects its place."""
        outcome = await self._attempt(facts.request, facts)
        if isinstance(outcome, _Conflict):
            metrics.COMMITS.labels("Start", "conflict").inc()
        if not isinstance(outcome, _Bound):
            return
        metrics.COMMITS.labels("Start", "ok").inc()
        metrics.EARLY_STARTS.inc()
        log.info("reserved run started early", extra={"run": "/".join(key)})
        status = rs.bound_status(facts, to_leases(outcome.intent))
        await self._write(key, obj, status, hours_matter=True)
        self.queue.add_after(key, 2.0)

    def _back_off(self, key: RunKey, generation: int, delay: float | None = None) -> None:
        delay = self.config.backoff_seconds if delay is None else delay
        self._backoff[key] = (generation, time.monotonic() + delay)
        self.queue.add_after(key, delay)

    async def _attempt(self, request: RunRequest, facts: rs.Facts) -> _Attempt:
        """Cover each width (widest first), PLAN it, COMMIT the first that fits.

        An opportunistic Run that asks for spares is first tried without them: placed as fill
        inside other Runs' spares it holds none of its own, so its envelopes need not pay for
        them. If the packer answers that attempt with an ordinary placement instead, the Run is
        planned again with its spares.
        """
        settings = self.config.settings
        state = self.cache.snapshot(utcnow(), settings)
        refused = resources_refusal(request, state.topology)
        if refused is not None:
            return _Invalid(refused, RESOURCES_DO_NOT_FIT)
        ref = _run_ref(request, facts.generation)
        blocked: Blocked | None = None
        for width in widths(request):
            sized = dataclasses.replace(request, total_gpus=width)
            shapes = [sized]
            if sized.opportunistic and sized.spares_per_group:
                shapes.insert(0, dataclasses.replace(sized, spares_per_group=0))
            for shape in shapes:
                for complete in (False, True):  # every offer only when the packer asks for more
                    funding = cover(
                        shape,
                        state.family,
                        state.usage,
                        now=state.now,
                        default_duration=settings.default_duration,
                        complete=complete,
                    )
                    if isinstance(funding, CoverDenied):
                        break
                    try:
                        reply = await self.runtime.request(
                            PLAN,
                            PlanRequest(run=ref, request=shape, funding=funding),
                            timeout=self.config.plan_timeout,
                        )
                    except BusError as exc:
                        return _Unavailable(
                            PACKER_UNAVAILABLE,
                            f"{PACKER_UNAVAILABLE}: PLAN failed ({exc.code} {exc.message})",
                        )
                    if reply.reason != PackFailure.MORE_OFFERS.value or funding.complete:
                        break
                if isinstance(funding, CoverDenied):
                    if funding.reason is CoverFailure.INVALID_REQUEST:
                        return _Invalid(funding.message)
                    blocked = Blocked(
                        "cover", funding.reason.value, funding.message, funding.shortfall
                    )
                    continue
                if reply.placement is None:
                    blocked = Blocked("pack", reply.reason or "NoFit", reply.message, 1)
                    continue
                if shape is not sized and not is_fill(reply.placement):
                    continue  # an ordinary placement: that one must hold the Run's spares
                intent = bind_plan(
                    shape,
                    reply.placement,
                    now=utcnow(),
                    reason=LeaseReason.START,
                    generation=facts.generation,
                    attempt=facts.restarts,
                )
                return await self._commit(ref, intent, reply.version, funding, "Start", width)
        assert blocked is not None
        return blocked

    async def _commit(
        self,
        ref: RunRef,
        intent: BindIntent,
        version: int,
        funding: Funding,
        reason: str,
        width: int,
    ) -> _Attempt:
        envelopes = [lease.envelope for lease in intent.leases]
        envelopes += [offer.key for offer in funding.offers]
        commit = CommitRequest(
            key=intent.key,
            run=ref,
            version=version,
            leases=list(intent.leases),
            pods=list(intent.pods),
            budget_of=_budget_of(envelopes),
            reason=reason,
        )
        try:
            reply = await self.runtime.request(COMMIT, commit, timeout=self.config.commit_timeout)
        except BusError as exc:
            return _Unavailable(
                BINDER_UNAVAILABLE,
                f"{BINDER_UNAVAILABLE}: COMMIT failed ({exc.code} {exc.message})",
            )
        if not reply.ok:
            return _Conflict(reply.conflict or "rejected")
        return _Bound(intent, width)

    async def _reserve(self, key: RunKey, obj: Obj, facts: rs.Facts, blocked: Blocked) -> None:
        """Blocked now: ask the forecaster for a Reservation; Pending when it does not answer."""
        message = rs.typed_message(blocked.reason, blocked.message)
        request = ReserveRequest(
            run=_run_ref(facts.request, facts.generation),
            request=facts.request,
            stage=blocked.stage,
            reason=blocked.reason,
            message=message,
            shortfall=blocked.shortfall,
        )
        try:
            reply = await self.runtime.request(
                RESERVE, request, timeout=self.config.reserve_timeout
            )
        except BusError as exc:
            if exc.code == UNRESERVABLE:  # a typed answer: nothing to wait for until nodes join
                reason = exc.message.partition(":")[0] or blocked.reason
                status = rs.pending_status(facts, reason, exc.message)
                await self._write(key, obj, status, hours_matter=True)
                self._back_off(key, facts.generation, 6 * self.config.backoff_seconds)
                return
            note = f"{message} (forecast unavailable: {exc.code} {exc.message})"
            status = rs.pending_status(facts, blocked.reason, message, condition_message=note)
            await self._write(key, obj, status, hours_matter=True)
            self._back_off(key, facts.generation)
            return
        status = rs.reserved_status(
            facts,
            reservation=reply.reservation,
            earliest_start=reply.earliest_start,
            reason=blocked.reason,
            message=message,
        )
        await self._write(key, obj, status, hours_matter=True)
        self._measure(facts.request.uid, facts.request.flavor, "reserved")
        self.queue.add_after(key, 2.0)

    # ------------------------------------------------------------------ growth and shrink

    def _settled(self, key: RunKey, leases: Sequence[Lease]) -> bool:
        """False while a grow/shrink commit is not yet visible in the cache (within a timeout)."""
        pending = self._inflight.get(key)
        if pending is None:
            return True
        names, ending, deadline = pending
        by_name = {lease.name: lease for lease in leases}
        if ending:
            seen = all(n in by_name and not by_name[n].open for n in names)
        else:
            seen = all(n in by_name for n in names)
        if seen or time.monotonic() > deadline:
            del self._inflight[key]
            return True
        return False

    async def _elastic(self, key: RunKey, facts: rs.Facts, verdict: rs.Observe) -> None:
        if not (verdict.grow or verdict.shrink):
            return
        if not self._settled(key, facts.leases):
            self.queue.add_after(key, 1.0)
            return
        ref = _run_ref(facts.request, facts.generation)
        if verdict.shrink:
            names = sorted(verdict.shrink)
            digest = hashlib.sha256("\x1f".join([facts.request.uid, *names]).encode())
            commit = CommitRequest(
                key=f"{key[1][:200]}-shrink-{digest.hexdigest()[:10]}",
                run=ref,
                version=self.cache.version,
                ends=[LeaseEnd(name=n, closure=Closure.SHRINK.value) for n in names],
                reason="Shrink",
            )
            try:
                reply = await self.runtime.request(
                    COMMIT, commit, timeout=self.config.commit_timeout
                )
            except BusError as exc:
                log.warning("shrink commit failed", extra={"run": "/".join(key), "error": str(exc)})
                metrics.COMMITS.labels("Shrink", "unavailable").inc()
                self.queue.add_after(key, self.config.backoff_seconds)
                return
            metrics.COMMITS.labels("Shrink", "ok" if reply.ok else "conflict").inc()
            if reply.ok:
                self._inflight[key] = (
                    frozenset(names),
                    True,
                    time.monotonic() + INFLIGHT_TIMEOUT,
                )
            else:
                self.queue.add_after(key, self.config.backoff_seconds)
            return
        state = self.cache.snapshot(utcnow(), self.config.settings)
        step = grow(facts.request, facts.open_leases, state)
        if not isinstance(step, Grow):
            return  # nothing to grow, or blocked now: the next ledger event or resync retries
        placement = step.start.placement
        sized = dataclasses.replace(facts.request, total_gpus=step.start.width)
        intent = bind_plan(
            sized,
            placement,
            now=state.now,
            reason=LeaseReason.GROW,
            generation=facts.generation,
            attempt=facts.restarts,
        )
        result = await self._commit(
            ref, intent, self.cache.version, step.start.funding, "Grow", step.start.width
        )
        if isinstance(result, _Bound):
            metrics.COMMITS.labels("Grow", "ok").inc()
            self._inflight[key] = (
                frozenset(lease.name for lease in intent.leases),
                False,
                time.monotonic() + INFLIGHT_TIMEOUT,
            )
            self.queue.add_after(key, 1.0)
        else:
            outcome = "conflict" if isinstance(result, _Conflict) else "unavailable"
            metrics.COMMITS.labels("Grow", outcome).inc()
            log.info("grow not committed", extra={"run": "/".join(key), "result": repr(result)})
            self.queue.add_after(key, self.config.backoff_seconds)

    # ------------------------------------------------------------------ budgets

    async def _budget_loop(self) -> None:
        while True:
            full = self._budget_full
            names = set(self.cache.objects("budgets")) if full else set(self._dirty_budgets)
            self._budget_full = False
            self._dirty_budgets.clear()
            self.export_runs()
            if names or full:
                try:
                    await self.write_budgets(names, refresh=full)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("budget status write failed")
                    self._dirty_budgets |= names
            await asyncio.sleep(self.config.budget_interval)

    def export_runs(self) -> None:
        """Refresh ``jobtree_runs_current`` from the Run cache (every phase of a known flavor is
        exported, 0 included, so a panel's line drops to 0 instead of vanishing)."""
        counts = phase_counts(self.cache.objects("runs").values())
        self._flavors |= {flavor for _, flavor in counts}
        for flavor in self._flavors:
            for phase in PHASES:
                metrics.RUNS_CURRENT.labels(phase, flavor).set(counts.get((phase, flavor), 0))

    async def write_budgets(self, names: set[str], *, refresh: bool = False) -> None:
        """Recompute and apply the status of the named Budgets; refresh their metrics."""
        now = utcnow()
        state = self.cache.snapshot(now, self.config.settings)
        objects = self.cache.objects("budgets")
        for name in list(self._gauges):
            if name not in objects:
                self._drop_gauges(name, set())
        for name in sorted(names):
            obj = objects.get(name)
            if obj is None:
                continue
            try:
                record = budget_record(obj)
            except TranslateError as exc:
                log.warning("budget %s skipped: %s", name, exc)
                continue
            self._export(record.name, envelope_figures(record, state.usage, now))
            generation = _meta(obj).get("generation")
            status = budget_status(
                record,
                state.usage,
                now=now,
                generation=int(generation) if generation is not None else None,
            )
            current = obj.get("status") or {}
            updated = rs.parse_stamp(current.get("updatedAt"))
            stale = updated is None or now - updated >= BUDGET_STALE
            if material(current) == material(status) and not (refresh and stale):
                continue
            try:
                await patch_status(self.api, BUDGETS, name, status, field_manager=FIELD_MANAGER)
            except KubeError as exc:
                if exc.status != 404:
                    raise

    def _export(self, budget: str, figures: Sequence[Any]) -> None:
        keep: set[tuple[str, ...]] = set()
        for fig in figures:
            for cls, gpus in fig.concurrency_by_class.items():
                labels = (fig.owner, fig.budget, fig.envelope, fig.flavor, cls)
                metrics.BUDGET_CONCURRENCY.labels(*labels).set(gpus)
                keep.add(("c", *labels))
            spare = (fig.owner, fig.budget, fig.envelope, fig.flavor)
            metrics.SPARES_CONCURRENCY.labels(*spare).set(fig.concurrency_by_class.get("spare", 0))
            keep.add(("s", *spare))
            metrics.BUDGET_HEADROOM_GPUS.labels(fig.budget, fig.envelope).set(fig.headroom_gpus)
            keep.add(("h", fig.budget, fig.envelope))
            if fig.headroom_gpu_hours is not None:
                metrics.BUDGET_HEADROOM_GPU_HOURS.labels(fig.budget, fig.envelope).set(
                    fig.headroom_gpu_hours
                )
                keep.add(("hh", fig.budget, fig.envelope))
        self._drop_gauges(budget, keep)
        self._gauges[budget] = keep

    def _drop_gauges(self, budget: str, keep: set[tuple[str, ...]]) -> None:
        for entry in self._gauges.get(budget, set()) - keep:
            kind, *labels = entry
            gauge = {
                "c": metrics.BUDGET_CONCURRENCY,
                "s": metrics.SPARES_CONCURRENCY,
                "h": metrics.BUDGET_HEADROOM_GPUS,
                "hh": metrics.BUDGET_HEADROOM_GPU_HOURS,
            }[kind]
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        if not keep:
            self._gauges.pop(budget, None)
