"""When a running gang's leases end on their own (SPEC §3 Completion, walltime, deletion).

The binder watches Pods and Runs and, for every Run holding open leases, asks :func:`decide`
whether the gang is over and why:

* the Run is deleted (absent, or carrying a deletionTimestamp) → every open lease closes
  ``Canceled`` and every pod goes; the leases stay (they are the ledger);
* every active rank's pod Succeeded → every open lease closes ``Completed``;
* any active rank's pod Failed → the gang is broken: every open lease closes ``Fail``;
* an active rank's pod is gone (deleted or evicted by someone else) for longer than
  ``MISSING_GRACE`` after its lease started → the gang is broken just the same: ``Fail``;
* ``now`` ≥ the earliest open lease start + ``maxDuration`` → ``TimeLimit``.

The first rule that applies wins, in that order: a gang whose pods all succeeded completed even
if the binder only notices after the walltime, and a pod failure is a truer reason than the
walltime that passed while nobody was looking. Pods that still run when their gang ends are
deleted; pods that terminated hold no GPUs and are kept so their logs stay readable.

Only pods of the gang's current incarnation count: a pod records the lease names it was created
for, so a Failed pod left over from an earlier attempt cannot fail a requeued gang.

Pure: no I/O, time comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.engine.model import Closure, Lease, Role
from shared.engine.state import Settings

SUCCEEDED = "Succeeded"
FAILED = "Failed"
TERMINAL = frozenset({SUCCEEDED, FAILED})
MISSING_GRACE = Settings().missing_pod_grace
"""How long a rank may have no pod before the gang counts as broken: the binder creates the pod
right after the lease, so only a pod cache far behind could show a younger rank without one."""


@dataclass(frozen=True, slots=True)
class PodView:
    """One pod of the Run as the binder's pod cache shows it."""

    name: str
    rank: int
    phase: str
    """Pending, Running, Succeeded, Failed or Unknown."""
    leases: frozenset[str] = frozenset()
    """Lease names the pod was created for; empty when the pod does not say."""
    deleting: bool = False
    """Carries a deletionTimestamp: already on its way out."""


@dataclass(frozen=True, slots=True)
class RunView:
    """What lifecycle needs to know about the Run object itself."""

    present: bool
    deleting: bool = False
    max_duration: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """Leases to close (with the closure) and pods to delete; empty when nothing happens."""

    closure: Closure | None
    ends: tuple[tuple[str, str], ...]
    """(lease name, closure reason) for every open lease of the Run."""
    delete_pods: tuple[str, ...]
    message: str = ""

    @property
    def idle(self) -> bool:
        return not self.ends and not self.delete_pods


NOTHING = Outcome(None, (), ())


def _working(leases: Iterable[Lease]) -> list[Lease]:
    return [le for le in leases if le.open and le.rank >= 0 and le.role is not Role.SPARE]


def current_pods(leases: Sequence[Lease], pods: Iterable[PodView]) -> list[PodView]:
    """Pods of the gang's current incarnation: created for one of its open leases, or (when a
    pod does not record its leases) holding one of its open ranks."""
    open_names = {le.name for le in leases if le.open}
    ranks = {le.rank for le in _working(leases)}
    out = []
    for pod in pods:
        if pod.leases:
            if pod.leases & open_names:
                out.append(pod)
        elif pod.rank in ranks:
            out.append(pod)
    return out


def deadline(leases: Sequence[Lease], run: RunView) -> datetime | None:
    """When the walltime runs out: the earliest open lease start plus ``maxDuration``."""
    starts = [le.start for le in leases if le.open]
    if run.max_duration is None or not starts:
        return None
    return min(starts) + run.max_duration


def _end_all(
    closure: Closure, leases: Sequence[Lease], delete: Iterable[PodView], message: str
) -> Outcome:
    ends = tuple((le.name, closure.value) for le in sorted(leases, key=lambda x: x.name) if le.open)
    doomed = tuple(sorted(p.name for p in delete if not p.deleting))
    return Outcome(closure, ends, doomed, message)


def decide(
    leases: Sequence[Lease],
    pods: Sequence[PodView],
    run: RunView,
    now: datetime,
    missing_grace: timedelta = MISSING_GRACE,
) -> Outcome:
    """The leases of one Run to close, and its pods to delete, at ``now``.

    ``leases`` are the Run's leases (closed ones are ignored), ``pods`` its pods.
    """
    open_leases = [le for le in leases if le.open]
    if not run.present or run.deleting:
        why = "Run deleted" if not run.present else "Run is being deleted"
        if not open_leases:
            doomed = tuple(sorted(p.name for p in pods if not p.deleting))
            return Outcome(None, (), doomed, why) if doomed else NOTHING
        return _end_all(Closure.CANCELED, open_leases, pods, why)
    if not open_leases:
        return NOTHING
    mine = current_pods(open_leases, pods)
    running = [p for p in mine if p.phase not in TERMINAL]
    ranks = {le.rank for le in _working(open_leases)}
    phase_of: dict[int, set[str]] = {}
    for pod in mine:
        phase_of.setdefault(pod.rank, set()).add(pod.phase)
    if ranks and all(phase_of.get(r) == {SUCCEEDED} for r in ranks):
        return _end_all(Closure.COMPLETED, open_leases, running, "all ranks succeeded")
    failed = sorted(p.rank for p in mine if p.phase == FAILED and p.rank in ranks)
    if failed:
        return _end_all(Closure.FAIL, open_leases, running, f"rank {failed[0]} failed")
    gone = sorted(
        le.rank
        for le in _working(open_leases)
        if le.rank not in phase_of and now - le.start >= missing_grace
    )
    if gone:
        return _end_all(Closure.FAIL, open_leases, running, f"the pod of rank {gone[0]} is gone")
    limit = deadline(open_leases, run)
    if limit is not None and now >= limit:
        return _end_all(Closure.TIME_LIMIT, open_leases, running, f"walltime ended at {limit}")
    return NOTHING
