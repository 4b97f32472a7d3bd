"""Malleable Runs grow one step toward desired width when cover and pack allow.

Shrinking (voluntary or by the resolver) is ``shared.engine.shrink.shrink_plan``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.engine.admit import Blocked, Start, claim_protection
from shared.engine.cover import CoverDenied, cover
from shared.engine.model import FundingKind, Lease, Role, RunRequest
from shared.engine.offers import Funding
from shared.engine.pack import NoFit, Placement, group_sizes, needs_more_offers, pack
from shared.engine.shrink import current_width
from shared.engine.state import ClusterState


@dataclass(frozen=True, slots=True)
class Grow:
    """One step of growth: where the new groups go and who pays them."""

    start: Start
    first_group: int
    first_rank: int


def next_step(request: RunRequest, width: int) -> int:
    """GPUs the next grow adds: one step, never past desired (0 when nothing to grow)."""
    m = request.malleable
    if m is None:
        return 0
    target = min(m.desired_gpus, m.max_gpus)
    return max(0, min(m.step_gpus, target - width))


def grow(
    request: RunRequest, leases: Sequence[Lease], state: ClusterState
) -> Grow | Blocked | None:
    """Plan one ``Grow`` step for a running malleable Run, or say why it cannot grow now.

    New groups prefer the domains the Run already uses; the borrow limit counts what the Run
    already borrows, so growth never exceeds maxBorrowGPUs in total.
    """
    mine = [lease for lease in leases if lease.open and lease.run == request.key]
    step = next_step(request, current_width(mine))
    if step <= 0:
        return None
    # The step is funded as an explicit demand: the request itself stays the Run's (a step may be
    # narrower than the Run's minimum width, which cover rightly refuses as a whole Run).
    groups = group_sizes(request, step)
    demand = step + request.spares_per_group * (len(groups) if groups else 1)
    borrowed = sum(
        lease.gpus
        for lease in mine
        if lease.funding is FundingKind.SPONSOR and lease.role is Role.ACTIVE
    )
    used = {d for lease in mine if (d := state.topology.domain_of(lease.node)) is not None}
    first_group = max((lease.group for lease in mine), default=-1) + 1
    first_rank = max((lease.rank for lease in mine), default=-1) + 1
    protected = claim_protection(request, state.claims, state.topology, state.now)
    placed: Placement | NoFit | None = None
    funding: Funding | CoverDenied | None = None
    for complete in (False, True):  # the complete offers only when pack asks for them
        funding = cover(
            request,
            state.family,
            state.usage,
            now=state.now,
            default_duration=state.settings.default_duration,
            demand=demand,
            already_borrowed=borrowed,
            complete=complete,
        )
        if isinstance(funding, CoverDenied):
            return Blocked("cover", funding.reason.value, funding.message, funding.shortfall)
        placed = pack(
            request,
            state.topology,
            funding,
            gpus=step,
            first_group=first_group,
            first_rank=first_rank,
            used_domains=used,
            protected=protected,
        )
        if not needs_more_offers(placed):
            break
    assert placed is not None and isinstance(funding, Funding)
    if isinstance(placed, NoFit):
        return Blocked("pack", placed.reason.value, placed.message, step)
    return Grow(Start(funding, placed, step), first_group, first_rank)
