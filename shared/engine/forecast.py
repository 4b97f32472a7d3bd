"""Reservations: when a blocked Run can start, what it lacks now, and what activation would cut.

``earliestStart`` is computed by replaying the timeline the cluster already knows: open leases end
at their expected end (start + maxDuration), budget windows open and close, earlier reservations
take their slices. The first instant at which cover and pack succeed is the ETA.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from shared.engine.accounting import Meter, Usage
from shared.engine.admit import Blocked, Start, try_start
from shared.engine.cover import requested_locations
from shared.engine.deficit import capacity_deficit, min_demand
from shared.engine.model import (
    DOMAIN_LABELS,
    AggregateCap,
    FundingKind,
    Lease,
    ReservationClaim,
    Role,
    RunKey,
    RunRequest,
    selector_matches,
)
from shared.engine.pack import Placement
from shared.engine.resolver import Remedies, Scope, remedies
from shared.engine.state import ClusterState

CapsOf = Callable[[str], Sequence[AggregateCap]]


class Confidence(StrEnum):
    """What an ETA rests on."""

    WINDOW_ALIGNED = "window-aligned"
    """A budget window opens then."""
    WALLTIME = "walltime"
    """Running leases reach their maxDuration by then."""
    CONSERVATIVE = "conservative"
    """Nothing known bounds it: the configured lead, after which activation resolves."""


@dataclass(frozen=True, slots=True)
class Forecast:
    earliest_start: datetime
    confidence: Confidence
    blocked: Blocked
    """Why the Run cannot start now (typed cover/pack reason, verbatim)."""
    scope: Scope
    deficit_gpus: int
    """GPUs missing now in scope (capacity: ``shared.engine.deficit``, whose scope this is) or in
    the paying envelope (funding)."""
    remedies: Remedies
    placement: Placement | None
    """The slice the Run would take at ``earliest_start`` (None when conservative)."""
    funding_scope_envelope: str | None = None
    """Set when the deficit is the owner's own envelope held by relatives or borrowers."""
    open_claims: tuple[str, ...] = ()
    """Claims in scope whose claimant has no walltime, held open-ended: the ETA waits behind
    them as long as they last (said in the status so the user knows why)."""

    def countdown_seconds(self, now: datetime) -> int:
        return max(0, int((self.earliest_start - now).total_seconds()))

    @property
    def paying_envelope(self) -> str | None:
        if self.placement is None or not self.placement.slices:
            return None
        return self.placement.slices[0].envelope


def request_scope(request: RunRequest, state: ClusterState) -> Scope:
    """Flavor plus requested location, and the nodes of the topology inside it."""
    location = dict(request.selector)
    if not location:
        own = state.family.envelopes_of(request.owner)
        found = requested_locations(request, [e for e in own if e.flavor == request.flavor])
        location = dict(found[0]) if found else {}
    label = "/".join(location.get(key, "*") for key in DOMAIN_LABELS)
    nodes = frozenset(
        node.name
        for domain in state.topology.domains(request.flavor)
        for node in state.topology.nodes_in(request.flavor, domain)
        if selector_matches(location, node.labels)
    )
    return Scope(flavor=request.flavor, nodes=nodes, label=f"{request.flavor}@{label}")


def funding_scope(request: RunRequest, state: ClusterState) -> str | None:
    """The owner's own envelope whose headroom relatives or borrowers hold, if any."""
    for envelope in state.family.envelopes_of(request.owner):
        if envelope.flavor != request.flavor:
            continue
        usage = state.usage.envelope(envelope.key)
        if usage.shared.gpus + usage.borrowed_out.gpus > 0:
            return envelope.key
    return None


_expected_end = operator.attrgetter("expected_end")


