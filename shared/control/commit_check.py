"""The binder's re-check of a commit against its own authoritative view (SPEC §3 Bind).

Proposers (admission, resolver) plan on snapshots that may be stale by the time the commit
arrives. The binder is the single writer, so it re-validates every commit here before writing
anything, against its watch caches *plus* the commits it has already written but not yet seen
back through the watch (``Inflight``). A commit that would overbook a node, put fill (``Borrowed``)
outside other runs' unfilled spare GPUs, start leases on an envelope outside its window, exceed an
envelope's concurrency or GPU-hours (or a lending or aggregate cap's), or take GPUs promised to
another Reservation is rejected with a typed reason and nothing is written; the proposer
recomputes.

Commits are idempotent: lease names are deterministic, so leases that already exist are not
created (or counted) again, and ends of leases that are already closed are skipped. A re-sent
commit whose leases all exist is therefore a no-op that succeeds.

Pure: no I/O, no clock (time comes from ``state.now``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

from shared.bus.messages import CommitRequest
from shared.engine.accounting import Meter, Usage, usage_from_ledger
from shared.engine.admit import claim_protection
from shared.engine.bindplan import LeaseIntent, PodIntent, pod_name
from shared.engine.capacity import Exclusion, Load, exclusion, short_resource, slots
from shared.engine.cover import hours_left, window_allows
from shared.engine.fill import spare_room
from shared.engine.model import (
    NO_NEEDS,
    AggregateCap,
    Envelope,
    FundingKind,
    Lease,
    LeaseReason,
    Node,
    ReservationClaim,
    Role,
    RunKey,
    RunRequest,
)
from shared.engine.state import ClusterState
from shared.engine.topology import PodChange, pod_use
from shared.engine.topology import occupancy as node_occupancy

RESERVATION_REASON_PREFIX = "Reservation:"
"""``CommitRequest.reason`` of a reservation's activation: ``Reservation:<namespace>/<name>``."""

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

_HOURS_SLACK = 1e-6
"""GPU-hours of float noise tolerated in replayed figures (a few GPU-milliseconds)."""


