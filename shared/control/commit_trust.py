"""Why the binder believes a commit (issue 8 §2): a proposal is a claim, not an order.

``shared.control.commit_check`` asks whether a commit *fits* (capacity, fill room, envelope and cap
limits). This module asks whether the binder can *justify* each write from its own caches — the
API server's truth — whoever sent it. Admission and the resolver pass it by construction; a
hand-written commit from a peer that can publish on the bus does not:

* the Run exists with the uid the commit names, is not being deleted, its namespace is
  authorised for its owner (``shared.control.tenancy``) and its ``after`` dependencies hold
  (``shared.control.dependencies``) — all facts the binder looked up, handed in as
  :class:`RunTruth`;
* every new Lease is the Run's: its owner is the Run's, its payer is one cover itself could pick
  for the Run (:func:`shared.engine.cover.payers`, the lender's ACL ``lends_to``, the Run's
  ``maxBorrowGPUs``), its node is of the Run's flavor and inside both the Run's and the paying
  envelope's selectors, it starts within a small clock skew of the binder's clock (no back- or
  forward-dating what accounting charges), its expected end is the Run's walltime, and the Run
  never holds more working GPUs than its widest start;
* every pod asks for exactly the GPUs its rank's Leases hold on its node, under the rank's name;
* every Lease the commit ends has a cause the binder can check: the Run's own lifecycle (the
  binder's :func:`shared.control.lifecycle.decide` agrees), the Run's own desired width
  (:func:`shared.control.run_status.elastic_step` asks for that shrink), a node the binder sees
  failed (NotReady past the grace, or deleted: :func:`shared.control.node_health.has_failed`)
  with the closure the failure plan gives such a Lease, or the published audit of the Active
  Reservation the commit activates (its ended leases exactly, its seed, draws that replay);
* ``Reservation:<ns>/<name>`` — the reason that lifts that Reservation's protection — is
  accepted only from the Run's own Reservation, Active and due.

Pure: the binder's shell gathers the facts (:class:`Authority`), this judges them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType

from shared.bus.messages import CommitRequest
from shared.control.commit_check import (
    CommitPlan,
    ConflictReason,
    Rejection,
    intent_lease,
    reservation_of,
)
from shared.engine.admit import widths
from shared.engine.bindplan import LeaseIntent, pod_name
from shared.engine.cover import lends_to, payers
from shared.engine.model import (
    Closure,
    FundingKind,
    Lease,
    LeaseReason,
    Role,
    RunKey,
    RunRequest,
    selector_matches,
)
from shared.engine.resolver import random_preempt_closure
from shared.engine.shrink import current_width
from shared.engine.state import ClusterState

DEFAULT_SKEW = timedelta(seconds=120)
"""How far a new Lease's start may be from the binder's clock (proposal round trip included)."""
NODE_FAILURE_PREFIX = "NodeFailure:"
"""``CommitRequest.reason`` of a node-failure plan: ``NodeFailure:<node>``."""
LIFECYCLE_PREFIX = "Lifecycle:"
"""``CommitRequest.reason`` of a gang the binder ends on its own: ``Lifecycle:<closure>``."""
SHRINK_REASON = "Shrink"
"""``CommitRequest.reason`` of a malleable Run shrinking to its desired width (admission)."""
ACTIVE = "Active"
"""The Reservation state in which its activation may commit."""

_FAILURE_CLOSURES = frozenset(
    {
        Closure.NODE_FAILURE.value,
        Closure.SWAP.value,
        Closure.RECLAIMED_BY_SPARE.value,
        Closure.FAIL.value,
        Closure.SHRINK.value,
    }
)
_LIFECYCLE_CLOSURES = frozenset(
    {
        Closure.COMPLETED.value,
        Closure.FAIL.value,
        Closure.TIME_LIMIT.value,
        Closure.CANCELED.value,
    }
)
_ACTIVATION_CLOSURES = frozenset({Closure.DROP_SPARE.value, Closure.SHRINK.value})


def _no_ends() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RunTruth:
    """The committing Run as the binder's caches (or a fresh read) show it."""

    uid: str
    request: RunRequest | None
    """The parsed spec; None when the stored spec cannot be read (nothing may start)."""
    deleting: bool = False
    denied: str | None = None
    """Why the namespace may not name the Run's owner (tenancy), None when it may."""
    waiting: str | None = None
    """Why the Run's ``after`` dependencies do not hold yet, None when they do."""
    shrinkable: frozenset[str] = frozenset()
    """Leases the Run's own desired width lets go (``elastic_step``)."""
    lifecycle: Mapping[str, str] = field(default_factory=_no_ends)
    """Lease → closure the binder's lifecycle rule ends now (only asked for ``Lifecycle:``)."""


