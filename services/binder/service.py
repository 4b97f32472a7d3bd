"""The binder: the single writer of Leases, Pods and Services (field manager ``jobtree-binder``).

It answers ``COMMIT`` by re-checking the proposal against its own watch caches plus the commits
it wrote but has not seen back yet: that it fits (``shared.control.commit_check``) and that every
write is justified by API-server truth the binder looked up itself — the Run, its namespace's
owners, its dependencies, the paying envelopes, failed nodes, the activated Reservation's audit
(``shared.control.commit_trust``); a proposal is a claim, whoever sent it. Then it applies it in a
fixed order — lease ends (and the pods they free), the Run's headless Service, new Leases, their
Pods — and publishing one ``LEDGER`` event per lease opened or closed. Checks are serialised by
one lock, and a commit's new Leases count against capacity from the moment it is accepted, so the
writes of commits for different Runs overlap (``--commit-concurrency``) without ever overbooking;
commits touching the same Run (its own, or ending its leases) take turns.

It also ends gangs on its own (``shared.control.lifecycle``): on Pod and Run events and on a
periodic tick (walltime) it closes leases Completed, Fail, TimeLimit or Canceled through the same
commit path and nudges admission with ``RUN_CHANGED``.

Only one binder may write at a time. With ``--leader-elect`` replicas hold a
``coordination.k8s.io`` Lease and only the holder serves commits and runs the lifecycle.

A commit is recorded in a JetStream journal (``services.binder.journal``) before anything of it
is written and forgotten once applied; a binder that starts serving, or whose apply failed
part-way, re-applies what the journal still holds, so a crash never leaves half a gang written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import msgspec
from kubernetes_asyncio.client import ApiClient

from services.binder import metrics
from services.binder.election import LeaderElector
from services.binder.journal import Journal
from shared.api import GROUP
from shared.api.lease import LABEL_RUN
from shared.bus import (
    COMMIT,
    LEDGER,
    RUN_CHANGED,
    BusError,
    CommitReply,
    CommitRequest,
    LeaseEnd,
    LedgerEvent,
    RunChanged,
    RunRef,
    ServiceConfig,
    ServiceRuntime,
)
from shared.bus.messages import encode
from shared.bus.process import serve_service
from shared.cli.views import replay_audit
from shared.control import reservations as rv
from shared.control.commit_check import (
    CommitPlan,
    ConflictReason,
    Inflight,
    PodChanges,
    PodKey,
    PodState,
    Rejection,
    assumed_pods,
    intent_lease,
    ledger_view,
    plan_commit,
    pod_changes,
    pods_touched,
    reservation_of,
    same_incarnation,
)
from shared.control.commit_trust import (
    DEFAULT_SKEW,
    LIFECYCLE_PREFIX,
    SHRINK_REASON,
    Authority,
    ReservationTruth,
    RunTruth,
    failed_node_of,
    verify_commit,
)
from shared.control.dependencies import Ready, check_after
from shared.control.lifecycle import Outcome, PodView, RunView, decide
from shared.control.node_health import has_failed, node_condition
from shared.control.pod_policy import POD_POLICY, PodPolicyConfig, check_template
from shared.control.run_status import elastic_step
from shared.control.tenancy import DEFAULT_OWNER_GLOBS, check_owner
from shared.engine.bindplan import LeaseIntent, PodIntent
from shared.engine.model import Lease, RunKey, RunRequest
from shared.engine.state import ClusterState, Settings
from shared.engine.topology import DEFAULT_GPU_RESOURCE
from shared.kube import writer
from shared.kube.cache import ClusterCache
from shared.kube.client import KubeError, request
from shared.kube.informer import Informer, Obj
from shared.kube.resources import (
    GPU_LEASES,
    NAMESPACES,
    NODES,
    PODS,
    RESERVATIONS,
    RUNS,
    SERVICES,
    Resource,
)
from shared.kube.translate import (
    HOLD_IMAGE,
    LABEL_RANK,
    TranslateError,
    headless_service,
    lease_manifest,
    pod_manifest,
    rfc3339,
    run_request,
    service_name,
)

log = logging.getLogger(__name__)

FIELD_MANAGER = "jobtree-binder"
ANNOTATION_LEASES = f"{GROUP}/leases"
"""On a pod: the lease names its rank holds on its node, i.e. which incarnation it is."""
_TRANSIENT = frozenset({0, 429, 500, 502, 503, 504})
SEEN_KEYS = 100_000
"""Commit keys (with a digest of their content) remembered to refuse a key re-used with other
content."""
_T = TypeVar("_T")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class BinderOptions:
    """Operator knobs of the binder."""

    gpu_resource: str = DEFAULT_GPU_RESOURCE
    hold_image: str = HOLD_IMAGE
    tick_seconds: float = 1.0
    """Lifecycle re-evaluation period (walltime limits are checked at least this often)."""
    commit_concurrency: int = 8
    """Commits handled at once; those touching the same Run still take turns."""
    leader_elect: bool = False
    leader_namespace: str = "default"
    leader_lease_seconds: float = 15.0
    default_owner_globs: tuple[str, ...] = DEFAULT_OWNER_GLOBS
    """Owner globs of namespaces without the owners annotation (as admission's)."""
    max_clock_skew: timedelta = DEFAULT_SKEW
    """How far a new Lease's start may be from the binder's clock."""
    settings: Settings = field(default_factory=Settings)
    """Engine settings (``shared.bus.settings``): the commit re-checks' spare factor and default
    duration, the missing-pod grace."""
    pod_policy: PodPolicyConfig = field(default_factory=PodPolicyConfig)
    """Checked again right before pods are written: a Run that bypassed admission gets none."""


# --------------------------------------------------------------------------- pod reading


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def pod_run(obj: Obj) -> RunKey | None:
    """The Run a pod belongs to: its controlling Run owner reference, else its run label."""
    meta = _meta(obj)
    namespace = meta.get("namespace")
    if not isinstance(namespace, str):
        return None
    for ref in meta.get("ownerReferences") or ():
        if isinstance(ref, Mapping) and ref.get("kind") == "Run":
            return (namespace, str(ref.get("name")))
    label = (meta.get("labels") or {}).get(LABEL_RUN)
    return (namespace, label) if isinstance(label, str) else None


def _pod_leases(meta: Mapping[str, Any]) -> tuple[str, ...]:
    text = (meta.get("annotations") or {}).get(ANNOTATION_LEASES) or ""
    return tuple(sorted(n for n in str(text).split(",") if n))


def pod_state(obj: Obj) -> PodState:
    meta = _meta(obj)
    return PodState(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        node=str((obj.get("spec") or {}).get("nodeName") or ""),
        phase=str((obj.get("status") or {}).get("phase") or "Pending"),
        leases=_pod_leases(meta),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def pod_view(obj: Obj) -> PodView:
    meta = _meta(obj)
    try:
        rank = int((meta.get("labels") or {}).get(LABEL_RANK, "-1"))
    except ValueError:
        rank = -1
    state = pod_state(obj)
    return PodView(
        name=state.name,
        rank=rank,
        phase=state.phase,
        leases=frozenset(state.leases),
        deleting=state.deleting,
    )


def ledger_closure_label(closure: str) -> str:
    """Bounded label value: ``RandomPreempt(<seed>)`` → ``RandomPreempt``."""
    return closure.split("(", 1)[0]


MAX_REPLAYS = 30
"""A journaled commit the API server keeps failing is dropped after this many re-applies."""
WRITE_CONCURRENCY = 16
"""API writes of one commit step in flight at once."""


async def _concurrently(calls: Sequence[Callable[[], Awaitable[_T]]]) -> list[_T | BaseException]:
    """Run the calls ``WRITE_CONCURRENCY`` at a time; results (or exceptions) in call order."""
    if len(calls) == 1:
        try:
            return [await calls[0]()]
        except Exception as exc:
            return [exc]
    gate = asyncio.Semaphore(WRITE_CONCURRENCY)

    async def one(call: Callable[[], Awaitable[_T]]) -> _T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls), return_exceptions=True))