class ConflictReason(StrEnum):
    """Why a commit was rejected (the ``reason`` label of ``jobtree_binder_conflicts_total``)."""

    INVALID = "Invalid"
    UNKNOWN_LEASE = "UnknownLease"
    UNKNOWN_NODE = "UnknownNode"
    NODE_UNSCHEDULABLE = "NodeUnschedulable"
    NODE_CAPACITY = "NodeCapacity"
    FILL_ROOM = "FillRoom"
    UNKNOWN_ENVELOPE = "UnknownEnvelope"
    ENVELOPE_WINDOW = "EnvelopeWindow"
    ENVELOPE_CONCURRENCY = "EnvelopeConcurrency"
    ENVELOPE_GPU_HOURS = "EnvelopeGPUHours"
    LENDING_LIMIT = "LendingLimit"
    AGGREGATE_CAP = "AggregateCap"
    PROTECTED = "ProtectedReservation"
    POD_FIT = "PodDoesNotFit"
    # Trust (``shared.control.commit_trust``): what the binder cannot justify from its caches.
    RUN_NOT_FOUND = "RunNotFound"
    STALE_RUN = "StaleRun"
    RUN_DELETING = "RunDeleting"
    UNAUTHORIZED = "Unauthorized"
    DEPENDENCIES = "Dependencies"
    OWNER = "OwnerMismatch"
    PAYER = "IneligiblePayer"
    PLACEMENT = "Placement"
    START_TIME = "StartTime"
    POD_GPUS = "PodGPUs"
    RESERVATION = "UnverifiedReservation"
    UNJUSTIFIED = "UnjustifiedEnd"
    KEY_REUSED = "KeyReused"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A commit the binder refuses: the typed reason and the numbers behind it."""

    reason: ConflictReason
    message: str

    @property
    def text(self) -> str:
        """``CommitReply.conflict``: reason first, so proposers can match on it."""
        return f"{self.reason.value}: {self.message}"


def _frozen_leases() -> Mapping[str, Lease]:
    return MappingProxyType({})


def _frozen_closures() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Inflight:
    """Writes the binder made that its watch caches may not show yet.

    Without this, two commits arriving back to back would both be checked against a cache that
    shows neither, and together they could overbook a node.
    """

    opened: Mapping[str, Lease] = field(default_factory=_frozen_leases)
    """Leases created (name → record)."""
    closed: Mapping[str, str] = field(default_factory=_frozen_closures)
    """Leases closed (name → closure reason)."""

    def with_commit(self, created: Iterable[Lease], ended: Iterable[tuple[str, str]]) -> Inflight:
        """This view plus the effects of one applied commit."""
        opened = dict(self.opened)
        opened.update((lease.name, lease) for lease in created)
        closed = dict(self.closed)
        closed.update(ended)
        return Inflight(MappingProxyType(opened), MappingProxyType(closed))

    def settle(self, seen: Mapping[str, Lease]) -> Inflight:
        """Drop what the cache (``seen``: lease name → record) now shows by itself."""
        opened = {n: le for n, le in self.opened.items() if n not in seen}
        closed = {n: c for n, c in self.closed.items() if not (n in seen and not seen[n].open)}
        if len(opened) == len(self.opened) and len(closed) == len(self.closed):
            return self
        return Inflight(MappingProxyType(opened), MappingProxyType(closed))

    def forget(self, opened: Iterable[str]) -> Inflight:
        """Drop leases counted before they were written whose creation did not happen."""
        gone = set(opened) & self.opened.keys()
        if not gone:
            return self
        kept = {n: le for n, le in self.opened.items() if n not in gone}
        return Inflight(MappingProxyType(kept), self.closed)

    def __bool__(self) -> bool:
        return bool(self.opened or self.closed)


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """What applying an accepted commit writes; empty parts mean "already done"."""

    creates: tuple[LeaseIntent, ...]
    """Leases that do not exist yet."""
    existing: tuple[str, ...]
    """Named leases that already exist (a re-sent or partly applied commit)."""
    ends: tuple[tuple[Lease, str], ...]
    """Open leases to close, with their closure reasons."""
    already_ended: tuple[str, ...]
    """Ends naming leases that are already closed."""
    pods: tuple[PodIntent, ...]
    """Pods whose rank holds an open lease on the pod's node once the commit is applied."""
    pod_leases: Mapping[str, tuple[str, ...]]
    """Pod name → the lease names its rank holds on its node (the pod's incarnation)."""
    open_after: tuple[Lease, ...]
    """Open leases of every run the commit touches, as they will be after it (pod clean-up)."""

    @property
    def noop(self) -> bool:
        """Nothing to write for the ledger (pods may still need to be (re)created)."""
        return not self.creates and not self.ends


def reservation_of(reason: str) -> tuple[str, str] | None:
    """``Reservation:<ns>/<name>`` → ``(ns, name)``; None for any other commit reason."""
    if not reason.startswith(RESERVATION_REASON_PREFIX):
        return None
    ns, sep, name = reason.removeprefix(RESERVATION_REASON_PREFIX).partition("/")
    return (ns, name) if sep and ns and name else None


def intent_lease(intent: LeaseIntent) -> Lease:
    """The ledger record a lease intent becomes once created."""
    return Lease(
        name=intent.name,
        run=intent.run,
        owner=intent.owner,
        node=intent.node,
        gpus=intent.gpus,
        role=intent.role,
        group=intent.group,
        rank=intent.rank,
        envelope=intent.envelope,
        payer_owner=intent.payer_owner,
        funding=intent.funding,
        start=intent.start,
        reason=intent.reason,
        expected_end=intent.expected_end,
    )


def _closed_now(lease: Lease, closure: str, now: datetime) -> Lease:
    """An open lease as it reads once closed at ``now``."""
    return dataclasses.replace(lease, end=now, closure=closure)