@dataclass(frozen=True, slots=True)
class ReservationTruth:
    """The Reservation a ``Reservation:<ns>/<name>`` commit names, as the binder read it."""

    namespace: str
    name: str
    run: RunKey
    run_uid: str | None
    """The Run incarnation it was made for (label), when recorded."""
    state: str | None
    earliest_start: datetime
    ended: frozenset[str] | None = None
    """``status.audit.endedLeases``; None when no audit is published."""
    complete: bool = True
    """False when the audit's lease list was cut at its size limit."""
    seed: str = ""
    replays: bool = True
    """The audit's draws are what its seed reproduces (``replay_audit`` verdict)."""


@dataclass(frozen=True, slots=True)
class Authority:
    """Everything the binder looked up to judge one commit."""

    run: RunTruth | None
    """None: no Run with the commit's namespace and name exists."""
    clock: datetime
    """The instant new Leases must start near: now, or when a replayed journal entry was
    recorded (the JetStream server's timestamp)."""
    failed_nodes: frozenset[str] = frozenset()
    """Nodes the binder itself sees failed (only the one a ``NodeFailure:`` commit names)."""
    reservation: ReservationTruth | None = None
    skew: timedelta = DEFAULT_SKEW


def failed_node_of(reason: str) -> str | None:
    """``NodeFailure:<node>`` → the node; None for any other commit reason."""
    node = reason.removeprefix(NODE_FAILURE_PREFIX)
    return node if reason.startswith(NODE_FAILURE_PREFIX) and node else None


def _refuse(reason: ConflictReason, message: str) -> Rejection:
    return Rejection(reason, message)


def _label(run: RunKey) -> str:
    return f"{run[0]}/{run[1]}"


def _check_run(request: CommitRequest, plan: CommitPlan, authority: Authority) -> Rejection | None:
    """The Run exists as this incarnation; starting anything also needs tenancy and ``after``."""
    truth = authority.run
    writes = bool(plan.creates or plan.pods)
    if writes and not request.run.uid:
        return _refuse(ConflictReason.INVALID, "run.uid is required")
    if truth is None:
        if writes:
            return _refuse(ConflictReason.RUN_NOT_FOUND, f"no Run {_label(request.run.key)}")
        return None
    if request.run.uid and truth.uid != request.run.uid:
        return _refuse(
            ConflictReason.STALE_RUN,
            f"Run {_label(request.run.key)} has uid {truth.uid}, the commit names "
            f"{request.run.uid}",
        )
    if not writes:
        return None
    if truth.deleting:
        return _refuse(ConflictReason.RUN_DELETING, f"Run {_label(request.run.key)} is deleting")
    if truth.request is None:
        return _refuse(ConflictReason.INVALID, f"Run {_label(request.run.key)} has no valid spec")
    if truth.denied is not None:
        return _refuse(ConflictReason.UNAUTHORIZED, truth.denied)
    starts = any(i.reason in (LeaseReason.START, LeaseReason.FILL) for i in plan.creates)
    if starts and truth.waiting is not None:
        return _refuse(ConflictReason.DEPENDENCIES, truth.waiting)
    return None