def _raise_first(results: Iterable[object]) -> None:
    """Re-raise the first exception among a step's results (after its successes are recorded)."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def commit_digest(req: CommitRequest) -> str:
    """What a commit writes, hashed: everything but the snapshot ``version`` and the planning
    instant of its Leases (a re-plan of the same placement names the same Leases a little
    later; the binder bounds start times by its own clock anyway)."""
    timeless: list[object] = [msgspec.structs.replace(req, version=0, leases=[])]
    timeless += [
        dataclasses.replace(lease, start=_EPOCH, expected_end=None) for lease in req.leases
    ]
    return hashlib.sha256(encode(timeless)).hexdigest()


class CommitFailed(Exception):
    """The API server failed part-way through applying a commit (re-sending completes it)."""


def _representatives(
    intents: Iterable[PodIntent], bodies: Mapping[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One pod body per GPU count: a gang's pods come from one template and differ only in
    name, node, rank and GPUs, so admission control that refuses one refuses all of that size.
    (Dry-running every pod cost one extra API request per rank.)"""
    seen: dict[int, dict[str, Any]] = {}
    for intent in intents:
        seen.setdefault(intent.gpus, bodies[intent.name])
    return list(seen.values())


class RunTurns:
    """One commit at a time per Run; commits of disjoint Runs go ahead side by side.

    A commit takes the turns of every Run it touches (the committing Run and the owners of the
    leases it ends), in sorted order so two commits never wait on each other.
    """

    def __init__(self) -> None:
        self._locks: dict[RunKey, tuple[asyncio.Lock, int]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def turn(self, keys: Iterable[RunKey]) -> AsyncIterator[None]:
        wanted = sorted(set(keys))
        for key in wanted:
            lock, users = self._locks.get(key, (asyncio.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        self._idle.clear()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for key in wanted:
                    await stack.enter_async_context(self._locks[key][0])
                yield
        finally:
            for key in wanted:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)
            if not self._locks:
                self._idle.set()

    def busy(self) -> frozenset[RunKey]:
        """Runs with a commit in progress or waiting."""
        return frozenset(self._locks)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no commit is in progress; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


# --------------------------------------------------------------------------- the service


class Binder:
    """COMMIT endpoint, lifecycle loop and the caches they read."""

    def __init__(
        self, runtime: ServiceRuntime, api: ApiClient, options: BinderOptions | None = None
    ) -> None:
        self.runtime = runtime
        self.api = api
        self.options = options or BinderOptions()
        self.cache = ClusterCache(
            api,
            kinds=("nodes", "budgets", "runs", "reservations", "leases", "pods"),
            gpu_resource=self.options.gpu_resource,
        )
        self.pods = Informer(api, PODS, label_selector=LABEL_RUN)
        self.namespaces = Informer(api, NAMESPACES)
        self._seen: OrderedDict[str, str] = OrderedDict()
        """Commit key → digest of its content, for the commits accepted lately."""
        self._inflight = Inflight()
        self._lock = asyncio.Lock()
        """Held while a commit is checked (and its new leases counted), never while writing."""
        self._turns = RunTurns()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.journal: Journal | None = None
        self._replay_due = False
        self._replay_failures: dict[str, int] = {}
        self.elector: LeaderElector | None = None
        if self.options.leader_elect:
            self.elector = LeaderElector(
                api,
                name="jobtree-binder",
                namespace=self.options.leader_namespace,
                lease_seconds=self.options.leader_lease_seconds,
            )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, sync the caches, then (once leader) serve commits and run the lifecycle."""
        await self.runtime.start()
        self.journal = Journal(self.runtime.nc)
        await self.journal.open()
        for kind in ("runs", "leases"):
            self.cache.add_listener(kind, self._poke)
        self.pods.add_listener(self._poke)
        await self.cache.start()
        self._tasks.append(asyncio.create_task(self.pods.run(), name="binder-pods"))
        self._tasks.append(asyncio.create_task(self.namespaces.run(), name="binder-namespaces"))
        await self.cache.wait_ready()
        await self.pods.ready.wait()
        await self.namespaces.ready.wait()
        if self.elector is not None:
            self._tasks.append(asyncio.create_task(self.elector.run(), name="binder-election"))
            await self.elector.leading.wait()
        await self.replay_journal()
        self.runtime.endpoint(COMMIT, self.commit, concurrency=self.options.commit_concurrency)
        self._tasks.append(asyncio.create_task(self._lifecycle_loop(), name="binder-lifecycle"))
        self.runtime.set_ready(True)
        metrics.LEADER.set(1)
        log.info("binder serving commits")

    async def stop(self) -> None:
        """Finish the commits in progress, stop the loops and caches, then the runtime."""
        self.runtime.set_ready(False)
        self._stopping = True  # later commits are refused: nothing may start a write now
        if not await self._turns.wait_idle(10.0):
            log.warning("stopping with commits still being written; the journal completes them")
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.elector is not None:
            await self.elector.release()
        self.pods.stop()
        self.namespaces.stop()
        await self.cache.stop()
        await self.runtime.stop()
        metrics.LEADER.set(0)

    def _poke(self, *_: object) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ COMMIT

    async def commit(self, req: CommitRequest) -> CommitReply:
        """Handle one commit request (the ``COMMIT`` endpoint)."""
        started = time.perf_counter()
        try:
            if self.elector is not None and not self.elector.is_leader:
                metrics.COMMITS.labels("rejected").inc()
                metrics.CONFLICTS.labels("NotLeader").inc()
                return CommitReply(ok=False, conflict="NotLeader: this binder is not the writer")
            async with self._turns.turn(self._touched(req)):
                if self._stopping:
                    return self._reject(req, "ShuttingDown", "the binder is stopping; re-send")
                return await self._commit_one(req)
        finally:
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)

    def _touched(self, req: CommitRequest) -> set[RunKey]:
        """The Runs a commit writes for: its own and those whose leases it ends."""
        runs = {req.run.key}
        for end in req.ends:
            lease = self.cache.lease(end.name) or self._inflight.opened.get(end.name)
            if lease is not None:
                runs.add(lease.run)
        return runs

    def _snapshot(self, now: datetime) -> ClusterState:
        state = self.cache.snapshot(now, self.options.settings)
        if self._inflight:
            seen = {
                name: lease
                for name in (*self._inflight.opened, *self._inflight.closed)
                if (lease := self.cache.lease(name)) is not None
            }
            self._inflight = self._inflight.settle(seen)
        return state

    def _reject(
        self, req: CommitRequest, rejection: Rejection | str, text: str = ""
    ) -> CommitReply:
        reason = rejection.reason.value if isinstance(rejection, Rejection) else rejection
        conflict = rejection.text if isinstance(rejection, Rejection) else f"{rejection}: {text}"
        metrics.COMMITS.labels("rejected").inc()
        metrics.CONFLICTS.labels(reason).inc()
        log.info(
            "commit rejected",
            extra={
                "key": req.key,
                "run": f"{req.run.namespace}/{req.run.name}",
                "conflict": conflict,
            },
        )
        return CommitReply(ok=False, conflict=conflict)

    async def _commit_one(self, req: CommitRequest, clock: datetime | None = None) -> CommitReply:
        """Look up what justifies the commit, check it under the lock (counting the new leases
        at once), then write without it. ``clock``: when a replayed journal entry was recorded
        (its Leases were proposed then)."""
        now = utcnow()
        authority = await self._authority(req, now, clock or now)
        async with self._lock:
            state = self._snapshot(now)
            plan = plan_commit(req, state, self._inflight)
            if isinstance(plan, Rejection):
                return self._reject(req, plan)
            refused = verify_commit(
                req, plan, state, ledger_view(state, self._inflight), authority
            ) or self._remember(req)
            if refused is not None:
                return self._reject(req, refused)
            pod_states = self._pod_states(pods_touched(plan))
            changes = pod_changes(plan, pod_states)
            counted = [intent_lease(intent) for intent in plan.creates]
            if counted:
                self._inflight = self._inflight.with_commit(counted, [])
            assumed = assumed_pods(changes.create, state)
            self.cache.assume_pods(assumed)
        created: set[str] = set()
        reply: CommitReply | None = None
        try:
            reply = await self._write_commit(req, plan, changes, pod_states, now, created)
            return reply
        finally:
            self._inflight = self._inflight.forget(
                lease.name for lease in counted if lease.name not in created
            )
            if reply is None or not reply.ok:
                self.cache.forget_pods(assumed)

    async def _write_commit(
        self,
        req: CommitRequest,
        plan: CommitPlan,
        changes: PodChanges,
        pod_states: Mapping[PodKey, PodState],
        now: datetime,
        created: set[str],
    ) -> CommitReply:
        """The I/O of an accepted commit; ``created`` collects the leases it wrote."""
        run_obj: Obj | None = None
        leases: list[dict[str, Any]] = []
        pods: dict[str, dict[str, Any]] = {}
        try:
            if plan.creates or changes.create:
                run_obj = await self._live_run(req.run.key)
                if run_obj is None or _meta(run_obj).get("uid") != req.run.uid:
                    return self._reject(req, "RunNotFound", f"{req.run.namespace}/{req.run.name}")
                refusal = check_template(
                    (run_obj.get("spec") or {}).get("template"), self.options.pod_policy
                )
                if refusal is not None:
                    return self._reject(req, POD_POLICY, refusal.detail)
                try:
                    leases = [self._lease_body(req, intent, run_obj) for intent in plan.creates]
                    pods = {pod.name: self._pod_body(plan, pod, run_obj) for pod in changes.create}
                except (ValueError, TranslateError) as exc:
                    return self._reject(req, Rejection(ConflictReason.INVALID, str(exc)))
                refused = await self._dry_run_pods(_representatives(changes.create, pods))
                if refused is not None:
                    return self._reject(req, "InvalidPod", refused)
            if plan.creates or plan.ends or changes.delete or changes.replace or changes.create:
                journaled = await self._journal_record(req)
                if journaled is not None:
                    return journaled
            wrote = await self._apply(
                plan, changes, pod_states, now, run_obj, leases, pods, created
            )
        except (KubeError, CommitFailed) as exc:
            metrics.COMMITS.labels("error").inc()
            log.warning("commit failed", extra={"key": req.key, "error": str(exc)})
            self._replay_due = True  # the journal keeps it: the lifecycle loop completes it
            return CommitReply(ok=False, conflict=f"ApiError: {exc}")
        await self._journal_done(req.key)
        metrics.COMMITS.labels("ok" if wrote else "noop").inc()
        log.info(
            "commit applied" if wrote else "commit already applied",
            extra={
                "key": req.key,
                "run": f"{req.run.namespace}/{req.run.name}",
                "created_leases": [i.name for i in plan.creates],
                "ended_leases": [le.name for le, _ in plan.ends],
            },
        )
        return CommitReply(
            ok=True,
            created=[intent.name for intent in req.leases],
            ended=[end.name for end in req.ends],
        )

    # ------------------------------------------------------------------ what justifies a commit

    def _remember(self, req: CommitRequest) -> Rejection | None:
        """Idempotency by content: a key accepted before comes back only with the same content
        (``commit_digest``), so a re-used key cannot smuggle in other writes."""
        digest = commit_digest(req)
        was = self._seen.get(req.key)
        if was is not None and was != digest:
            return Rejection(
                ConflictReason.KEY_REUSED,
                f"commit key {req.key} was accepted before with other content",
            )
        self._seen[req.key] = digest
        self._seen.move_to_end(req.key)
        while len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)
        return None

    async def _authority(self, req: CommitRequest, now: datetime, clock: datetime) -> Authority:
        """The facts ``verify_commit`` judges, from the caches or (where they may lag, and for
        the rare node failure and activation) straight from the API server."""
        failed = failed_node_of(req.reason)
        return Authority(
            run=await self._run_truth(req, now),
            clock=clock,
            failed_nodes=frozenset(
                {failed} if failed is not None and await self._node_failed(failed, now) else ()
            ),
            reservation=await self._reservation_truth(req),
            skew=self.options.max_clock_skew,
        )

    def _open_leases_of(self, key: RunKey) -> list[Lease]:
        """The Run's open leases: the cache's, plus in-flight creates, minus in-flight closes."""
        leases = {lease.name: lease for lease in self.cache.leases_of(key)}
        for name, lease in self._inflight.opened.items():
            if lease.run == key:
                leases.setdefault(name, lease)
        return [
            lease
            for name, lease in leases.items()
            if lease.open and name not in self._inflight.closed
        ]

    async def _run_truth(self, req: CommitRequest, now: datetime) -> RunTruth | None:
        key = req.run.key
        lifecycle: dict[str, str] = {}
        if req.reason.startswith(LIFECYCLE_PREFIX):
            leases = self._open_leases_of(key)
            pods = [pod_view(obj) for obj in self.pods.items.values() if pod_run(obj) == key]
            view = await self._run_view(key, confirm=True)
            ends = decide(leases, pods, view, now, self.options.settings.missing_pod_grace).ends
            lifecycle = dict(ends)
        obj = await self._live_run(key)
        if obj is None:
            return RunTruth(uid="", request=None, lifecycle=lifecycle) if lifecycle else None
        meta = _meta(obj)
        try:
            request: RunRequest | None = run_request(obj)
        except TranslateError:
            request = None
        denied = waiting = None
        if request is not None and (req.leases or req.pods):
            refused = check_owner(
                request.owner,
                key[0],
                await self._namespace_annotations(key[0]),
                self.options.default_owner_globs,
            )
            denied = None if refused is None else refused.message.partition(": ")[2]
            dependency = check_after((obj.get("spec") or {}).get("after"), self._phases(key[0]))
            waiting = None if isinstance(dependency, Ready) else dependency.message
        shrinkable: frozenset[str] = frozenset()
        if request is not None and req.reason == SHRINK_REASON:
            shrinkable = frozenset(elastic_step(request, self._open_leases_of(key))[1])
        return RunTruth(
            uid=str(meta.get("uid") or ""),
            request=request,
            deleting=bool(meta.get("deletionTimestamp")),
            denied=denied,
            waiting=waiting,
            shrinkable=shrinkable,
            lifecycle=lifecycle,
        )

    def _phases(self, namespace: str) -> dict[str, str | None]:
        """Phase of every Run of the namespace by name (``after`` names Runs of its own)."""
        phases: dict[str, str | None] = {}
        for obj in self.cache.objects("runs").values():
            meta = _meta(obj)
            if meta.get("namespace") == namespace:
                phases[str(meta.get("name"))] = (obj.get("status") or {}).get("phase")
        return phases

    async def _namespace_annotations(self, namespace: str) -> Mapping[str, str] | None:
        """The Namespace's annotations (read through when the cache has not seen it yet)."""
        obj = self.namespaces.get(namespace)
        if obj is None:
            try:
                obj = await self._get(NAMESPACES, namespace, None)
            except KubeError as exc:
                log.warning("namespace %s unreadable: %s", namespace, exc)
                obj = None
        if obj is None:
            return None
        annotations = _meta(obj).get("annotations")
        return annotations if isinstance(annotations, Mapping) else {}

    async def _node_failed(self, name: str, now: datetime) -> bool:
        """Whether the node is deleted or NotReady past the grace, read fresh from the API
        server (the cache may lag behind the packer that saw it fail)."""
        obj = await self._get(NODES, name, None)
        condition = None if obj is None else node_condition(obj)
        return has_failed(condition, now, self.options.settings.node_grace)

    async def _reservation_truth(self, req: CommitRequest) -> ReservationTruth | None:
        """The Reservation a ``Reservation:<ns>/<name>`` commit names, read fresh: the resolver
        publishes its audit just before it commits."""
        named = reservation_of(req.reason)
        if named is None or not (req.leases or req.ends):
            return None
        obj = await self._get(RESERVATIONS, named[1], named[0])
        if obj is None:
            return None
        try:
            view = rv.read_reservation(obj)
        except ValueError:
            return None
        audit = view.status.get("audit")
        ended: frozenset[str] | None = None
        complete, seed, replays = True, "", False
        if isinstance(audit, Mapping):
            names = [str(n) for n in audit.get("endedLeases") or ()]
            ended = frozenset(names)
            complete = len(names) < rv.MAX_NAME_SET
            seed = str(audit.get("seed") or "")
            replays = replay_audit(audit).get("verdict") in ("verified", "no lottery")
        return ReservationTruth(
            namespace=view.namespace,
            name=view.name,
            run=view.run,
            run_uid=view.run_uid,
            state=view.state.value if view.state is not None else None,
            earliest_start=view.earliest_start,
            ended=ended,
            complete=complete,
            seed=seed,
            replays=replays,
        )

    # ------------------------------------------------------------------ journal

    async def _journal_record(self, req: CommitRequest) -> CommitReply | None:
        """Record the commit before writing it; a reply refusing it when the journal is down."""
        if self.journal is None:
            return None
        try:
            await self.journal.record(req)
        except Exception as exc:
            metrics.COMMITS.labels("rejected").inc()
            metrics.CONFLICTS.labels("JournalUnavailable").inc()
            log.warning("commit refused: journal unavailable", extra={"key": req.key})
            return CommitReply(ok=False, conflict=f"JournalUnavailable: {exc!r}; re-send")
        return None

    async def _journal_done(self, key: str) -> None:
        if self.journal is None:
            return
        try:
            await self.journal.done(key)
        except Exception as exc:  # a leftover entry is re-applied later as a no-op
            log.warning("journal entry not purged", extra={"key": key, "error": repr(exc)})
            self._replay_due = True

    async def replay_journal(self) -> int:
        """Re-apply every commit the journal still holds (a crash or an API failure stopped it
        part-way); returns how many were completed. Rejected ones are dropped from the journal."""
        if self.journal is None:
            return 0
        self._replay_due = False
        try:
            pending = await self.journal.pending()
        except Exception as exc:
            log.warning("journal unreadable", extra={"error": repr(exc)})
            self._replay_due = True
            return 0
        completed = 0
        for req, recorded in pending:
            if self._stopping:
                self._replay_due = True
                break
            async with self._turns.turn(self._touched(req)):
                reply = await self._commit_one(req, clock=recorded)
            failures = self._replay_failures.pop(req.key, 0)
            if reply.ok:
                completed += 1
                metrics.JOURNAL_REPLAYS.labels("completed").inc()
                log.info("journaled commit completed", extra={"key": req.key})
            elif (
                reply.conflict.startswith(("ApiError:", "JournalUnavailable:"))
                and failures + 1 < MAX_REPLAYS
            ):
                metrics.JOURNAL_REPLAYS.labels("error").inc()
                self._replay_failures[req.key] = failures + 1
                self._replay_due = True
            else:
                metrics.JOURNAL_REPLAYS.labels("dropped").inc()
                log.warning(
                    "journaled commit dropped", extra={"key": req.key, "conflict": reply.conflict}
                )
                await self._journal_done(req.key)
        return completed

    def _lease_body(self, req: CommitRequest, intent: LeaseIntent, run_obj: Obj) -> dict[str, Any]:
        uid = req.run.uid or str(_meta(run_obj).get("uid") or "")
        return lease_manifest(
            intent, budget=req.budget_of.get(intent.envelope), run_uid=uid, gen=req.run.generation
        )

    def _pod_body(self, plan: CommitPlan, intent: PodIntent, run_obj: Obj) -> dict[str, Any]:
        body = pod_manifest(
            intent,
            run_obj,
            resource=self.options.gpu_resource,
            hold_image=self.options.hold_image,
            service_name=service_name(intent.run[1]),
        )
        annotations = body["metadata"].setdefault("annotations", {})
        annotations[ANNOTATION_LEASES] = ",".join(plan.pod_leases.get(intent.name, ()))
        return body

    async def _apply(
        self,
        plan: CommitPlan,
        changes: PodChanges,
        states: Mapping[PodKey, PodState],
        now: datetime,
        run_obj: Obj | None,
        leases: list[dict[str, Any]],
        pods: dict[str, dict[str, Any]],
        created: set[str],
    ) -> bool:
        """Write the commit: ends, freed pods, Service, Leases, Pods. True if anything changed.

        The writes of one step go to the API server concurrently (``WRITE_CONCURRENCY`` at a
        time); the steps stay in this order. What succeeded is recorded (in-flight view,
        metrics, ledger) before the first failure of a step is raised.
        """
        wrote = False
        ends = [(lease, closure, max(now, lease.start)) for lease, closure in plan.ends]
        closes = await _concurrently(
            [partial(self._close_lease, lease, closure, end) for lease, closure, end in ends]
        )
        closed = [end for end, result in zip(ends, closes, strict=True) if result is None]
        if closed:
            self._inflight = self._inflight.with_commit([], [(le.name, c) for le, c, _ in closed])
            wrote = True
        for _, closure, _ in closed:
            metrics.LEASES.labels("closed", ledger_closure_label(closure)).inc()
        await _concurrently(
            [partial(self._ledger, lease, "closed", end, closure) for lease, closure, end in closed]
        )
        _raise_first(closes)

        deletes = await _concurrently(
            [partial(self._delete_freed_pod, key, states[key]) for key in changes.delete]
        )
        for result in deletes:
            if result is True:
                metrics.PODS.labels("deleted").inc()
                wrote = True
        _raise_first(deletes)

        creates = list(changes.create)
        for key in changes.replace:
            pod = next(p for p in creates if (p.run[0], p.name) == key)
            live = await self._get(PODS, key[1], key[0])
            if live is not None and same_incarnation(
                pod_state(live), pod, plan.pod_leases.get(pod.name, ())
            ):
                creates.remove(pod)  # the cache lagged: the right pod already stands
                continue
            if live is not None:
                await self._force_delete_pod(key, str(_meta(live).get("uid") or ""))
                metrics.PODS.labels("replaced").inc()
        if creates and run_obj is not None:
            await self._create(SERVICES, headless_service(run_obj))

        made = await _concurrently([partial(self._create, GPU_LEASES, body) for body in leases])
        opened = [
            intent_lease(intent)
            for intent, result in zip(plan.creates, made, strict=True)
            if not isinstance(result, BaseException)
        ]
        if opened:
            self._inflight = self._inflight.with_commit(opened, [])
            created.update(record.name for record in opened)
            wrote = True
        for _ in opened:
            metrics.LEASES.labels("opened", "").inc()
        await _concurrently(
            [partial(self._ledger, record, "opened", record.start, "") for record in opened]
        )
        _raise_first(made)

        started = await _concurrently(
            [partial(self._create_pod, p, pods[p.name], plan) for p in creates]
        )
        for result in started:
            if result is True:
                metrics.PODS.labels("created").inc()
                wrote = True
        _raise_first(started)
        return wrote

    async def _create_pod(self, pod: PodIntent, body: Mapping[str, Any], plan: CommitPlan) -> bool:
        """Create a rank's pod; True if created. The name may still be held by the pod of an
        earlier incarnation (a gang that just ended is deleted gracefully, and the cache may not
        show it yet): that one is deleted outright first. Only this incarnation's own pod counts
        as already created, so a requeued gang never ends up with leases and no pods."""
        if await self._create(PODS, body):
            return True
        live = await self._get(PODS, pod.name, pod.run[0])
        if live is not None and same_incarnation(
            pod_state(live), pod, plan.pod_leases.get(pod.name, ())
        ):
            return False
        if live is not None:
            await self._force_delete_pod((pod.run[0], pod.name), str(_meta(live).get("uid") or ""))
            metrics.PODS.labels("replaced").inc()
        return await self._create(PODS, body)

    async def _delete_freed_pod(self, key: PodKey, state: PodState) -> bool:
        """Delete the pod of a rank that no longer holds its node; True if it was deleted."""
        node = self.cache.topology.node(state.node)
        if node is None or not node.ready:
            # No kubelet will confirm a graceful delete on a lost node: delete outright.
            cached = self.pods.get(f"{key[0]}/{key[1]}")
            uid = str(_meta(cached).get("uid") or "") if cached is not None else ""
            await self._force_delete_pod(key, uid)
            return True
        return await self._delete_pod(key)

    # ------------------------------------------------------------------ writes

    async def _retry(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """Retry transient API failures a few times; anything else is raised at once."""
        delay = 0.1
        for attempt in range(4):
            try:
                return await call()
            except KubeError as exc:
                if exc.status not in _TRANSIENT or attempt == 3:
                    raise
                log.info("retrying %s after %s", what, exc)
                await asyncio.sleep(delay)
                delay *= 3
        raise AssertionError("unreachable")

    async def _create(self, resource: Resource, body: Mapping[str, Any]) -> bool:
        """Create with our field manager; False when it already existed (idempotent)."""
        meta = body["metadata"]
        namespace = meta.get("namespace") if resource.namespaced else None

        async def post() -> bool:
            try:
                await request(
                    self.api,
                    "POST",
                    resource.path(namespace),
                    query=[("fieldManager", FIELD_MANAGER)],
                    body=dict(body),
                )
            except KubeError as exc:
                if exc.status == 409 and exc.reason == "AlreadyExists":
                    return False
                raise
            return True

        return await self._retry(f"create {resource.plural}/{meta['name']}", post)

    async def _dry_run_pods(self, bodies: Iterable[Mapping[str, Any]]) -> str | None:
        """Let the API server validate every pod before anything is written, so a Run whose
        template cannot make a pod is refused whole instead of leaving leases without pods."""

        async def check(body: Mapping[str, Any]) -> str | None:
            namespace = str(body["metadata"]["namespace"])
            path = PODS.path(namespace)

            async def post() -> None:
                query: list[tuple[str, str | int]] = [
                    ("dryRun", "All"),
                    ("fieldManager", FIELD_MANAGER),
                ]
                await request(self.api, "POST", path, query=query, body=dict(body))

            try:
                await self._retry("dry-run pod", post)
            except KubeError as exc:
                if exc.status == 409:  # the name is taken by the pod this commit replaces
                    return None
                if 400 <= exc.status < 500:
                    return f"pod {namespace}/{body['metadata']['name']}: {exc.message}"
                raise
            return None

        results = await _concurrently([partial(check, body) for body in bodies])
        for result in results:
            if isinstance(result, str):
                return result
        _raise_first(results)
        return None

    async def _get(self, resource: Resource, name: str, namespace: str | None) -> Obj | None:
        return await self._retry(
            f"get {resource.plural}/{name}", lambda: writer.get(self.api, resource, name, namespace)
        )

    async def _close_lease(self, lease: Lease, closure: str, end: datetime) -> None:
        status = {"closed": True, "endTime": rfc3339(end), "closureReason": closure}

        async def patch() -> None:
            try:
                await writer.patch_status(
                    self.api, GPU_LEASES, lease.name, status, field_manager=FIELD_MANAGER
                )
            except KubeError as exc:
                if exc.status != 422:
                    raise
                # Closed meanwhile by an earlier attempt: once-set fields refuse new values.
                live = await writer.get(self.api, GPU_LEASES, lease.name)
                if not (live and (live.get("status") or {}).get("closed")):
                    raise

        await self._retry(f"close lease {lease.name}", patch)

    async def _delete_pod(self, key: PodKey) -> bool:
        return await self._retry(
            f"delete pod {key[0]}/{key[1]}",
            lambda: writer.delete(self.api, PODS, key[1], key[0]),
        )

    async def _force_delete_pod(self, key: PodKey, uid: str, timeout: float = 20.0) -> None:
        """Delete at once (grace 0) and wait until the name is free for the new incarnation."""
        namespace, name = key
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await request(self.api, "DELETE", PODS.path(namespace, name), body=body)
        except KubeError as exc:
            if exc.status not in (404, 409):  # gone, or already replaced (uid precondition)
                raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = await self._get(PODS, name, namespace)
            if live is None or (uid and _meta(live).get("uid") != uid):
                return
            await asyncio.sleep(0.1)
        raise CommitFailed(f"pod {namespace}/{name} still terminating after {timeout:.0f}s")

    async def _ledger(self, lease: Lease, kind: str, at: datetime, closure: str) -> None:
        """One LEDGER event; losing it only delays consumers until their resync."""
        event = LedgerEvent(
            kind="opened" if kind == "opened" else "closed",
            lease=lease.name,
            run=lease.run,
            envelope=lease.envelope,
            gpus=lease.gpus,
            at=at,
            closure=closure,
        )
        try:
            await self.runtime.publish(LEDGER, event, msg_id=f"{lease.name}:{kind}")
        except BusError as exc:
            log.warning("ledger event lost", extra={"lease": lease.name, "error": str(exc)})

    # ------------------------------------------------------------------ reads

    def _pod_states(self, keys: Iterable[PodKey]) -> dict[PodKey, PodState]:
        """What the pod cache says about these pods (absent ones are left out)."""
        found = ((key, self.pods.get(f"{key[0]}/{key[1]}")) for key in keys)
        return {key: pod_state(obj) for key, obj in found if obj is not None}

    async def _live_run(self, key: RunKey) -> Obj | None:
        """The Run object: from the cache, else from the API server (the cache may lag)."""
        cached = self.cache.run_object(key)
        if cached is not None:
            return cached
        return await self._get(RUNS, key[1], key[0])

    # ------------------------------------------------------------------ lifecycle

    async def _lifecycle_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.tick_seconds)
            self._wake.clear()
            if self._stopping:
                return
            if self.elector is not None and not self.elector.is_leader:
                continue
            try:
                if self._replay_due:
                    await self.replay_journal()
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lifecycle pass failed")

    async def reconcile(self, now: datetime | None = None) -> list[tuple[RunKey, Outcome]]:
        """One lifecycle pass over every Run with open leases or pods; returns what it did."""
        now = now or utcnow()
        async with self._lock:
            state = self._snapshot(now)
            known = ledger_view(state, self._inflight)
            busy = self._turns.busy()  # half-written: seen again on the next pass
        by_run: dict[RunKey, list[Lease]] = {}
        for lease in known.values():
            if lease.open and lease.run not in busy:
                by_run.setdefault(lease.run, []).append(lease)
        pods_by_run: dict[RunKey, list[PodView]] = {}
        for obj in self.pods.items.values():
            key = pod_run(obj)
            if key is not None and key not in busy:
                pods_by_run.setdefault(key, []).append(pod_view(obj))
        done: list[tuple[RunKey, Outcome]] = []
        for key in sorted(by_run.keys() | pods_by_run.keys()):
            leases = by_run.get(key, [])
            pods = pods_by_run.get(key, [])
            if not leases and all(p.deleting for p in pods):
                continue
            view = await self._run_view(key, confirm=True)
            if not leases and view.present and not view.deleting:
                continue
            outcome = decide(leases, pods, view, now, self.options.settings.missing_pod_grace)
            if outcome.idle:
                continue
            await self._finish(key, outcome)
            done.append((key, outcome))
        return done

    async def _run_view(self, key: RunKey, *, confirm: bool) -> RunView:
        """The Run as lifecycle sees it; absence is confirmed with the API server, so a Run
        the cache has not seen yet is never mistaken for a deleted one."""
        obj = self.cache.run_object(key)
        if obj is None and confirm:
            try:
                obj = await writer.get(self.api, RUNS, key[1], key[0])
            except KubeError:
                return RunView(present=True)  # cannot tell: assume it is still there
        if obj is None:
            return RunView(present=False)
        request_ = self.cache.run_request(key)
        return RunView(
            present=True,
            deleting=bool(_meta(obj).get("deletionTimestamp")),
            max_duration=request_.max_duration if request_ is not None else None,
        )

    def _run_uid(self, key: RunKey) -> str:
        """The Run's uid from the cache; empty for a Run that is gone (nothing is started)."""
        obj = self.cache.run_object(key)
        return "" if obj is None else str(_meta(obj).get("uid") or "")

    async def _finish(self, key: RunKey, outcome: Outcome) -> None:
        """Apply a lifecycle outcome: ends through the commit path, then pod deletions."""
        if outcome.ends:
            closure = outcome.closure.value if outcome.closure else "Lifecycle"
            uid = self._run_uid(key)
            ended = hashlib.sha256("\x1f".join([uid, *sorted(n for n, _ in outcome.ends)]).encode())
            req = CommitRequest(
                key=f"lifecycle:{key[0]}/{key[1]}:{closure}:{ended.hexdigest()[:12]}",
                run=RunRef(namespace=key[0], name=key[1], uid=uid, generation=0),
                version=self.cache.version,
                ends=[LeaseEnd(name=name, closure=c) for name, c in outcome.ends],
                reason=f"{LIFECYCLE_PREFIX}{closure}",
            )
            if self._stopping:
                return
            async with self._turns.turn(self._touched(req)):
                reply = await self._commit_one(req)
            if not reply.ok:
                log.warning("lifecycle commit failed", extra={"run": key, "error": reply.conflict})
                return
            metrics.LIFECYCLE.labels(closure).inc()
            log.info(
                "gang ended",
                extra={"run": f"{key[0]}/{key[1]}", "closure": closure, "why": outcome.message},
            )
            try:
                await self.runtime.publish(RUN_CHANGED, RunChanged(namespace=key[0], name=key[1]))
            except BusError as exc:
                log.warning("run-changed nudge lost", extra={"error": str(exc)})
        names = [
            name
            for name in outcome.delete_pods
            if not _meta(self.pods.get(f"{key[0]}/{name}") or {}).get("deletionTimestamp")
        ]
        results = await _concurrently([partial(self._delete_pod, (key[0], n)) for n in names])
        for name, result in zip(names, results, strict=True):
            if result is True:
                metrics.PODS.labels("deleted").inc()
            elif isinstance(result, KubeError):
                log.warning(
                    "pod delete failed", extra={"pod": f"{key[0]}/{name}", "error": str(result)}
                )
            elif isinstance(result, BaseException):
                raise result


# --------------------------------------------------------------------------- process entry


async def serve(cfg: ServiceConfig, options: BinderOptions) -> int:
    """Run one binder process until SIGTERM/SIGINT (exit 0) or lost leadership (exit 1)."""
    binder = await serve_service(
        cfg,
        lambda runtime, api: Binder(runtime, api, options),
        until=lambda binder: () if binder.elector is None else (binder.elector.lost,),
    )
    lost = binder.elector is not None and binder.elector.lost.is_set()
    log.info("binder stopped", extra={"lost_leadership": lost})
    return 1 if lost else 0