def ledger_view(state: ClusterState, inflight: Inflight) -> dict[str, Lease]:
    """Every lease the binder knows by name: the cache's, then in-flight creates and closes."""
    known = {lease.name: lease for lease in state.ledger}
    for name, lease in inflight.opened.items():
        known.setdefault(name, lease)
    for name, closure in inflight.closed.items():
        was = known.get(name)
        if was is not None and was.open:
            known[name] = _closed_now(was, closure, state.now)
    return known


def occupancy(leases: Iterable[Lease]) -> int:
    """Physical GPUs the leases of one node hold: fill (Borrowed) lives inside spare GPUs."""
    return node_occupancy((lease.gpus, lease.role) for lease in leases)


def _validate_shape(request: CommitRequest) -> Rejection | None:
    """Structural sanity: unique names, one run for every start, pods on their ranks' nodes."""
    run = request.run.key
    names = [lease.name for lease in request.leases]
    if len(set(names)) != len(names):
        return Rejection(ConflictReason.INVALID, "the commit names a lease twice")
    ended = [end.name for end in request.ends]
    if len(set(ended)) != len(ended):
        return Rejection(ConflictReason.INVALID, "the commit ends a lease twice")
    both = sorted(set(names) & set(ended))
    if both:
        return Rejection(ConflictReason.INVALID, f"leases both started and ended: {both}")
    for lease in request.leases:
        if lease.run != run:
            return Rejection(
                ConflictReason.INVALID,
                f"lease {lease.name} is for {lease.run[0]}/{lease.run[1]}, "
                f"the commit for {run[0]}/{run[1]}",
            )
        if lease.gpus < 1:
            return Rejection(ConflictReason.INVALID, f"lease {lease.name} holds {lease.gpus} GPUs")
    pod_names = [pod.name for pod in request.pods]
    if len(set(pod_names)) != len(pod_names):
        return Rejection(ConflictReason.INVALID, "the commit names a pod twice")
    for pod in request.pods:
        if pod.run != run:
            return Rejection(ConflictReason.INVALID, f"pod {pod.name} is for another run")
    return None


def _rank_leases(
    run: RunKey, leases: Iterable[Lease | LeaseIntent]
) -> dict[tuple[int, str], list[str]]:
    """(rank, node) → lease names of a run's working (non-spare) leases."""
    out: dict[tuple[int, str], list[str]] = {}
    for lease in leases:
        if lease.run == run and lease.rank >= 0 and lease.role is not Role.SPARE:
            out.setdefault((lease.rank, lease.node), []).append(lease.name)
    return out


def _check_nodes(
    request: CommitRequest,
    state: ClusterState,
    creates: Sequence[Lease],
    open_after: Sequence[Lease],
) -> Rejection | None:
    """Capacity per node after the ends, fill only inside other runs' unfilled spares, and no
    new GPUs on another reservation's claim.

    Claims of the committing Run itself never block it, nor does the claim of the reservation
    this commit activates (``reason`` ``Reservation:<ns>/<name>``).
    """
    by_node: dict[str, list[Lease]] = {}
    for lease in open_after:
        by_node.setdefault(lease.node, []).append(lease)
    new_by_node: dict[str, list[Lease]] = {}
    for lease in creates:
        new_by_node.setdefault(lease.node, []).append(lease)
    own = reservation_of(request.reason)
    claims = tuple(
        c for c in state.claims if c.run != request.run.key and (c.run[0], c.name) != own
    )
    for name in sorted(new_by_node):
        node = state.topology.node(name)
        if node is None:
            return Rejection(ConflictReason.UNKNOWN_NODE, f"node {name} is not a known GPU node")
        if not node.schedulable:
            why = "cordoned" if node.ready else "not Ready"
            return Rejection(ConflictReason.NODE_UNSCHEDULABLE, f"node {name} is {why}")
        fill = sum(le.gpus for le in new_by_node[name] if le.role is Role.BORROWED)
        room = spare_room(by_node.get(name, ()), request.run.key).get(name, 0) if fill else 0
        if fill > room:
            return Rejection(
                ConflictReason.FILL_ROOM,
                f"node {name} has {room} unfilled spare GPUs of other runs; "
                f"the commit borrows {fill}",
            )
        load = state.topology.load(name)
        before = occupancy(by_node.get(name, ()))
        after = occupancy((*by_node.get(name, ()), *new_by_node[name]))
        if after + load.gpus > node.gpus:
            others = f" and {load.gpus} by other pods" if load.gpus else ""
            return Rejection(
                ConflictReason.NODE_CAPACITY,
                f"node {name} has {node.gpus} GPUs, {before} held{others}; "
                f"the commit needs {after - before} more",
            )
        misfit = _pod_misfit(node, load, new_by_node[name], state)
        if misfit is not None:
            return Rejection(ConflictReason.POD_FIT, misfit)
        if after > before and claims:
            protected = _protected_on(name, new_by_node[name], claims, state)
            if after + protected > node.gpus:
                return Rejection(
                    ConflictReason.PROTECTED,
                    f"node {name}: {protected} of its {node.gpus} GPUs are promised to a "
                    f"Reservation, {before} held; the commit needs {after - before} more",
                )
    return None


