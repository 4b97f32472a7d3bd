"""How long Runs really run: each owner's completed Runs in the ledger, against their walltime.

Users overestimate ``maxDuration`` (a Run killed at its walltime loses its work), so an ETA built
from walltimes is a guarantee but rarely close. The ledger already holds the answer: every closed
lease records when it started, when it ended and what its walltime was. The ratio
``actual / requested`` of an owner's completed Runs predicts how much of its walltime the owner's
running leases will use. The expected start is the very same search as ``earliestStart``
(:func:`shared.engine.forecast.earliest_start`) run over those predicted ends; the spread runs it
again with the owner's 10th and 90th percentile ratios.

Prior: an owner's quantile is blended with the fleet-wide one, weighted by ``PRIOR_RUNS`` pseudo
Runs, and with no history at all the ratio is 1 (the walltime), so the expected start falls back
to the guaranteed one rather than inventing optimism.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from shared.engine.forecast import earliest_start
from shared.engine.model import Closure, Lease, ReservationClaim, Role, RunKey, RunRequest
from shared.engine.state import ClusterState

PRIOR_RUNS = 5
"""Pseudo-Runs of fleet-wide history every owner's estimate starts from."""
QUANTILES = (0.1, 0.5, 0.9)
"""Low end of the spread, the expected value, the high end."""


@dataclass(frozen=True, slots=True)
class DurationModel:
    """Sorted ``actual / walltime`` ratios of completed Runs, per owner and fleet-wide."""

    by_owner: Mapping[str, tuple[float, ...]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    fleet: tuple[float, ...] = ()

    def runs_of(self, owner: str) -> int:
        return len(self.by_owner.get(owner, ()))

    def ratio(self, owner: str, q: float) -> float:
        """The owner's ``q`` quantile, shrunk towards the fleet's; 1.0 with no history at all."""
        fleet = _quantile(self.fleet, q) if self.fleet else 1.0
        own = self.by_owner.get(owner, ())
        if not own:
            return fleet
        n = len(own)
        return (n * _quantile(own, q) + PRIOR_RUNS * fleet) / (n + PRIOR_RUNS)


def _quantile(ordered: tuple[float, ...], q: float) -> float:
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def learn(ledger: Iterable[Lease]) -> DurationModel:
    """Ratios of every Run that completed (closure ``Completed``) and had a walltime.

    One sample per Run: its first working lease (all of a gang's leases start and end together).
    """
    seen: dict[RunKey, tuple[str, float]] = {}
    for lease in ledger:
        if lease.role is Role.SPARE or lease.run in seen:
            continue
        if lease.end is None or lease.expected_end is None:
            continue
        if lease.closure != Closure.COMPLETED.value:
            continue
        wall = (lease.expected_end - lease.start).total_seconds()
        if wall <= 0:
            continue
        actual = (lease.end - lease.start).total_seconds()
        seen[lease.run] = (lease.owner, min(1.0, max(0.0, actual / wall)))
    by_owner: dict[str, list[float]] = {}
    for owner, ratio in seen.values():
        by_owner.setdefault(owner, []).append(ratio)
    return DurationModel(
        MappingProxyType({o: tuple(sorted(r)) for o, r in by_owner.items()}),
        tuple(sorted(r for _, r in seen.values())),
    )


def add(model: DurationModel, owner: str, ratio: float) -> DurationModel:
    """The model with one more completed Run (the replay learns as it goes)."""
    ratio = min(1.0, max(0.0, ratio))
    own = list(model.by_owner.get(owner, ()))
    bisect.insort(own, ratio)
    fleet = list(model.fleet)
    bisect.insort(fleet, ratio)
    by_owner = dict(model.by_owner)
    by_owner[owner] = tuple(own)
    return DurationModel(MappingProxyType(by_owner), tuple(fleet))


def predicted_end(lease: Lease, ratio: float, now: datetime) -> datetime | None:
    """When a running lease is expected to end: ``ratio`` of its walltime, or of what is left of
    it once it outlived that; never after its walltime, never before ``now``."""
    if lease.expected_end is None:
        return None
    wall = lease.expected_end - lease.start
    end = lease.start + wall * ratio
    if end <= now:
        end = now + (lease.expected_end - now) * ratio
    return min(max(end, now), lease.expected_end)


def predicted_state(state: ClusterState, model: DurationModel, q: float) -> ClusterState:
    """The snapshot with every open lease's end moved to its owner's ``q`` prediction, and every
    claim shortened the same way (its claimant's owner's ratio of its walltime). Claims keep
    their guaranteed start: moving them to their own expected starts too compounded the
    optimism (the replay's p90 error grew from 2.7 to 10 times the wait)."""
    ratios: dict[str, float] = {}
    ledger = []
    for lease in state.ledger:
        if lease.open and lease.expected_end is not None:
            r = ratios.get(lease.owner)
            if r is None:
                r = ratios[lease.owner] = model.ratio(lease.owner, q)
            lease = dataclasses.replace(lease, expected_end=predicted_end(lease, r, state.now))
        ledger.append(lease)
    claims = tuple(_predicted_claim(c, model, q) for c in state.claims)
    return dataclasses.replace(state, ledger=tuple(ledger), claims=claims)


def _predicted_claim(claim: ReservationClaim, model: DurationModel, q: float) -> ReservationClaim:
    duration = claim.duration
    if duration is not None and claim.owner is not None:
        duration = duration * model.ratio(claim.owner, q)
    return dataclasses.replace(claim, duration=duration)


@dataclass(frozen=True, slots=True)
class Expected:
    """The expected start and its spread, with what it was learnt from."""

    at: datetime
    p10: datetime
    p90: datetime
    basis_runs: int
    """Completed Runs of the owners whose leases stand in the way (0: the walltime prior)."""
    basis: str
    """Human summary, e.g. ``212 completed Runs of org:ai:rai``."""


def expected_start(
    request: RunRequest,
    state: ClusterState,
    model: DurationModel,
    guaranteed: datetime,
    *,
    own_claim: str | None = None,
) -> Expected:
    """The earliestStart search over predicted lease ends (p50), and again at p10 and p90.

    Never later than the guaranteed start: predictions only move ends earlier.
    """
    found = []
    for q in QUANTILES:
        at, _, _ = earliest_start(request, predicted_state(state, model, q), own_claim=own_claim)
        found.append(min(at, guaranteed))
    p10, mid, p90 = sorted(found)
    owners = sorted({x.owner for x in state.ledger if x.open and x.expected_end is not None})
    runs = sum(model.runs_of(o) for o in owners)
    if runs == 0:
        basis = (
            f"no completed Runs yet; fleet prior from {len(model.fleet)} Runs"
            if model.fleet
            else "no completed Runs yet: walltimes"
        )
    elif len(owners) == 1:
        basis = f"{runs} completed Runs of {owners[0]}"
    else:
        basis = f"{runs} completed Runs of {len(owners)} owners"
    return Expected(mid, p10, p90, runs, basis)
