"""Deficit resolution at Reservation activation: structural cuts, then the lottery (SPEC §3).

Given a deficit in a scope, end as little as the rules allow, in this fixed order:

1. ``DropSpare`` — spare leases in scope (spares not hosting opportunistic fill first, then by node
   and lease name). Opportunistic ``Borrowed`` leases riding on a dropped spare lose their host and
   are ended with it (their whole cut unit, closure ``DropSpare``).
2. ``Shrink`` — whole groups of malleable runs, never below ``malleable.min_gpus``. Borrowed
   (sponsor-funded) groups of every run go before any other group; within that, the run currently
   furthest above its minimum gives up its next group (run key breaks ties), and a run releases its
   groups highest index first. Only groups with GPUs in scope are considered.
3. ``RandomPreempt(<seed>)`` — the two-stage lottery of :mod:`shared.engine.lottery` over the tokens
   left in scope, seed = ``lottery_seed(scope.label, reservation_uid, activation)``.

Each step stops as soon as the deficit is cleared. Only GPUs freed on scope nodes count (a node's
occupancy is active + max(spare, borrowed), since opportunistic fill lives inside spares). Protected
runs (the reserving run) and runs missing from ``runs`` are never cut.

Funding scope (``funding_scope_envelope``): the deficit is envelope concurrency, so only leases
paid by that envelope with ``family`` or ``sponsor`` funding count and make a unit a candidate —
never the envelope owner's own (``owned``) leases; the same three steps apply.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from shared.engine.lottery import (
    Draw,
    Token,
    kill_probability,
    lottery_seed,
    run_lottery,
    verify,
)
from shared.engine.model import Closure, FundingKind, Lease, Role, RunKey, RunRequest
from shared.engine.shrink import (
    current_width,
    cut_unit,
    group_width,
    is_borrowed_group,
    is_working,
    shrink_order,
    youngest_first,
)

ActionKind = Literal["DropSpare", "Shrink", "RandomPreempt"]
DROP_SPARE: ActionKind = "DropSpare"
SHRINK: ActionKind = "Shrink"
RANDOM_PREEMPT: ActionKind = "RandomPreempt"
SHARED_FUNDING = frozenset({FundingKind.FAMILY, FundingKind.SPONSOR})
_SLOT = {Role.ACTIVE: 0, Role.SPARE: 1, Role.BORROWED: 2}
"""Index of a role in a node's [active, spare, borrowed] load."""
UNBOUNDED_DEFICIT = 1 << 62
"""Deficit used to ask "what could be cut at all" (conflict set)."""


def random_preempt_closure(seed: str) -> str:
    """Closure reason of a lottery-ended lease; carries the seed so the ledger is self-auditing."""
    return f"{Closure.RANDOM_PREEMPT.value}({seed})"


@dataclass(frozen=True, slots=True)
class Scope:
    """Where the deficit is: flavor, the nodes whose freed GPUs count, and the published label."""

    flavor: str
    nodes: frozenset[str] | None
    """Nodes in scope; ``None`` means every node hosting a lease of a run of ``flavor``."""
    label: str
    """Human scope string hashed into the seed, e.g. ``H100-80GB@us-west/gpu-a/nv-a``."""


@dataclass(frozen=True, slots=True)
class Action:
    """One cut: the leases of one unit (spare, group, run) ended for one reason."""

    kind: ActionKind
    run: RunKey
    lease_names: tuple[str, ...]
    gpus: int
    """GPUs this action freed against the deficit (0 when the freed GPUs were out of scope)."""
    closure: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """What activation must commit (with the reservation's bind) and publish."""

    actions: tuple[Action, ...]
    seed: str | None
    """Set whenever a lottery ran (deficit left after cuts), published even if no draw happened."""
    conflict_set: tuple[RunKey, ...]
    draws: tuple[Draw, ...]
    freed: int
    remaining_deficit: int
    requeue: tuple[RunKey, ...]
    failed: tuple[RunKey, ...]
    tokens: tuple[Token, ...] = ()
    """All tokens the lottery drew from: with ``seed`` and ``lottery_deficit``, enough to replay."""
    lottery_deficit: int = 0
    """Deficit left after the structural cuts, i.e. what the lottery was asked to clear."""

    @property
    def ended_leases(self) -> tuple[tuple[str, str], ...]:
        """(lease name, closure) for every lease to end, in action order."""
        return tuple((name, a.closure) for a in self.actions for name in a.lease_names)

    def replays(self) -> bool:
        """Does the published seed reproduce the published draws? (`kubectl runs explain`)."""
        if self.seed is None:
            return not self.draws
        return verify(self.seed, self.tokens, self.lottery_deficit, self.draws)