def assumed_pods(creates: Iterable[PodIntent], state: ClusterState) -> tuple[PodChange, ...]:
    """The pods an accepted commit will create, as the pod watch will count them (``namespace/
    name`` on their node; GPUs 0, since their leases hold those), so the binder counts their CPU,
    memory, storage and pod slot at once instead of when the watch shows them."""
    out: list[PodChange] = []
    for pod in creates:
        request = state.runs.get(pod.run)
        needs = request.pod if request is not None else NO_NEEDS
        use = pod_use((0, needs.cpu, needs.memory, needs.ephemeral))
        out.append((f"{pod.run[0]}/{pod.name}", pod.node, use))
    return tuple(out)


def _pod_misfit(node: Node, load: Load, new: Sequence[Lease], state: ClusterState) -> str | None:
    """Why the rank pods the new working leases start on ``node`` would be refused by its
    kubelet (taints, the template's selectors, CPU/memory/storage/pod slots after the node's other
    pods), judged on the Run as the binder's own cache knows it; None when they fit."""
    ranks: dict[RunKey, set[int]] = {}
    for lease in new:
        if lease.rank >= 0 and lease.role is not Role.SPARE:
            ranks.setdefault(lease.run, set()).add(lease.rank)
    for run, started in sorted(ranks.items()):
        request = state.runs.get(run)
        needs = request.pod if request is not None else NO_NEEDS
        why = exclusion(node, load, needs)
        if why is None and len(started) > slots(node.capacity, load, needs):
            why = short_resource(node.capacity, load, needs) or Exclusion.PODS
        if why is not None:
            return f"node {node.name}: a rank pod of {run[0]}/{run[1]} does not fit ({why})"
    return None


def _protected_on(
    node: str,
    leases: Sequence[Lease],
    claims: Sequence[ReservationClaim],
    state: ClusterState,
) -> int:
    """GPUs of ``node`` the new leases may not take: the engine's backfill rule, per lease.

    A lease may use a claim's GPUs only when its walltime (``expected_end``) ends before the
    claim's earliestStart; the strictest of the node's new leases decides.
    """
    worst = 0
    for lease in leases:
        duration = None if lease.expected_end is None else lease.expected_end - lease.start
        probe = RunRequest(
            key=lease.run,
            uid="",
            owner=lease.owner,
            flavor="",
            total_gpus=lease.gpus,
            max_duration=duration,
        )
        protected = claim_protection(probe, claims, state.topology, lease.start)
        worst = max(worst, protected.get(node, 0))
    return worst