class _Timeline:
    """Open leases by expected end, and the first instant the scope could hold the Run at all.

    Built once per forecast: "what has ended by t" is then a bisect and a slice. ``room_from`` is
    a necessary condition found in one O(n) sweep (free GPUs in scope, and for grouped Runs
    enough domains with a group's worth free), so attempts start where they can succeed.
    """

    def __init__(self, request: RunRequest, state: ClusterState, scope: Scope) -> None:
        bounded = [x for x in state.ledger if x.end is None and x.expected_end is not None]
        bounded.sort(key=_expected_end)
        self.leases = bounded
        self.ends: list[datetime] = [_expected_end(x) for x in bounded]
        self.room_from = self._sweep(request, state, scope)

    def ended(self, at: datetime) -> list[Lease]:
        return self.leases[: bisect.bisect_right(self.ends, at)]

    def _sweep(self, request: RunRequest, state: ClusterState, scope: Scope) -> datetime | None:
        topology = state.topology
        domain_of = {name: topology.domain_of(name) for name in scope.nodes or ()}
        free: dict[object, int] = {}
        for name, domain in domain_of.items():
            free[domain] = free.get(domain, 0) + topology.free(name)
        group = request.group_gpus or (request.malleable.step_gpus if request.malleable else 0)
        need = min_demand(request)
        width = request.malleable.min_gpus if request.malleable else request.total_gpus
        groups_needed = -(-width // group) if group else 0
        total = sum(free.values())
        placeable = sum(f // group for f in free.values()) if group else 0
        if total >= need and placeable >= groups_needed:
            return state.now
        for lease, end in zip(self.leases, self.ends, strict=True):
            if lease.node not in domain_of:
                continue
            domain = domain_of[lease.node]
            before = free[domain]
            free[domain] = before + lease.gpus
            total += lease.gpus
            if group:
                placeable += free[domain] // group - before // group
            if total >= need and placeable >= groups_needed:
                return end
        return None


@dataclass(frozen=True, slots=True)
class _Edges:
    """Instants where feasibility may jump either way, and what each one is."""

    instants: list[datetime]
    """Sorted: window openings and closings, claim ends, last backfill instants before claims."""
    opens: frozenset[datetime]
    """Window openings: an ETA here is ``window-aligned``."""
    gives: frozenset[datetime]
    """Edges that give room (window openings, claim ends): worth an attempt of their own. The
    others only take room away, so an attempt there repeats the last one before them."""


def _edges(request: RunRequest, state: ClusterState, own_claim: str | None) -> _Edges:
    """Cut the horizon where something other than a lease end changes what fits.

    A claim protects its GPUs over its whole interval (earliestStart to earliestStart + the
    claimant's walltime, open-ended without one); a Run with walltime W may still backfill it
    while it would end by the claim's start, i.e. up to earliestStart − W. Between two edges the
    set of claims that bind the Run is constant, so only lease ends happen there.
    """
    now, limit = state.now, state.now + state.settings.horizon
    bounds: set[datetime] = set()
    opens: set[datetime] = set()
    gives: set[datetime] = set()
    for envelope in state.family.all_envelopes():
        if envelope.flavor != request.flavor:
            continue
        # A window that has not opened is something to wait for only when its preActivation
        # lets Runs hold reservations against it; its closing always changes what fits.
        opening = envelope.start if envelope.reservations_before_start else None
        if opening is not None and now < opening <= limit:
            bounds.add(opening)
            opens.add(opening)
        if envelope.end is not None and now < envelope.end <= limit:
            bounds.add(envelope.end)
    for claim in state.claims:
        if claim.name == own_claim:
            continue
        if claim.end is not None and now < claim.end <= limit:
            bounds.add(claim.end)
            gives.add(claim.end)
        if request.max_duration is not None:
            last = claim.earliest_start - request.max_duration
            if now < last <= limit:
                bounds.add(last)
    return _Edges(sorted(bounds), frozenset(opens), frozenset(opens | gives))


def claims_at(
    claims: Iterable[ReservationClaim], at: datetime, own_claim: str | None = None
) -> tuple[ReservationClaim, ...]:
    """Claims still holding GPUs at ``at``: all but the Run's own and those whose interval ended.

    Claims that start after ``at`` stay: the backfill rule (``claim_protection``) lets the Run
    use them only when its walltime ends before they start.
    """
    return tuple(c for c in claims if c.name != own_claim and (c.end is None or c.end > at))


def _released(meter: Meter, gpus: int) -> Meter:
    return meter._replace(gpus=meter.gpus - gpus)


_PARTS = ("total", "owned", "shared", "borrowed_out", "spare", "lent")
_CLASS_OF = {FundingKind.OWNED: 1, FundingKind.FAMILY: 2, FundingKind.SPONSOR: 3}


def usage_at(usage: Usage, ended: Iterable[Lease], caps_for: CapsOf) -> Usage:
    """Usage as cover sees it once ``ended`` leases reached their expected end.

    Only concurrency moves: a bounded lease's consumed plus committed GPU-hours already count its
    whole expected interval, and unbounded leases are priced one default duration by cover at any
    instant. Equal to a replay of the ledger for every figure cover reads, at O(ended) cost.
    """
    released: dict[str, list[int]] = {}
    for lease in ended:
        row = released.get(lease.envelope)
        if row is None:
            row = released[lease.envelope] = [0] * len(_PARTS)
        row[0] += lease.gpus
        row[4 if lease.role is Role.SPARE else _CLASS_OF[lease.funding]] += lease.gpus
        if lease.funding is FundingKind.SPONSOR:
            row[5] += lease.gpus
    if not released:
        return usage
    envelopes = dict(usage.envelopes)
    cap_meters = dict(usage.caps)
    for key, row in released.items():
        current = usage.envelope(key)
        envelopes[key] = current._replace(
            **{
                part: _released(getattr(current, part), gpus)
                for part, gpus in zip(_PARTS, row, strict=True)
                if gpus
            }
        )
        for cap in caps_for(key):
            cap_meters[cap.key] = _released(cap_meters.get(cap.key, usage.cap(cap.key)), row[0])
    return dataclasses.replace(
        usage, envelopes=MappingProxyType(envelopes), caps=MappingProxyType(cap_meters)
    )


def _attempt(
    request: RunRequest,
    state: ClusterState,
    timeline: _Timeline,
    at: datetime,
    own_claim: str | None,
) -> Start | Blocked:
    ended = timeline.ended(at)
    claims = claims_at(state.claims, at, own_claim)
    return try_start(
        request,
        dataclasses.replace(state, claims=claims),
        at=at,
        topology=state.topology.without_leases(ended),
        usage=usage_at(state.usage, ended, state.family.caps_for),
    )


def earliest_start(
    request: RunRequest, state: ClusterState, *, own_claim: str | None = None
) -> tuple[datetime, Confidence, Placement | None]:
    """Replay the timeline stretch by stretch (stretches split at window and claim edges).

    Inside a stretch only lease ends happen; they only add capacity and headroom while the
    binding claims stay the same, so feasibility is monotone there. The cheap capacity test
    finds where an attempt can first succeed, then a galloping search (1, 2, 4, … candidates
    ahead, then bisection) bounds the cover+pack attempts to O(log n) per stretch. Leases
    already past their walltime count as ending now.
    """
    scope = request_scope(request, state)
    timeline = _Timeline(request, state, scope)
    limit = state.now + state.settings.horizon
    ends = sorted({max(t, state.now) for t in timeline.ends if t <= limit})
    room_from = timeline.room_from
    if room_from is None:
        return state.now + state.settings.conservative_lead, Confidence.CONSERVATIVE, None
    edges = _edges(request, state, own_claim)
    stretches: list[datetime | None] = [None, *edges.instants]
    for i, start in enumerate(stretches):
        stop = stretches[i + 1] if i + 1 < len(stretches) else None
        lo = 0 if start is None else bisect.bisect_left(ends, start)
        hi = len(ends) if stop is None else bisect.bisect_left(ends, stop)
        times = ends[lo:hi]
        if start in edges.gives and (not times or times[0] != start):
            times = [start, *times]
        times = times[bisect.bisect_left(times, room_from) :]
        if not times:
            continue
        fits = _first_fit(times, lambda t: _attempt(request, state, timeline, t, own_claim))
        if fits is not None:
            at, placement = fits
            return at, label(at, edges.opens), placement
    return state.now + state.settings.conservative_lead, Confidence.CONSERVATIVE, None


def walltime_backfill_eta(request: RunRequest, state: ClusterState) -> datetime | None:
    """The plain walltime-backfill answer (Slurm's ``squeue --start``): the first instant enough
    GPUs in scope are free once running leases reach their walltime, ignoring budgets and queued
    Reservations. Only the replay's baseline: the promise is :func:`earliest_start`."""
    return _Timeline(request, state, request_scope(request, state)).room_from


def label(at: datetime, window_openings: frozenset[datetime]) -> Confidence:
    """What determines a found ETA: a window opening, else the walltimes that end by then.

    The first fit is always at a candidate where capacity or headroom grew — a lease end, a
    claim's end (the claimant's walltime) or a window opening; window closings and backfill
    limits only take room away, so they never determine an ETA.
    """
    return Confidence.WINDOW_ALIGNED if at in window_openings else Confidence.WALLTIME


def _first_fit(
    times: Sequence[datetime], attempt: Callable[[datetime], Start | Blocked]
) -> tuple[datetime, Placement] | None:
    """First instant whose attempt starts the Run, by galloping then bisection."""
    failed, step, probe = -1, 1, 0
    found: tuple[int, Placement] | None = None
    while probe < len(times):
        got = attempt(times[probe])
        if isinstance(got, Start):
            found = (probe, got.placement)
            break
        failed, probe, step = probe, probe + step, step * 2
    if found is None:
        if failed == len(times) - 1:
            return None
        last = attempt(times[-1])
        if not isinstance(last, Start):
            return None
        found = (len(times) - 1, last.placement)
    lo, hi = failed + 1, found[0]
    best = found
    while lo < hi:
        mid = (lo + hi) // 2
        got = attempt(times[mid])
        if isinstance(got, Start):
            best, hi = (mid, got.placement), mid
        else:
            lo = mid + 1
    return times[best[0]], best[1]


def forecast(
    request: RunRequest, state: ClusterState, blocked: Blocked, *, own_claim: str | None = None
) -> Forecast:
    """Everything a Reservation publishes for a Run that ``try_start`` just refused."""
    scope = request_scope(request, state)
    at, confidence, placement = earliest_start(request, state, own_claim=own_claim)
    protected_runs = [request.key]
    held = open_claims(state.claims, scope, own_claim)
    if blocked.stage == "cover":
        envelope = funding_scope(request, state)
        deficit = max(blocked.shortfall, 0)
        cuts = remedies(
            deficit if envelope is not None else 0,
            scope,
            _cuttable_leases(state, scope, request.key, envelope),
            state.runs,
            protected_runs,
            funding_scope_envelope=envelope,
        )
        return Forecast(at, confidence, blocked, scope, deficit, cuts, placement, envelope, held)
    missing = capacity_deficit(request, state.topology, scope)
    leases = _cuttable_leases(state, missing.scope, request.key, None)
    cuts = remedies(missing.gpus, missing.scope, leases, state.runs, protected_runs)
    return Forecast(
        at, confidence, blocked, missing.scope, missing.gpus, cuts, placement, None, held
    )


def _cuttable_leases(
    state: ClusterState, scope: Scope, protected: RunKey, envelope: str | None
) -> tuple[Lease, ...]:
    """The open leases the remedies preview reads: every lease of a Run it may cut that has a
    lease counting against the deficit (on a scope node, or paid by the funding envelope as
    family or sponsor), and every lease on the nodes those Runs use (a node's occupancy decides
    what a cut frees there). A superset of what the resolver's book touches, so the preview is
    unchanged; it only spares building the book over the whole fleet's ledger."""
    nodes = scope.nodes or frozenset()
    leases = state.open_leases
    cut = {
        x.run
        for x in leases
        if x.run in state.runs
        and x.run != protected
        and (
            x.envelope == envelope and x.funding is not FundingKind.OWNED
            if envelope is not None
            else x.node in nodes
        )
    }
    touched = {x.node for x in leases if x.run in cut}
    return tuple(x for x in leases if x.run in cut or x.node in touched)


def open_claims(
    claims: Iterable[ReservationClaim], scope: Scope, own_claim: str | None = None
) -> tuple[str, ...]:
    """Names of other claims on scope nodes with no end (their claimant has no walltime)."""
    nodes = scope.nodes or frozenset()
    return tuple(
        sorted(
            c.name
            for c in claims
            if c.name != own_claim and c.end is None and not nodes.isdisjoint(c.nodes)
        )
    )


def reforecast_instead(
    request: RunRequest, state: ClusterState, own_claim: str
) -> tuple[datetime, Confidence] | None:
    """At a ``conservative`` Reservation's earliestStart: the honest ETA to wait for instead of
    cutting other Runs, or None when activation should go ahead.

    A conservative ETA was a guess, not a slot anyone saw free, so reaching it is no licence to
    end other people's work. Activation goes ahead when the Run fits now, when the owner is
    reclaiming its own envelope from relatives and borrowers (funding scope), or when still
    nothing in the horizon bounds the wait (SPEC: the configured lead, then cuts and the
    lottery). Otherwise walltimes or a window opening now bound it: the Reservation is
    re-forecast to that instant and the Run keeps waiting.
    """
    got = try_start(request, state, own_claim=own_claim)
    if isinstance(got, Start):
        return None
    if got.stage == "cover" and funding_scope(request, state) is not None:
        return None
    at, confidence, _ = earliest_start(request, state, own_claim=own_claim)
    if confidence is Confidence.CONSERVATIVE:
        return None
    return at, confidence