@dataclass(frozen=True, slots=True)
class Remedies:
    """Forecast preview of a resolution, without drawing the lottery."""

    deficit: int
    spare_drops: Mapping[RunKey, int]
    """GPUs of leases each run would lose to ``DropSpare`` (spares, and fill riding on them)."""
    shrinks: Mapping[RunKey, int]
    """Width each malleable run would lose to ``Shrink``."""
    deficit_after_cuts: int
    conflict_set: tuple[RunKey, ...]
    kill_probability: Mapping[RunKey, float] = field(default_factory=dict)

    @property
    def lottery_likely(self) -> bool:
        return self.deficit_after_cuts > 0


class _Book:
    """Working copy of the open ledger while one resolution is computed (private, mutable)."""

    def __init__(
        self,
        scope: Scope,
        leases: Sequence[Lease],
        runs: Mapping[RunKey, RunRequest],
        protected: Collection[RunKey],
        funding_envelope: str | None,
        deficit: int,
    ) -> None:
        self.scope = scope
        self.runs = runs
        self.protected = frozenset(protected)
        self.funding_envelope = funding_envelope
        self.remaining = deficit
        self.open: dict[str, Lease] = {}
        self.by_run: dict[RunKey, set[str]] = {}
        self.load: dict[str, list[int]] = {}
        """node -> [active, spare, borrowed] GPUs of open leases."""
        for lease in sorted(leases, key=lambda item: item.name):
            if lease.open:
                self.open[lease.name] = lease
                self.by_run.setdefault(lease.run, set()).add(lease.name)
                self._shift(lease, 1)
        self.excess = {node: max(0, load[2] - load[1]) for node, load in self.load.items()}
        """Fill not sitting on any spare (should not exist); tolerated, never reclaimed for it."""
        self.initial_runs = frozenset(
            lease.run for lease in self.open.values() if lease.role is not Role.SPARE
        )
        if scope.nodes is not None:
            self.scope_nodes = scope.nodes
        else:
            self.scope_nodes = frozenset(
                lease.node for lease in self.open.values() if self._flavor_matches(lease)
            )
        self.actions: list[Action] = []

    def _flavor_matches(self, lease: Lease) -> bool:
        run = self.runs.get(lease.run)
        return run is not None and run.flavor == self.scope.flavor

    def _shift(self, lease: Lease, sign: int) -> None:
        load = self.load.setdefault(lease.node, [0, 0, 0])
        load[_SLOT[lease.role]] += sign * lease.gpus

    def counts(self, lease: Lease) -> bool:
        """Would ending this lease give back something the deficit is measured in?"""
        if self.funding_envelope is not None:
            return (
                lease.envelope == self.funding_envelope
                and lease.funding in SHARED_FUNDING
                and self._flavor_matches(lease)
            )
        return lease.node in self.scope_nodes

    def cuttable(self, run: RunKey) -> bool:
        return run in self.runs and run not in self.protected

    def run_leases(self, run: RunKey) -> list[Lease]:
        return [self.open[name] for name in sorted(self.by_run.get(run, ()))]

    def meter(self, names: Iterable[str]) -> int:
        """GPUs that ending ``names`` (still open) would free against the deficit."""
        ending = [self.open[name] for name in names if name in self.open]
        if self.funding_envelope is not None:
            return sum(lease.gpus for lease in ending if self.counts(lease))
        delta: dict[str, list[int]] = {}
        for lease in ending:
            if lease.node in self.scope_nodes:
                delta.setdefault(lease.node, [0, 0, 0])[_SLOT[lease.role]] += lease.gpus
        freed = 0
        for node, (active, spare, borrowed) in delta.items():
            a, s, b = self.load[node]
            freed += (a + max(s, b)) - ((a - active) + max(s - spare, b - borrowed))
        return freed

    def end(self, kind: ActionKind, run: RunKey, names: Iterable[str], closure: str) -> None:
        """End still-open leases as one action and settle any fill they were hosting."""
        ending = sorted(name for name in set(names) if name in self.open)
        if not ending:
            return
        freed = self.meter(ending)
        spare_nodes: set[str] = set()
        for name in ending:
            lease = self.open.pop(name)
            self.by_run[lease.run].discard(name)
            self._shift(lease, -1)
            if lease.role is Role.SPARE:
                spare_nodes.add(lease.node)
        self.actions.append(Action(kind, run, tuple(ending), freed, closure))
        self.remaining -= freed
        self._settle_fill(spare_nodes)

    def _settle_fill(self, nodes: Iterable[str]) -> None:
        """Opportunistic fill must fit in the spares left on its node: reclaim youngest first."""
        for node in sorted(nodes):
            fill = youngest_first(
                lease
                for lease in self.open.values()
                if lease.node == node
                and lease.role is Role.BORROWED
                and lease.run not in self.protected
            )
            for lease in fill:
                _, spare, borrowed = self.load[node]
                if borrowed <= spare + self.excess.get(node, 0):
                    break
                if lease.name in self.open:
                    self.end(DROP_SPARE, lease.run, self.unit_of(lease), Closure.DROP_SPARE.value)

    def unit_of(self, lease: Lease) -> tuple[str, ...]:
        """Leases that must end with ``lease``: its group if the run may shrink, else the run."""
        return cut_unit(self.runs.get(lease.run), self.run_leases(lease.run), lease)

    def drop_spares(self) -> None:
        """Step 1: spare leases in scope, spares without fill first, then node and name."""
        spares = sorted(
            (
                lease
                for lease in self.open.values()
                if lease.role is Role.SPARE and self.cuttable(lease.run) and self.counts(lease)
            ),
            key=lambda lease: (self.load[lease.node][2] > 0, lease.node, lease.name),
        )
        for lease in spares:
            if self.remaining <= 0:
                return
            if lease.name in self.open:
                self.end(DROP_SPARE, lease.run, (lease.name,), Closure.DROP_SPARE.value)

    def _next_group(self, key: RunKey, borrowed_phase: bool) -> tuple[int, int] | None:
        """(slack, group) of the next group this run would release in this phase, if any."""
        run = self.runs[key]
        assert run.malleable is not None
        mine = self.run_leases(key)
        width = current_width(mine)
        for group in shrink_order(mine):
            if is_borrowed_group(mine, group) != borrowed_phase:
                continue
            members = [lease for lease in mine if lease.group == group]
            if not any(self.counts(lease) for lease in members):
                continue
            if width - group_width(mine, group) >= run.malleable.min_gpus:
                return width - run.malleable.min_gpus, group
        return None

    def shrink(self) -> None:
        """Step 2: release whole groups, borrowed first, from the run furthest above its min."""
        malleable = sorted(
            key
            for key in self.by_run
            if self.cuttable(key) and self.runs[key].malleable is not None
        )
        for borrowed_phase in (True, False):
            while self.remaining > 0:
                best: tuple[int, RunKey, int] | None = None
                for key in malleable:
                    found = self._next_group(key, borrowed_phase)
                    if found is not None and (best is None or found[0] > best[0]):
                        best = (found[0], key, found[1])
                if best is None:
                    break
                _, key, group = best
                names = [lease.name for lease in self.run_leases(key) if lease.group == group]
                self.end(SHRINK, key, names, Closure.SHRINK.value)

    def tokens(self) -> tuple[Token, ...]:
        """Lottery tokens in scope: malleable groups above min, or whole fixed-width runs."""
        out: list[Token] = []
        for key in sorted(self.by_run):
            if not self.cuttable(key):
                continue
            run = self.runs[key]
            mine = self.run_leases(key)
            if not any(self.counts(lease) for lease in mine):
                continue
            if run.malleable is None:
                names = tuple(lease.name for lease in mine)
                gpus = self.meter(names)
                if gpus > 0:
                    out.append(Token(run.owner, key, None, gpus, names))
                continue
            width = current_width(mine)
            slack = width - run.malleable.min_gpus
            for group in sorted({lease.group for lease in mine}):
                size = group_width(mine, group)
                names = tuple(lease.name for lease in mine if lease.group == group)
                gpus = self.meter(names)
                if gpus > 0 and size <= slack:
                    out.append(Token(run.owner, key, group, gpus, names, size, slack))
        return tuple(out)

    def cut_entirely(self) -> list[RunKey]:
        return sorted(
            key
            for key in self.initial_runs
            if key in self.runs and not self.by_run.get(key) and key not in self.protected
        )