def _envelope_load(leases: Iterable[Lease]) -> tuple[dict[str, int], dict[str, int]]:
    """GPUs per paying envelope, and the sponsor-funded (lent) part of them."""
    total: dict[str, int] = {}
    lent: dict[str, int] = {}
    for lease in leases:
        total[lease.envelope] = total.get(lease.envelope, 0) + lease.gpus
        if lease.funding is FundingKind.SPONSOR:
            lent[lease.envelope] = lent.get(lease.envelope, 0) + lease.gpus
    return total, lent


def _cap_members(budget: str, refs: Iterable[str]) -> tuple[str, ...]:
    """Envelope keys a cap bounds (bare names are in the cap's own budget)."""
    return tuple(dict.fromkeys(ref if "/" in ref else f"{budget}/{ref}" for ref in refs))


def _window_shut(envelope: Envelope, now: datetime) -> str:
    """Why cover would not fund from ``envelope`` at ``now`` (its window is not open)."""
    if envelope.end is not None and now >= envelope.end:
        return (
            f"envelope {envelope.key} closed at {envelope.end.isoformat()}; "
            f"the commit is at {now.isoformat()}"
        )
    opens = envelope.start.isoformat() if envelope.start is not None else "?"
    return (
        f"envelope {envelope.key} opens at {opens} and does not admit before it "
        f"(preActivation.allowAdmission); the commit is at {now.isoformat()}"
    )


def _check_budgets(
    state: ClusterState, creates: Sequence[Lease], open_after: Sequence[Lease]
) -> Rejection | None:
    """Envelope windows, then concurrency of envelopes, lending sub-caps and aggregate caps,
    counting only what grows.

    The window rule is cover's (``window_allows`` at ``state.now``, as admission asks it), so a
    start planned just before a window closed does not land after it. ``Swap`` leases are exempt:
    they move GPUs the same envelope already pays (spare to active) and open no new spending.
    """
    added, added_lent = _envelope_load(creates)
    held, held_lent = _envelope_load(open_after)
    opening = {lease.envelope for lease in creates if lease.reason is not LeaseReason.SWAP}
    for key in sorted(added):
        try:
            envelope = state.family.envelope(key)
        except KeyError:
            return Rejection(ConflictReason.UNKNOWN_ENVELOPE, f"no envelope {key}")
        if key in opening and not window_allows(envelope, state.now):
            return Rejection(ConflictReason.ENVELOPE_WINDOW, _window_shut(envelope, state.now))
        now = held.get(key, 0)
        if now + added[key] > envelope.concurrency:
            return Rejection(
                ConflictReason.ENVELOPE_CONCURRENCY,
                f"envelope {key} allows {envelope.concurrency} GPUs, {now} held; "
                f"the commit adds {added[key]}",
            )
        lent_add = added_lent.get(key, 0)
        if lent_add:
            lending = envelope.lending
            if not lending.allow:
                return Rejection(ConflictReason.LENDING_LIMIT, f"envelope {key} does not lend")
            lent_now = held_lent.get(key, 0)
            if lending.max_concurrency is not None and lent_now + lent_add > (
                lending.max_concurrency
            ):
                return Rejection(
                    ConflictReason.LENDING_LIMIT,
                    f"envelope {key} lends at most {lending.max_concurrency} GPUs, {lent_now} "
                    f"lent; the commit borrows {lent_add}",
                )
    seen: set[str] = set()
    for key in sorted(added):
        for cap in state.family.caps_for(key):
            if cap.key in seen or cap.max_concurrency is None:
                continue
            seen.add(cap.key)
            members = _cap_members(cap.budget, cap.envelopes)
            now = sum(held.get(k, 0) for k in members)
            more = sum(added.get(k, 0) for k in members)
            if now + more > cap.max_concurrency:
                return Rejection(
                    ConflictReason.AGGREGATE_CAP,
                    f"aggregate cap {cap.key} allows {cap.max_concurrency} GPUs, {now} held; "
                    f"the commit adds {more}",
                )
    return None