def _check_lease(
    intent: LeaseIntent,
    run: RunRequest,
    state: ClusterState,
    eligible: Mapping[str, FundingKind],
    authority: Authority,
) -> Rejection | None:
    """One new Lease: the Run's owner, a payer cover could choose, a node in the Run's and the
    payer's location, a start near the binder's clock and the Run's walltime."""
    if intent.owner != run.owner:
        return _refuse(
            ConflictReason.OWNER,
            f"lease {intent.name} names owner {intent.owner}; the Run's owner is {run.owner}",
        )
    kind = eligible.get(intent.envelope)
    if kind is None:
        return _refuse(
            ConflictReason.PAYER,
            f"envelope {intent.envelope} may not pay for {run.owner}'s {run.flavor} Run: it is "
            "neither in the owner's family nor a sponsor's the Run may borrow from",
        )
    envelope = state.family.envelope(intent.envelope)
    if kind is not intent.funding or envelope.owner != intent.payer_owner:
        return _refuse(
            ConflictReason.PAYER,
            f"lease {intent.name}: envelope {intent.envelope} pays as {kind.value} for "
            f"{envelope.owner}; the commit says {intent.funding.value} for {intent.payer_owner}",
        )
    if kind is FundingKind.SPONSOR and not lends_to(envelope, run.owner):
        return _refuse(
            ConflictReason.PAYER, f"envelope {intent.envelope} does not lend to {run.owner}"
        )
    node = state.topology.node(intent.node)
    if node is None:
        return _refuse(ConflictReason.UNKNOWN_NODE, f"node {intent.node} is not a known GPU node")
    if node.flavor != run.flavor:
        return _refuse(
            ConflictReason.PLACEMENT,
            f"node {node.name} is {node.flavor}; the Run asks for {run.flavor}",
        )
    if not selector_matches(run.selector, node.labels):
        return _refuse(
            ConflictReason.PLACEMENT, f"node {node.name} is outside the Run's locality selector"
        )
    if not selector_matches(envelope.selector, node.labels):
        return _refuse(
            ConflictReason.PLACEMENT,
            f"node {node.name} is outside envelope {intent.envelope}'s selector",
        )
    drift = abs(intent.start - authority.clock)
    if drift > authority.skew:
        return _refuse(
            ConflictReason.START_TIME,
            f"lease {intent.name} starts at {intent.start.isoformat()}, "
            f"{drift.total_seconds():.0f}s from the binder's clock "
            f"(at most {authority.skew.total_seconds():.0f}s)",
        )
    limit = None if run.max_duration is None else intent.start + run.max_duration
    swap = intent.reason is LeaseReason.SWAP
    bad_end = (
        intent.expected_end is not None
        if limit is None
        else intent.expected_end is None
        or intent.expected_end > limit
        or (not swap and intent.expected_end != limit)
    )
    if bad_end:
        return _refuse(
            ConflictReason.INVALID,
            f"lease {intent.name} expects to end at {intent.expected_end}; the Run's walltime "
            f"says {limit}",
        )
    return None


def _check_creates(
    request: CommitRequest, plan: CommitPlan, state: ClusterState, authority: Authority
) -> Rejection | None:
    """Every new Lease one cover and pack could have made for this Run."""
    truth = authority.run
    if not plan.creates or truth is None or truth.request is None:
        return None
    run = truth.request
    eligible = {key: kind for key, _, kind in payers(run, state.family)}
    for intent in plan.creates:
        bad = _check_lease(intent, run, state, eligible, authority)
        if bad is not None:
            return bad
    mine = [le for le in plan.open_after if le.run == request.run.key]
    width = current_width(mine)
    widest = max(widths(run))
    if width > widest and any(i.role is not Role.SPARE for i in plan.creates):
        return _refuse(
            ConflictReason.INVALID,
            f"the Run would hold {width} working GPUs; it starts at most {widest}",
        )
    if run.max_borrow_gpus is not None:
        borrowed = sum(le.gpus for le in mine if le.funding is FundingKind.SPONSOR)
        if borrowed > run.max_borrow_gpus and any(
            i.funding is FundingKind.SPONSOR and i.reason is not LeaseReason.SWAP
            for i in plan.creates
        ):
            return _refuse(
                ConflictReason.PAYER,
                f"the Run would borrow {borrowed} GPUs; maxBorrowGPUs is {run.max_borrow_gpus}",
            )
    failed = failed_node_of(request.reason)
    for intent in plan.creates:
        if intent.reason is LeaseReason.SWAP and (
            failed is None or failed not in authority.failed_nodes
        ):
            return _refuse(
                ConflictReason.UNJUSTIFIED,
                f"lease {intent.name} is a swap, but no node the binder sees failed is named",
            )
    return None