def _book(
    deficit: int,
    scope: Scope,
    leases: Sequence[Lease],
    runs: Mapping[RunKey, RunRequest],
    protected: Collection[RunKey],
    funding_envelope: str | None,
) -> _Book:
    book = _Book(scope, leases, runs, protected, funding_envelope, deficit)
    book.drop_spares()
    book.shrink()
    return book


def resolve(
    deficit: int,
    scope: Scope,
    leases: Sequence[Lease],
    runs: Mapping[RunKey, RunRequest],
    *,
    reservation_uid: str,
    activation: datetime,
    protected_runs: Collection[RunKey] = (),
    funding_scope_envelope: str | None = None,
    restarts_used: Mapping[RunKey, int] | None = None,
) -> Resolution:
    """Clear ``deficit`` in ``scope`` by cuts-then-lottery; pure and replayable.

    ``leases`` are the open leases (closed ones are ignored); ``restarts_used`` counts restarts
    already consumed per run (default none), deciding requeue versus failure for runs cut entirely.
    """
    if deficit <= 0:
        return Resolution((), None, (), (), 0, 0, (), ())
    book = _book(deficit, scope, leases, runs, protected_runs, funding_scope_envelope)
    seed: str | None = None
    conflict: tuple[RunKey, ...] = ()
    draws: tuple[Draw, ...] = ()
    tokens: tuple[Token, ...] = ()
    lottery_deficit = max(0, book.remaining)
    if lottery_deficit > 0:
        seed = lottery_seed(scope.label, reservation_uid, activation)
        tokens = book.tokens()
        conflict = tuple(sorted({token.run for token in tokens}))
        draws = run_lottery(seed, tokens, lottery_deficit)
        closure = random_preempt_closure(seed)
        for draw in draws:
            book.end(RANDOM_PREEMPT, draw.token.run, draw.token.lease_names, closure)
    used = restarts_used or {}
    requeue: list[RunKey] = []
    failed: list[RunKey] = []
    for key in book.cut_entirely():
        run = runs[key]
        if run.checkpoint is not None and used.get(key, 0) < run.max_restarts:
            requeue.append(key)
        else:
            failed.append(key)
    freed = sum(action.gpus for action in book.actions)
    return Resolution(
        actions=tuple(book.actions),
        seed=seed,
        conflict_set=conflict,
        draws=draws,
        freed=freed,
        remaining_deficit=max(0, deficit - freed),
        requeue=tuple(requeue),
        failed=tuple(failed),
        tokens=tokens,
        lottery_deficit=lottery_deficit,
    )