def _replay(leases: Iterable[Lease], caps: Iterable[AggregateCap], state: ClusterState) -> Usage:
    """Accounting's usage of ``leases`` at ``state.now`` (spares at the spare factor).

    An open lease dated after ``now`` (a proposer's clock a little ahead of ours) is counted
    from ``now`` rather than skipped, so clock skew cannot hide a commit from the check.
    """
    now = state.now
    dated = (
        le if le.start <= now or not le.open else dataclasses.replace(le, start=now)
        for le in leases
    )
    return usage_from_ledger(dated, caps, now=now, spare_factor=state.settings.spare_factor)


def _hours_over(
    limit: float, was: Meter, will: Meter, default_hours: float
) -> tuple[float, float] | None:
    """(GPU-hours used or promised, what the commit adds) when the commit overspends ``limit``.

    Headroom is cover's (consumed + committed + one default duration per unbounded GPU). It must
    stay ≥ 0, or not shrink when it was already negative (unbounded leases keep growing past
    their default): a commit that adds nothing net, like a swap, is never refused for hours.
    """
    left_was = hours_left(limit, was, default_hours)
    left = hours_left(limit, will, default_hours)
    if left >= min(0.0, left_was) - _HOURS_SLACK:
        return None
    return limit - left_was, left_was - left


def _hours_text(hours: float) -> str:
    """GPU-hours for a message: two decimals at most."""
    return f"{hours:.2f}".rstrip("0").rstrip(".")


def _check_hours(
    state: ClusterState,
    creates: Sequence[Lease],
    ledger: Iterable[Lease],
    ends: Sequence[tuple[Lease, str]],
) -> Rejection | None:
    """GPU-hours of the envelopes, lending sub-caps and aggregate caps the commit adds GPUs to.

    Cover bounded hours when the commit was planned, but two Runs planned on one snapshot can
    both spend the same headroom. So accounting replays the binder's ledger (``ledger``: cache
    plus in-flight writes) before the commit and after it (its ends closed now, its new leases
    open), and cover's headroom rule prices both: each lease until its expected end, one default
    duration for those without, spares at the spare factor.
    """
    family = state.family
    added, added_lent = _envelope_load(creates)
    envelopes = [family.envelope(key) for key in sorted(added)]
    own = [(e.key, limit) for e in envelopes if (limit := e.max_gpu_hours) is not None]
    lent = [
        (e.key, limit)
        for e in envelopes
        if e.key in added_lent and (limit := e.lending.max_gpu_hours) is not None
    ]
    caps = {
        cap.key: (cap, limit)
        for e in envelopes
        for cap in family.caps_for(e.key)
        if (limit := cap.max_gpu_hours) is not None
    }
    if not own and not lent and not caps:
        return None
    members = set(added).union(*(_cap_members(c.budget, c.envelopes) for c, _ in caps.values()))
    before = [lease for lease in ledger if lease.envelope in members]
    closing = {lease.name: closure for lease, closure in ends}
    after = [
        _closed_now(le, closing[le.name], state.now) if le.name in closing else le for le in before
    ]
    bounded = [cap for cap, _ in caps.values()]
    was = _replay(before, bounded, state)
    will = _replay([*after, *creates], bounded, state)
    default_hours = state.settings.default_duration / timedelta(hours=1)
    envelope_checks = [
        (f"envelope {key} allows", limit, was.envelope(key).total, will.envelope(key).total)
        for key, limit in own
    ]
    lending_checks = [
        (f"envelope {key} lends at most", limit, was.envelope(key).lent, will.envelope(key).lent)
        for key, limit in lent
    ]
    cap_checks = [
        (f"aggregate cap {key} allows", limit, was.cap(key), will.cap(key))
        for key, (_, limit) in sorted(caps.items())
    ]
    checks = [
        *((ConflictReason.ENVELOPE_GPU_HOURS, "used", "adds", *c) for c in envelope_checks),
        *((ConflictReason.LENDING_LIMIT, "lent", "borrows", *c) for c in lending_checks),
        *((ConflictReason.AGGREGATE_CAP, "used", "adds", *c) for c in cap_checks),
    ]
    for reason, used, verb, head, limit, before_meter, after_meter in checks:
        over = _hours_over(limit, before_meter, after_meter, default_hours)
        if over is not None:
            return Rejection(
                reason,
                f"{head} {_hours_text(limit)} GPU-hours, {_hours_text(over[0])} {used} or "
                f"promised; the commit {verb} {_hours_text(over[1])}",
            )
    return None