def _check_pods(request: CommitRequest, plan: CommitPlan) -> Rejection | None:
    """Each pod asks for exactly its rank's Lease GPUs on its node, under the rank's name."""
    leases: dict[str, Lease] = {le.name: le for le in plan.open_after}
    leases.update((i.name, intent_lease(i)) for i in plan.creates)
    master = pod_name(request.run.name, 0, 0)
    for pod in plan.pods:
        held = sum(leases[n].gpus for n in plan.pod_leases.get(pod.name, ()) if n in leases)
        if pod.gpus != held:
            return _refuse(
                ConflictReason.POD_GPUS,
                f"pod {pod.name} asks for {pod.gpus} GPUs; its rank's Leases on {pod.node} "
                f"hold {held}",
            )
        if pod.name != pod_name(request.run.name, pod.group, pod.rank) or pod.master != master:
            return _refuse(ConflictReason.INVALID, f"pod {pod.name} is not rank {pod.rank}'s pod")
        if pod.world_size <= pod.rank:
            return _refuse(
                ConflictReason.INVALID,
                f"pod {pod.name}: world size {pod.world_size} does not hold rank {pod.rank}",
            )
    return None


def _check_reservation(
    request: CommitRequest, plan: CommitPlan, authority: Authority
) -> Rejection | None:
    """``Reservation:<ns>/<name>`` only from the Run's own Active, due Reservation."""
    named = reservation_of(request.reason)
    if named is None or not (plan.creates or plan.ends):
        return None
    resv = authority.reservation
    where = f"{named[0]}/{named[1]}"
    if resv is None or (resv.namespace, resv.name) != named:
        return _refuse(ConflictReason.RESERVATION, f"no Reservation {where}")
    if resv.run != request.run.key or (resv.run_uid and resv.run_uid != request.run.uid):
        return _refuse(
            ConflictReason.RESERVATION,
            f"Reservation {where} is for Run {_label(resv.run)}, not this incarnation of "
            f"{_label(request.run.key)}",
        )
    if resv.state != ACTIVE:
        return _refuse(
            ConflictReason.RESERVATION, f"Reservation {where} is {resv.state or 'new'}, not Active"
        )
    if resv.earliest_start > authority.clock + authority.skew:
        return _refuse(
            ConflictReason.RESERVATION,
            f"Reservation {where} is due at {resv.earliest_start.isoformat()}",
        )
    return None


def _runs_on(node: str, leases: Iterable[Lease]) -> set[RunKey]:
    """Runs with a working Lease on ``node`` that the failure ends or has ended."""
    return {
        le.run
        for le in leases
        if le.node == node
        and le.role is not Role.SPARE
        and (le.open or le.closure == Closure.NODE_FAILURE.value)
    }


def _failure_cause(
    lease: Lease, closure: str, node: str, ledger: Mapping[str, Lease]
) -> str | None:
    """Why a node-failure plan may not end ``lease`` with ``closure``; None when it may.

    The plan (``shared.engine.failures``): leases on the failed node end ``NodeFailure``; a
    swapped rank's spares end ``Swap``; fill in the way of a swap ends ``ReclaimedBySpare``; the
    other leases of a gang that cannot swap end ``Fail`` (whole Run) or ``Shrink`` (its group).
    """
    if closure not in _FAILURE_CLOSURES:
        return f"{closure} is not a closure of a node failure"
    if closure == Closure.NODE_FAILURE.value:
        return None if lease.node == node else f"it is on {lease.node}, not on {node}"
    hit = _runs_on(node, ledger.values())
    if closure == Closure.RECLAIMED_BY_SPARE.value:
        spare_nodes = {le.node for le in ledger.values() if le.run in hit and le.role is Role.SPARE}
        fill = any(
            le.run == lease.run and le.role is Role.BORROWED and le.node in spare_nodes
            for le in ledger.values()
        )
        return None if fill else f"its Run holds no fill where a spare of a Run on {node} is"
    if lease.run not in hit:
        return f"its Run {_label(lease.run)} has no working lease on {node}"
    if closure == Closure.SWAP.value and lease.role is not Role.SPARE:
        return "only spares end Swap"
    return None