def conflict_set(
    scope: Scope,
    leases: Sequence[Lease],
    runs: Mapping[RunKey, RunRequest],
    protected_runs: Collection[RunKey] = (),
    *,
    funding_scope_envelope: str | None = None,
) -> tuple[RunKey, ...]:
    """Runs the lottery could cut in this scope once every structural cut has been taken."""
    book = _book(UNBOUNDED_DEFICIT, scope, leases, runs, protected_runs, funding_scope_envelope)
    return tuple(sorted({token.run for token in book.tokens()}))


def remedies(
    deficit: int,
    scope: Scope,
    leases: Sequence[Lease],
    runs: Mapping[RunKey, RunRequest],
    protected: Collection[RunKey] = (),
    *,
    funding_scope_envelope: str | None = None,
) -> Remedies:
    """What activation would do now, minus the lottery outcome: the forecast's remedies."""
    if deficit <= 0:
        return Remedies(max(deficit, 0), {}, {}, 0, ())
    book = _book(deficit, scope, leases, runs, protected, funding_scope_envelope)
    spare_drops: dict[RunKey, int] = {}
    shrinks: dict[RunKey, int] = {}
    by_name = {lease.name: lease for lease in leases}
    for action in book.actions:
        ended = [by_name[name] for name in action.lease_names]
        if action.kind == DROP_SPARE:
            spare_drops[action.run] = spare_drops.get(action.run, 0) + sum(
                lease.gpus for lease in ended
            )
        else:
            shrinks[action.run] = shrinks.get(action.run, 0) + sum(
                lease.gpus for lease in ended if is_working(lease)
            )
    remaining = max(0, book.remaining)
    tokens = book.tokens()
    risk = kill_probability(tokens, remaining) if remaining > 0 else {}
    return Remedies(
        deficit=deficit,
        spare_drops=dict(sorted(spare_drops.items())),
        shrinks=dict(sorted(shrinks.items())),
        deficit_after_cuts=remaining,
        conflict_set=tuple(sorted({token.run for token in tokens})),
        kill_probability=dict(sorted(risk.items())),
    )


def audit_line(resolution: Resolution, scope: Scope, reservation: str) -> str:
    """The single grep-able log line of an activation (contains ``RandomPreempt`` when drawn)."""
    conflict = ",".join(f"{ns}/{name}" for ns, name in resolution.conflict_set)
    draws = ",".join(
        f"{d.step}:{d.token.run[0]}/{d.token.run[1]}"
        + ("" if d.token.group is None else f"#{d.token.group}")
        for d in resolution.draws
    )
    closure = random_preempt_closure(resolution.seed) if resolution.seed else "none"
    return (
        f"resolver reservation={reservation} scope={scope.label} lottery={closure} "
        f"seed={resolution.seed or '-'} conflictSet=[{conflict}] draws=[{draws}] "
        f"freed={resolution.freed} remainingDeficit={resolution.remaining_deficit}"
    )