def plan_commit(
    request: CommitRequest, state: ClusterState, inflight: Inflight | None = None
) -> CommitPlan | Rejection:
    """Validate ``request`` and say exactly what applying it writes (or why it may not)."""
    inflight = inflight or Inflight()
    bad = _validate_shape(request)
    if bad is not None:
        return bad
    known = ledger_view(state, inflight)
    ends: list[tuple[Lease, str]] = []
    already: list[str] = []
    for end in request.ends:
        lease = known.get(end.name)
        if lease is None:
            return Rejection(ConflictReason.UNKNOWN_LEASE, f"lease {end.name} does not exist")
        if lease.open:
            ends.append((lease, end.closure))
        else:
            already.append(end.name)
    creates = [intent for intent in request.leases if intent.name not in known]
    existing = tuple(intent.name for intent in request.leases if intent.name in known)
    ending = {lease.name for lease, _ in ends}
    open_after = [le for le in known.values() if le.open and le.name not in ending]
    new = [intent_lease(intent) for intent in creates]
    if new:
        rejected = (
            _check_nodes(request, state, new, open_after)
            or _check_budgets(state, new, open_after)
            or _check_hours(state, new, known.values(), ends)
        )
        if rejected is not None:
            return rejected
    after = [*open_after, *new]
    runs = {request.run.key} | {lease.run for lease, _ in ends}
    ranks = _rank_leases(request.run.key, after)
    pods: list[PodIntent] = []
    pod_leases: dict[str, tuple[str, ...]] = {}
    for pod in request.pods:
        names = ranks.get((pod.rank, pod.node))
        if names is None:
            if any(
                intent.rank == pod.rank and intent.node == pod.node for intent in request.leases
            ):
                continue  # its leases exist but are closed: the rank is over, no pod
            return Rejection(
                ConflictReason.INVALID,
                f"pod {pod.name} (rank {pod.rank}) has no lease on node {pod.node}",
            )
        pods.append(pod)
        pod_leases[pod.name] = tuple(sorted(names))
    plan = CommitPlan(
        creates=tuple(creates),
        existing=existing,
        ends=tuple(ends),
        already_ended=tuple(already),
        pods=tuple(pods),
        pod_leases=MappingProxyType(pod_leases),
        open_after=tuple(le for le in after if le.run in runs),
    )
    clash = rank_clash(plan)
    return plan if clash is None else Rejection(ConflictReason.INVALID, clash)


def rank_clash(plan: CommitPlan) -> str | None:
    """A new working lease for a rank that another open lease already keeps running.

    A rank is one pod on one node. A proposal numbered on a view that missed some of the Run's
    Leases (a grow planned before another proposer's bind showed up, or a start re-planned after
    a timed-out commit went through after all) would otherwise start a second incarnation of a
    live rank: on another node it would replace that rank's pod, on the same node it would hold
    the GPUs twice. Only ranks the commit starts are checked, against open leases the commit
    neither names nor ends (a swap ends the old lease in the same commit, so it never clashes).
    """
    mine = {i.name for i in plan.creates} | set(plan.existing)
    new = {(i.run, i.rank) for i in plan.creates if i.rank >= 0 and i.role is not Role.SPARE}
    held: dict[tuple[RunKey, int], set[str]] = {}
    for lease in plan.open_after:
        key = (lease.run, lease.rank)
        if key in new and lease.role is not Role.SPARE and lease.name not in mine:
            held.setdefault(key, set()).add(lease.node)
    if not held:
        return None
    (run, rank), nodes = min(held.items())
    return (
        f"rank {rank} of {run[0]}/{run[1]} already runs on {', '.join(sorted(nodes))}; "
        "the proposal missed the Run's current Leases"
    )


