"""Node failure handling: swap onto spares, else shrink or requeue/fail (SPEC §3 Failures).

For every run with a working lease (Active, or Borrowed for opportunistic runs) on the failed node:

* **Swap** when every failed rank of a group finds, on one healthy node of the group's domain, spare
  GPUs of that same group (several spare leases on one node combine). Per rank: opportunistic fill
  on that node that no longer fits in the remaining spares is reclaimed (its whole cut unit ends
  ``ReclaimedBySpare``, youngest lease first), the spare lease(s) end ``Swap``, the failed lease
  ends ``NodeFailure``, an Active lease starts on the spare node (reason ``Swap``, same envelope,
  payer, funding, group, rank, GPUs, expected end) and the rank's pod moves there. Spare GPUs left
  over from a consumed spare lease are re-leased as a new Spare (reason ``Swap``).
* **Shrink** a malleable run by each group that cannot be swapped, when the run stays at or above
  its min: leases on the failed node end ``NodeFailure``, the group's other leases ``Shrink``.
* Otherwise the **whole run** ends: leases on the failed node ``NodeFailure``, the rest ``Fail``;
  the run is requeued when it declares a checkpoint and has restarts left, else it fails (reason
  ``NodeFailure``).

A group is all-or-nothing: if one of its failed ranks has no spare, none of them swaps (spares and
fill are not sacrificed for a group that dies anyway); a fixed-width run likewise swaps only if all
of its failed groups can. Spare leases on the failed node end ``NodeFailure``. Spare candidates are
considered by (fill to reclaim, spare GPUs, node name): least disruption, then best fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from shared.engine.model import (
    Closure,
    DomainKey,
    FundingKind,
    Lease,
    LeaseReason,
    Role,
    RunKey,
    RunRequest,
)
from shared.engine.shrink import current_width, cut_unit, group_width, is_working, youngest_first

NODE_FAILURE = Closure.NODE_FAILURE.value


@dataclass(frozen=True, slots=True)
class NewLease:
    """A lease the binder must create; everything but the name (the binder names leases)."""

    run: RunKey
    owner: str
    node: str
    gpus: int
    role: Role
    group: int
    rank: int
    envelope: str
    payer_owner: str
    funding: FundingKind
    reason: LeaseReason
    start: datetime
    expected_end: datetime | None = None
    replaces: str | None = None
    """Name of the lease this one takes over from (a failed rank's lease or a consumed spare)."""

    def to_lease(self, name: str) -> Lease:
        """The model record once the binder has chosen a name."""
        return Lease(
            name=name,
            run=self.run,
            owner=self.owner,
            node=self.node,
            gpus=self.gpus,
            role=self.role,
            group=self.group,
            rank=self.rank,
            envelope=self.envelope,
            payer_owner=self.payer_owner,
            funding=self.funding,
            start=self.start,
            reason=self.reason,
            expected_end=self.expected_end,
        )


@dataclass(frozen=True, slots=True)
class PodMove:
    """Recreate one rank's pod on another node (same world size, same rank)."""

    run: RunKey
    rank: int
    from_node: str
    to_node: str


@dataclass(frozen=True, slots=True)
class FailurePlan:
    """Everything one node failure changes; ends and starts commit together."""

    node: str
    ends: tuple[tuple[str, str], ...]
    """(lease name, closure reason)."""
    starts: tuple[NewLease, ...]
    pod_moves: tuple[PodMove, ...]
    requeue: tuple[RunKey, ...]
    failed: tuple[RunKey, ...]
    shrunk: tuple[tuple[RunKey, int], ...]
    """(run, group) released because the group could not be swapped."""
    reasons: Mapping[RunKey, str] = field(default_factory=dict)
    """Why each requeued or failed run lost everything: ``NodeFailure`` or ``ReclaimedBySpare``."""


_SLOT = {Role.ACTIVE: 0, Role.SPARE: 1, Role.BORROWED: 2}


class _Ledger:
    """Working copy of the open ledger while a failure plan is computed (private, mutable)."""

    def __init__(self, leases: Sequence[Lease], runs: Mapping[RunKey, RunRequest]) -> None:
        self.runs = runs
        self.open: dict[str, Lease] = {}
        self.load: dict[str, list[int]] = {}
        for lease in sorted(leases, key=lambda item: item.name):
            if lease.open:
                self.open[lease.name] = lease
                self._shift(lease.node, lease.role, lease.gpus)
        self.excess = {node: max(0, load[2] - load[1]) for node, load in self.load.items()}
        self.ends: list[tuple[str, str]] = []
        self.starts: list[NewLease] = []
        self.moves: list[PodMove] = []
        self.shrunk: list[tuple[RunKey, int]] = []
        self.outcome: dict[RunKey, str] = {}
        """Runs whose every lease ends, with the cause (first cause wins)."""

    def _shift(self, node: str, role: Role, gpus: int) -> None:
        self.load.setdefault(node, [0, 0, 0])[_SLOT[role]] += gpus

    def run_leases(self, run: RunKey) -> list[Lease]:
        return [lease for lease in self.open.values() if lease.run == run]

    def end(self, name: str, closure: str) -> None:
        lease = self.open.pop(name, None)
        if lease is None:
            return
        self._shift(lease.node, lease.role, -lease.gpus)
        self.ends.append((name, closure))

    def start(self, new: NewLease) -> None:
        self.starts.append(new)
        self._shift(new.node, new.role, new.gpus)

    def reclaim_needed(self, node: str, taking: int) -> int:
        """Fill GPUs that would no longer fit on ``node`` after ``taking`` spare GPUs go active."""
        _, spare, borrowed = self.load.get(node, [0, 0, 0])
        return max(0, borrowed - (spare - taking) - self.excess.get(node, 0))

    def settle_fill(self, node: str, taking: int) -> None:
        """Reclaim fill on ``node`` (youngest first) until it fits beside ``taking`` new GPUs."""
        fill = youngest_first(
            item for item in self.open.values() if item.node == node and item.role is Role.BORROWED
        )
        for lease in fill:
            if self.reclaim_needed(node, taking) == 0:
                return
            if lease.name not in self.open:
                continue
            mine = self.run_leases(lease.run)
            unit = cut_unit(self.runs.get(lease.run), mine, lease)
            if len(unit) == len(mine):
                self.outcome.setdefault(lease.run, Closure.RECLAIMED_BY_SPARE.value)
            for name in unit:
                self.end(name, Closure.RECLAIMED_BY_SPARE.value)


def _group_domain(
    group_leases: Sequence[Lease], failed_node: str, node_domains: Mapping[str, DomainKey]
) -> DomainKey | None:
    """The failed node's domain, else the domain of the group's other leases, if known."""
    if failed_node in node_domains:
        return node_domains[failed_node]
    for lease in sorted(group_leases, key=lambda item: item.name):
        if lease.node != failed_node and lease.node in node_domains:
            return node_domains[lease.node]
    return None


def _plan_group(
    ledger: _Ledger,
    failed: Sequence[Lease],
    group_leases: Sequence[Lease],
    failed_node: str,
    node_domains: Mapping[str, DomainKey],
) -> list[tuple[Lease, str]] | None:
    """Spare node for every failed rank of one group, or ``None`` if any rank has none."""
    domain = _group_domain(group_leases, failed_node, node_domains)
    if domain is None:
        return None
    available: dict[str, int] = {}
    for lease in group_leases:
        if (
            lease.role is Role.SPARE
            and lease.node != failed_node
            and node_domains.get(lease.node) == domain
        ):
            available[lease.node] = available.get(lease.node, 0) + lease.gpus
    taken: dict[str, int] = {}
    plan: list[tuple[Lease, str]] = []
    for lease in sorted(failed, key=lambda item: (item.rank, item.name)):
        fits = [node for node, gpus in available.items() if gpus - taken.get(node, 0) >= lease.gpus]
        if not fits:
            return None
        target = min(
            fits,
            key=lambda node: (
                ledger.reclaim_needed(node, taken.get(node, 0) + lease.gpus),
                available[node] - taken.get(node, 0),
                node,
            ),
        )
        taken[target] = taken.get(target, 0) + lease.gpus
        plan.append((lease, target))
    return plan


def _commit_swaps(
    ledger: _Ledger, plan: Sequence[tuple[Lease, str]], group_leases: Sequence[Lease], now: datetime
) -> None:
    """Apply one group's swaps: reclaim fill, end spares and failed leases, start replacements."""
    spares: dict[str, list[Lease]] = {}
    for lease in sorted(group_leases, key=lambda item: item.name):
        if lease.role is Role.SPARE:
            spares.setdefault(lease.node, []).append(lease)
    credit: dict[str, int] = {}
    last_spare: dict[str, Lease] = {}
    for failed, target in plan:
        ledger.settle_fill(target, failed.gpus)
        before = credit.get(target, 0)
        while credit.get(target, 0) < failed.gpus:
            spare = spares[target].pop(0)
            ledger.end(spare.name, Closure.SWAP.value)
            credit[target] = credit.get(target, 0) + spare.gpus
            last_spare[target] = spare
        credit[target] -= failed.gpus
        # Unused GPUs of a consumed spare stay spare: only ``failed.gpus`` leave the spare pool.
        ledger.load[target][1] += credit[target] - before
        ledger.end(failed.name, NODE_FAILURE)
        ledger.start(
            NewLease(
                run=failed.run,
                owner=failed.owner,
                node=target,
                gpus=failed.gpus,
                role=failed.role,
                group=failed.group,
                rank=failed.rank,
                envelope=failed.envelope,
                payer_owner=failed.payer_owner,
                funding=failed.funding,
                reason=LeaseReason.SWAP,
                start=now,
                expected_end=failed.expected_end,
                replaces=failed.name,
            )
        )
        ledger.moves.append(PodMove(failed.run, failed.rank, failed.node, target))
    for node in sorted(credit):
        if credit[node] > 0:
            spare = last_spare[node]
            ledger.starts.append(  # already counted as spare in the node load
                NewLease(
                    run=spare.run,
                    owner=spare.owner,
                    node=node,
                    gpus=credit[node],
                    role=Role.SPARE,
                    group=spare.group,
                    rank=spare.rank,
                    envelope=spare.envelope,
                    payer_owner=spare.payer_owner,
                    funding=spare.funding,
                    reason=LeaseReason.SWAP,
                    start=now,
                    expected_end=spare.expected_end,
                    replaces=spare.name,
                )
            )


def _end_run(ledger: _Ledger, key: RunKey, failed_node: str) -> None:
    """Whole run ends: ``NodeFailure`` on the failed node, ``Fail`` elsewhere."""
    for lease in sorted(ledger.run_leases(key), key=lambda item: item.name):
        closure = NODE_FAILURE if lease.node == failed_node else Closure.FAIL.value
        ledger.end(lease.name, closure)
    ledger.outcome.setdefault(key, NODE_FAILURE)


def _handle_run(
    ledger: _Ledger,
    key: RunKey,
    run: RunRequest | None,
    failed_node: str,
    node_domains: Mapping[str, DomainKey],
    now: datetime,
) -> None:
    mine = sorted(ledger.run_leases(key), key=lambda item: item.name)
    for lease in mine:
        if lease.node == failed_node and lease.role is Role.SPARE:
            ledger.end(lease.name, NODE_FAILURE)
    failed = [lease for lease in mine if lease.node == failed_node and is_working(lease)]
    if not failed:
        return
    if run is None:
        for lease in failed:
            ledger.end(lease.name, NODE_FAILURE)
        return
    mine = sorted(ledger.run_leases(key), key=lambda item: item.name)
    plans: dict[int, list[tuple[Lease, str]]] = {}
    lost: list[int] = []
    for group in sorted({lease.group for lease in failed}):
        group_leases = [lease for lease in mine if lease.group == group]
        group_failed = [lease for lease in failed if lease.group == group]
        plan = _plan_group(ledger, group_failed, group_leases, failed_node, node_domains)
        if plan is None:
            lost.append(group)
        else:
            plans[group] = plan
    if lost:
        if run.malleable is None:
            _end_run(ledger, key, failed_node)
            return
        width = current_width(mine) - sum(group_width(mine, group) for group in lost)
        if width < run.malleable.min_gpus:
            _end_run(ledger, key, failed_node)
            return
    for group, plan in plans.items():
        _commit_swaps(ledger, plan, [lease for lease in mine if lease.group == group], now)
    for group in lost:
        for lease in mine:
            if lease.group == group:
                closure = NODE_FAILURE if lease.node == failed_node else Closure.SHRINK.value
                ledger.end(lease.name, closure)
        ledger.shrunk.append((key, group))


def on_node_failure(
    node: str,
    leases: Sequence[Lease],
    runs: Mapping[RunKey, RunRequest],
    *,
    node_domains: Mapping[str, DomainKey],
    now: datetime,
    restarts_used: Mapping[RunKey, int] | None = None,
) -> FailurePlan:
    """Plan the reaction to ``node`` failing; pure and deterministic.

    ``leases`` are all open leases. ``node_domains`` maps the nodes that may receive a swapped rank
    (healthy, schedulable) to their domain, plus the failed node when known; nodes missing from it
    are never swap targets. ``restarts_used`` counts restarts already consumed per run.
    """
    ledger = _Ledger(leases, runs)
    affected = sorted({lease.run for lease in ledger.open.values() if lease.node == node})
    for key in affected:
        _handle_run(ledger, key, runs.get(key), node, node_domains, now)
    used = restarts_used or {}
    requeue: list[RunKey] = []
    failed: list[RunKey] = []
    reasons: dict[RunKey, str] = {}
    for key in sorted(ledger.outcome):
        run = runs.get(key)
        if run is None:
            continue
        reasons[key] = ledger.outcome[key]
        if run.checkpoint is not None and used.get(key, 0) < run.max_restarts:
            requeue.append(key)
        else:
            failed.append(key)
    return FailurePlan(
        node=node,
        ends=tuple(ledger.ends),
        starts=tuple(ledger.starts),
        pod_moves=tuple(ledger.moves),
        requeue=tuple(requeue),
        failed=tuple(failed),
        shrunk=tuple(ledger.shrunk),
        reasons=reasons,
    )
