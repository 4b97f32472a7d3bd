"""Can a Run start now? Cover, then pack on capacity not promised to reservations."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from shared.engine.accounting import Usage
from shared.engine.capacity import never_fits
from shared.engine.cover import CoverDenied, cover
from shared.engine.model import ReservationClaim, RunRequest, selector_matches
from shared.engine.offers import Funding
from shared.engine.pack import NoFit, Placement, needs_more_offers, pack
from shared.engine.state import ClusterState
from shared.engine.topology import Topology


@dataclass(frozen=True, slots=True)
class Start:
    """The Run fits: who pays and where, at ``width`` active GPUs."""

    funding: Funding
    placement: Placement
    width: int


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why the Run cannot start: the first failing stage and its typed reason, verbatim."""

    stage: str
    """``cover`` (who pays) or ``pack`` (where)."""
    reason: str
    message: str
    shortfall: int
    """GPUs missing: unfunded GPUs for cover, unplaceable GPUs (at least 1) for pack."""


def widths(request: RunRequest) -> tuple[int, ...]:
    """Widths to try, widest first: a malleable Run may start at any step from desired to min."""
    m = request.malleable
    if m is None:
        return (request.total_gpus,)
    top = min(m.desired_gpus, m.max_gpus)
    top -= (top - m.min_gpus) % m.step_gpus
    return tuple(range(top, m.min_gpus - 1, -m.step_gpus)) or (m.min_gpus,)


def _spread(claim: ReservationClaim, capacity: Mapping[str, int]) -> dict[str, int]:
    """A claim's GPUs laid over its nodes in order, each up to the node's size."""
    out: dict[str, int] = {}
    left = claim.gpus
    for node in claim.nodes:
        take = min(left, capacity.get(node, 0))
        if take > 0:
            out[node] = take
            left -= take
    return out


def claim_protection(
    request: RunRequest,
    claims: Iterable[ReservationClaim],
    topology: Topology,
    at: datetime,
    *,
    own: str | None = None,
) -> dict[str, int]:
    """GPUs per node this Run may not take: claims it would overlap (backfill rule of SPEC §3).

    A Run may use a claim's GPUs only when its walltime ends before the claim's earliestStart; a
    Run without maxDuration never backfills. The Run's own reservation (``own``) never blocks it.
    A claim's GPUs are laid over its nodes in order, each up to the node's size.
    """
    protected: dict[str, int] = {}
    for claim in claims:
        if claim.name == own:
            continue
        if request.max_duration is not None and at + request.max_duration <= claim.earliest_start:
            continue
        sizes = {}
        for name in claim.nodes:
            node = topology.node(name)
            sizes[name] = node.gpus if node is not None else 0
        for node_name, gpus in _spread(claim, sizes).items():
            protected[node_name] = protected.get(node_name, 0) + gpus
    return protected


def resources_refusal(request: RunRequest, topology: Topology) -> str | None:
    """``ResourcesDoNotFit: …`` when no node of the Run's flavor and location could hold one of
    its rank pods even empty: no wait would ever start it, so it is refused at once."""
    nodes = (
        node
        for domain in topology.domains(request.flavor)
        for node in topology.nodes_in(request.flavor, domain)
        if selector_matches(request.selector, node.labels)
    )
    return never_fits(request.pod, request.flavor, nodes)


def try_start(
    request: RunRequest,
    state: ClusterState,
    *,
    at: datetime | None = None,
    topology: Topology | None = None,
    usage: Usage | None = None,
    own_claim: str | None = None,
    for_reservation: bool = False,
) -> Start | Blocked:
    """Cover and pack the Run at the widest width that fits, or the blocking reason at min width.

    ``at``/``topology``/``usage`` let the forecast ask the same question about a future instant.
    """
    at = at or state.now
    topology = topology or state.topology
    usage = usage or state.usage
    settings = state.settings
    protected = claim_protection(request, state.claims, topology, at, own=own_claim)
    blocked: Blocked | None = None
    for width in widths(request):
        sized = dataclasses.replace(request, total_gpus=width)
        for complete in (False, True):  # the complete offers only when pack asks for them
            funding = cover(
                sized,
                state.family,
                usage,
                now=at,
                default_duration=settings.default_duration,
                for_reservation=for_reservation,
                complete=complete,
            )
            if isinstance(funding, CoverDenied):
                break
            placed = pack(sized, topology, funding, protected=protected)
            if not needs_more_offers(placed):
                break
        if isinstance(funding, CoverDenied):
            blocked = Blocked("cover", funding.reason.value, funding.message, funding.shortfall)
            continue
        if isinstance(placed, NoFit):
            blocked = Blocked("pack", placed.reason.value, placed.message, 1)
            continue
        return Start(funding, placed, width)
    assert blocked is not None
    return blocked