def check_commit(
    request: CommitRequest, state: ClusterState, inflight: Inflight | None = None
) -> Rejection | None:
    """None when the commit may be applied (possibly as a no-op), else why not."""
    plan = plan_commit(request, state, inflight)
    return plan if isinstance(plan, Rejection) else None


PodKey = tuple[str, str]
"""(namespace, name) of a pod."""


@dataclass(frozen=True, slots=True)
class PodState:
    """What the binder's pod cache (or a fresh read) says about one existing pod."""

    namespace: str
    name: str
    node: str
    phase: str
    leases: tuple[str, ...] = ()
    """The lease names it was created for (its incarnation); empty when unknown."""
    deleting: bool = False

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class PodChanges:
    """Pod writes that go with a commit."""

    delete: tuple[PodKey, ...]
    """Pods whose rank no longer holds their node (ended, swapped away) and that still run."""
    replace: tuple[PodKey, ...]
    """Existing pods in the way of a new incarnation under the same name: delete, then create."""
    create: tuple[PodIntent, ...]


def same_incarnation(pod: PodState, intent: PodIntent, leases: Iterable[str]) -> bool:
    """The existing pod already is this rank's pod: same node, alive, created for these leases."""
    if pod.deleting or pod.phase in TERMINAL_PHASES or pod.node != intent.node:
        return False
    return not pod.leases or set(pod.leases) == set(leases)


def pods_touched(plan: CommitPlan) -> set[PodKey]:
    """The only pods ``pod_changes`` looks at: the ranks the commit starts and the ranks of the
    working leases it ends (so a commit reads a handful of pods, not every pod in the cache)."""
    keys = {(intent.run[0], intent.name) for intent in plan.pods}
    keys.update(
        (lease.run[0], pod_name(lease.run[1], lease.group, lease.rank))
        for lease, _ in plan.ends
        if lease.rank >= 0 and lease.role is not Role.SPARE
    )
    return keys


def pod_changes(plan: CommitPlan, pods: Mapping[PodKey, PodState]) -> PodChanges:
    """Which pods to delete, replace and create so pods match the leases after the commit.

    A rank's pod is deleted when no open lease keeps that rank on the pod's node; a pod that has
    already terminated holds nothing and is kept (its logs stay readable) until its name is
    needed again. A pod is (re)created unless the same incarnation already stands on its node.
    """
    keep = _rank_leases_all(plan.open_after)
    delete: list[PodKey] = []
    for lease, _ in plan.ends:
        if lease.rank < 0 or lease.role is Role.SPARE:
            continue
        key = (lease.run[0], pod_name(lease.run[1], lease.group, lease.rank))
        pod = pods.get(key)
        if pod is None or pod.deleting or pod.phase in TERMINAL_PHASES or key in delete:
            continue
        if (lease.run, lease.rank, pod.node) not in keep:
            delete.append(key)
    replace: list[PodKey] = []
    create: list[PodIntent] = []
    for intent in plan.pods:
        key = (intent.run[0], intent.name)
        pod = pods.get(key)
        if pod is not None and same_incarnation(pod, intent, plan.pod_leases.get(intent.name, ())):
            continue
        if pod is not None:
            replace.append(key)
        create.append(intent)
    delete = [key for key in delete if key not in replace]
    return PodChanges(delete=tuple(delete), replace=tuple(replace), create=tuple(create))


def _rank_leases_all(leases: Iterable[Lease]) -> set[tuple[RunKey, int, str]]:
    """(run, rank, node) of every open working lease."""
    return {
        (lease.run, lease.rank, lease.node)
        for lease in leases
        if lease.open and lease.rank >= 0 and lease.role is not Role.SPARE
    }