def _activation_cause(
    lease: Lease, closure: str, resv: ReservationTruth | None, ends: frozenset[str]
) -> str | None:
    """Why an activation may not end ``lease``; None when its published audit says it does."""
    if resv is None or resv.ended is None:
        return "the Reservation publishes no audit of its cuts"
    if not resv.replays:
        return "the Reservation's audit does not replay from its seed"
    allowed = set(_ACTIVATION_CLOSURES)
    if resv.seed:
        allowed.add(random_preempt_closure(resv.seed))
    if closure not in allowed:
        return f"{closure} is not a cut the audit (seed {resv.seed or 'none'}) makes"
    if lease.name not in resv.ended:
        return "the audit's ended leases do not name it"
    if resv.complete and ends != resv.ended:
        return "the commit's ends are not exactly the audit's ended leases"
    return None


def _check_ends(
    request: CommitRequest,
    plan: CommitPlan,
    ledger: Mapping[str, Lease],
    authority: Authority,
) -> Rejection | None:
    """Every Lease the commit closes has a cause the binder can verify (module docstring)."""
    run = request.run.key
    failed = failed_node_of(request.reason)
    activation = reservation_of(request.reason)
    truth = authority.run
    ended = frozenset(
        le.name for le, closure in plan.ends if activation is not None and le.run != run
    )
    for lease, closure in plan.ends:
        why: str | None
        if failed is not None:
            if failed not in authority.failed_nodes:
                why = f"node {failed} is not failed (Ready, or NotReady for less than the grace)"
            else:
                why = _failure_cause(lease, closure, failed, ledger)
        elif activation is not None and lease.run != run:
            why = _activation_cause(lease, closure, authority.reservation, ended)
        elif lease.run != run:
            why = f"it belongs to Run {_label(lease.run)}, not to the committing Run"
        elif request.reason.startswith(LIFECYCLE_PREFIX) and closure in _LIFECYCLE_CLOSURES:
            seen = None if truth is None else truth.lifecycle.get(lease.name)
            why = None if seen == closure else f"the Run's lifecycle does not end it {closure}"
        elif request.reason == SHRINK_REASON and closure == Closure.SHRINK.value:
            shrinkable = frozenset() if truth is None else truth.shrinkable
            why = None if lease.name in shrinkable else "the Run's desired width keeps it"
        elif activation is not None and closure in _ACTIVATION_CLOSURES:
            why = _activation_cause(lease, closure, authority.reservation, ended)
        else:
            why = f"reason {request.reason or '(none)'} does not justify closing it {closure}"
        if why is not None:
            return _refuse(
                ConflictReason.UNJUSTIFIED, f"lease {lease.name} may not end {closure}: {why}"
            )
    return None


def verify_commit(
    request: CommitRequest,
    plan: CommitPlan,
    state: ClusterState,
    ledger: Mapping[str, Lease],
    authority: Authority,
) -> Rejection | None:
    """None when the binder can justify every write of ``plan``, else the first it cannot.

    ``plan`` is what ``plan_commit`` accepted; ``ledger`` the binder's leases by name (cache plus
    its in-flight writes, ``ledger_view``).
    """
    return (
        _check_run(request, plan, authority)
        or _check_reservation(request, plan, authority)
        or _check_creates(request, plan, state, authority)
        or _check_pods(request, plan)
        or _check_ends(request, plan, ledger, authority)
    )
