"""Shrinking malleable runs by whole groups (SPEC §3 Elasticity; resolver step 2).

One rule serves both the voluntary shrink (`kubectl runs shrink`) and the resolver: release whole
groups, borrowed groups (any working lease funded by a sponsor) first, then highest index first,
and never take the run below ``malleable.min_gpus``. A removed group's spares go with it. Every
lease a shrink ends closes with ``Shrink``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared.engine.model import Closure, FundingKind, Lease, Role, RunRequest

SHRINK_CLOSURE = Closure.SHRINK.value


def is_working(lease: Lease) -> bool:
    """Leases that make up a run's width: Active, and Borrowed for opportunistic runs."""
    return lease.open and lease.role is not Role.SPARE


def current_width(leases: Iterable[Lease]) -> int:
    """GPUs a run is running on now (spares excluded)."""
    return sum(lease.gpus for lease in leases if is_working(lease))


def group_width(leases: Iterable[Lease], group: int) -> int:
    """Working GPUs of one group."""
    return sum(lease.gpus for lease in leases if lease.group == group and is_working(lease))


def is_borrowed_group(leases: Iterable[Lease], group: int) -> bool:
    """A group is borrowed when any of its working GPUs is paid by a sponsor."""
    return any(
        lease.group == group and is_working(lease) and lease.funding is FundingKind.SPONSOR
        for lease in leases
    )


def shrink_order(leases: Sequence[Lease]) -> tuple[int, ...]:
    """Groups in the order they are released: borrowed first, then highest index first."""
    groups = {lease.group for lease in leases if lease.open}
    return tuple(sorted(groups, key=lambda g: (not is_borrowed_group(leases, g), -g)))


def group_lease_names(leases: Iterable[Lease], group: int) -> tuple[str, ...]:
    """Every open lease of a group, spares included, sorted by name."""
    return tuple(sorted(lease.name for lease in leases if lease.open and lease.group == group))


def shrink_groups(run: RunRequest, leases: Sequence[Lease], target_gpus: int) -> tuple[int, ...]:
    """Groups to release so the width approaches ``target_gpus`` without going below it or min.

    Groups whose removal would undershoot are skipped (a later, smaller group may still fit), so
    the result is the greedy walk over :func:`shrink_order`. Fixed-width runs never shrink.
    """
    if run.malleable is None:
        return ()
    floor = max(target_gpus, run.malleable.min_gpus)
    width = current_width(leases)
    released: list[int] = []
    for group in shrink_order(leases):
        if width <= floor:
            break
        size = group_width(leases, group)
        if width - size >= floor:
            released.append(group)
            width -= size
    return tuple(released)


def shrink_plan(run: RunRequest, leases: Sequence[Lease], target_gpus: int) -> tuple[str, ...]:
    """Lease names to end (closure ``Shrink``) to shrink ``run`` toward ``target_gpus``."""
    names: list[str] = []
    for group in shrink_groups(run, leases, target_gpus):
        names.extend(group_lease_names(leases, group))
    return tuple(names)


def cut_unit(run: RunRequest | None, leases: Sequence[Lease], lease: Lease) -> tuple[str, ...]:
    """Leases that must end together with ``lease`` (open leases of its run given).

    A gang cannot lose one rank and keep running: a malleable run that stays at or above its min
    without the lease's group loses just that group; anything else loses the whole run. A lease of
    an unknown run is its own unit.
    """
    if run is None:
        return (lease.name,)
    mine = sorted((item for item in leases if item.open), key=lambda item: item.name)
    if run.malleable is not None:
        remaining = current_width(mine) - group_width(mine, lease.group)
        if remaining >= run.malleable.min_gpus:
            return tuple(item.name for item in mine if item.group == lease.group)
    return tuple(item.name for item in mine)


def youngest_first(leases: Iterable[Lease]) -> list[Lease]:
    """Latest start first, ties by lease name: the order fill is reclaimed in (least work lost)."""
    by_name = sorted(leases, key=lambda lease: lease.name)
    return sorted(by_name, key=lambda lease: lease.start, reverse=True)
