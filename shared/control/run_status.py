"""Run status decisions: which phase a Run is in and exactly what its status says (pure).

Admission owns Run ``status`` except the ``AtRisk`` condition (written by the forecaster). Every
rule that turns observations (the Run, its Leases, its Reservation, its upstreams, tenancy) into
a phase, a message and conditions lives here; the admission service only gathers the facts,
calls these functions, and applies the resulting status with server-side apply.

Rules, in the order :func:`assess` applies them:

1. A Completed or Failed Run is terminal: nothing changes any more.
2. A Run with open Leases is Running; ``width`` and ``funding`` come from the live Leases.
3. A Run whose current attempt ended (it has Leases, none open) ends by the closures of the
   Leases closed last (:func:`attempt_outcome`): all Completed → Completed; a failure
   (Fail, TimeLimit, NodeFailure, RandomPreempt(…), ReclaimedBySpare; a specific one over the
   ``Fail`` its gang-mates close with) → back to Pending with ``restarts + 1`` when the Run
   declares a checkpoint and restarts remain, else Failed with that reason; Canceled → nothing
   (the Run is being deleted).
4. Tenancy: a namespace not authorised for the owner fails the Run (``Unauthorized``); then the
   pod policy: a template it refuses fails the Run (``PodPolicy``, naming each field path).
5. ``after``: an upstream Failed → Failed (``UpstreamFailed``); upstreams not all Completed →
   Pending with condition ``WaitingForUpstream``.
6. A live (Pending/Active) Reservation for the Run → Reserved, with its name and earliest start;
   the message keeps the typed cover/pack reason that caused it.
7. Grace: a Run just bound whose Leases the cache does not show yet, or just reserved whose
   Reservation it does not show yet, is left alone for ``grace`` (no double start).
8. Otherwise admission tries to start it (cover, PLAN, COMMIT; blocked → RESERVE).

Attempts: a requeue starts a new attempt whose Leases get new names. The Leases of one attempt
are those since its Start (or Fill) instant — one bind gives all of its Leases the same start —
so the number of distinct Start instants is the number of attempts begun, compared with
``status.restarts`` to tell "the current attempt ended" from "the requeued one has not begun".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.control.dependencies import Dependency, UpstreamFailed, Waiting
from shared.control.pod_policy import PodPolicyRefusal
from shared.control.tenancy import Denied
from shared.engine.accounting import RunFunding, run_funding
from shared.engine.model import Closure, Lease, LeaseReason, Role, RunRequest
from shared.engine.shrink import current_width, shrink_plan

# -- phases, condition types, reasons -------------------------------------------------------------

PENDING = "Pending"
RESERVED = "Reserved"
RUNNING = "Running"
COMPLETED = "Completed"
FAILED = "Failed"
TERMINAL = frozenset({COMPLETED, FAILED})

SCHEDULED = "Scheduled"
"""True once bound (reason ``Bound``); False with the typed blocking reason while waiting."""
UNAUTHORIZED = "Unauthorized"
WAITING_FOR_UPSTREAM = "WaitingForUpstream"
REQUEUED = "Requeued"
"""Set when an attempt ended in a failure and the Run went back to Pending from its checkpoint."""
FAILED_CONDITION = "Failed"
COMPLETED_CONDITION = "Completed"
AT_RISK = "AtRisk"
"""Owned by the forecaster: admission never writes it."""

BOUND = "Bound"
INVALID_REQUEST = "InvalidRequest"
FORECAST_UNAVAILABLE = "ForecastUnavailable"
BIND_CONFLICT = "BindConflict"
LEASES_LOST = "LeasesLost"

OWNED_KEYS = (
    "phase",
    "conditions",
    "message",
    "pendingReservation",
    "earliestStart",
    "width",
    "funding",
    "restarts",
    "observedGeneration",
)
"""Status fields admission writes (conditions: every type except ``AtRisk``)."""

FAILURE_CLOSURES = frozenset(
    {
        Closure.FAIL.value,
        Closure.TIME_LIMIT.value,
        Closure.NODE_FAILURE.value,
        Closure.RANDOM_PREEMPT.value,
        Closure.RECLAIMED_BY_SPARE.value,
    }
)
BATCH_TOLERANCE = timedelta(seconds=1)
"""Leases closed within this of the last close belong to the same closing commit."""
ATTEMPT_OPENERS = frozenset({LeaseReason.START, LeaseReason.FILL})


def stamp(at: datetime) -> str:
    """RFC 3339 UTC with ``Z``, seconds precision (Kubernetes condition style)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def stamp_exact(at: datetime) -> str:
    """RFC 3339 UTC with ``Z``, microseconds kept (earliestStart from the forecaster)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_stamp(text: object) -> datetime | None:
    """An RFC 3339 string → aware datetime; None for anything else."""
    if not isinstance(text, str) or not text:
        return None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def reason_token(closure: str) -> str:
    """A closure as a condition reason: ``RandomPreempt(abc)`` → ``RandomPreempt``."""
    return closure.split("(", 1)[0] or "Unknown"


def typed_message(reason: str, message: str) -> str:
    """The typed reason verbatim at the front: ``NoCapacity: …`` (cover messages already are)."""
    return message if message.startswith(f"{reason}:") else f"{reason}: {message}"


# -- conditions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cond:
    """A condition admission wants to be present (``lastTransitionTime`` is filled in)."""

    type: str
    status: str
    reason: str
    message: str = ""


def own_conditions(status: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The conditions admission owns in a status (every type but ``AtRisk``)."""
    conds = (status or {}).get("conditions") or []
    return [c for c in conds if isinstance(c, Mapping) and c.get("type") != AT_RISK]


def merge_conditions(
    prev: Mapping[str, Any] | None, wanted: Sequence[Cond], *, now: datetime, generation: int
) -> list[dict[str, Any]]:
    """The full owned condition list: ``wanted`` in order, each keeping its previous
    ``lastTransitionTime`` when its status did not change; conditions not wanted are dropped."""
    before = {c.get("type"): c for c in own_conditions(prev)}
    out = []
    for cond in wanted:
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == cond.status else None
        item: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since or stamp(now),
            "observedGeneration": generation,
        }
        out.append(item)
    return out


def condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """One condition by type, or None."""
    for cond in own_conditions(status):
        if cond.get("type") == type_:
            return cond
    return None


# -- width and funding ----------------------------------------------------------------------------


def width_status(
    request: RunRequest, open_leases: Iterable[Lease], *, phase: str
) -> dict[str, int]:
    """``status.width``: malleable bounds (the fixed width for fixed Runs), the goal, what the
    live working Leases hold, and what is still awaited (nothing once terminal)."""
    m = request.malleable
    low = m.min_gpus if m else request.total_gpus
    high = m.max_gpus if m else request.total_gpus
    desired = min(m.desired_gpus, m.max_gpus) if m else request.total_gpus
    allocated = current_width(open_leases)
    pending = 0 if phase in TERMINAL else max(0, desired - allocated)
    return {"min": low, "max": high, "desired": desired, "allocated": allocated, "pending": pending}


def funding_status(funding: RunFunding) -> dict[str, Any]:
    """``status.funding`` from the engine's split, GPU-hours rounded to microhours."""
    doc = funding.as_status()
    for key in ("ownedGPUHours", "sharedGPUHours", "borrowedGPUHours"):
        doc[key] = round(doc[key], 6)
    for row in doc["sponsors"]:
        row["gpuHours"] = round(row["gpuHours"], 6)
    if not doc["sponsors"]:
        del doc["sponsors"]
    return doc


# -- attempts and closures ------------------------------------------------------------------------


def attempt_starts(leases: Iterable[Lease]) -> tuple[datetime, ...]:
    """Distinct instants at which an attempt began (Start/Fill binds), ascending."""
    return tuple(sorted({lease.start for lease in leases if lease.reason in ATTEMPT_OPENERS}))


def current_attempt(leases: Sequence[Lease], restarts: int) -> tuple[Lease, ...] | None:
    """Leases of attempt ``restarts`` (0-based), or None when that attempt has not begun."""
    starts = attempt_starts(leases)
    if len(starts) <= restarts:
        return None
    begin = starts[-1]
    return tuple(lease for lease in leases if lease.start >= begin)


@dataclass(frozen=True, slots=True)
class Ended:
    """How an attempt with no open Leases ended."""

    outcome: str
    """``Completed``, ``Failed`` or ``Canceled``."""
    closure: str
    """The deciding closure reason, verbatim (``RandomPreempt(<seed>)`` included)."""
    leases: tuple[str, ...]
    """The Leases of the closing batch, by name."""


def attempt_outcome(leases: Sequence[Lease]) -> Ended | None:
    """The outcome of an attempt, by the Leases closed last; None while any Lease is open.

    Leases closed earlier while others stayed open were partial (a swap, a shrink, one malleable
    group cut) and do not decide. Working Leases decide; spares only when there are no others.
    """
    if not leases or any(lease.open for lease in leases):
        return None
    working = [lease for lease in leases if lease.role is not Role.SPARE] or list(leases)
    last = max(lease.end for lease in working if lease.end is not None)
    batch = sorted(
        (
            lease
            for lease in working
            if lease.end is not None and lease.end >= last - BATCH_TOLERANCE
        ),
        key=lambda lease: (lease.end or last, lease.name),
    )
    names = tuple(lease.name for lease in batch)
    closures = [lease.closure or "" for lease in batch]
    if Closure.CANCELED.value in closures:
        return Ended("Canceled", Closure.CANCELED.value, names)
    failures = [c for c in closures if reason_token(c) in FAILURE_CLOSURES]
    if failures:
        # A member ended for cause (NodeFailure, RandomPreempt, …) takes its gang-mates down
        # with plain ``Fail`` in the same commit: the specific closure is the cause.
        specific = [c for c in failures if c != Closure.FAIL.value]
        return Ended(FAILED, (specific or failures)[0], names)
    if Closure.COMPLETED.value in closures:
        return Ended(COMPLETED, Closure.COMPLETED.value, names)
    odd = next((c for c in closures if c), "Unknown")
    return Ended(FAILED, odd, names)


def may_requeue(request: RunRequest, restarts: int) -> bool:
    """A failed attempt is retried from checkpoint while restarts remain."""
    return request.checkpoint is not None and restarts < request.max_restarts


# -- the assessment -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveReservation:
    """A Pending/Active Reservation naming this Run."""

    name: str
    earliest_start: datetime
    state: str
    message: str = ""
    managed: bool = True
    """Made by the forecaster (not an administrator): the Run may start before it if it can."""

    @property
    def may_start_early(self) -> bool:
        """Not activated yet, and not an administrator's choice of time."""
        return self.managed and self.state == "Pending"


@dataclass(frozen=True, slots=True)
class Facts:
    """What admission observed about one Run at ``now``."""

    request: RunRequest
    generation: int
    status: Mapping[str, Any]
    leases: tuple[Lease, ...]
    """This Run's Leases (this incarnation), open and closed."""
    now: datetime
    denied: Denied | None = None
    policy: PodPolicyRefusal | None = None
    """Why the pod policy refuses the Run's template (None: it may become pods)."""
    dependency: Dependency | None = None
    reservation: LiveReservation | None = None
    spare_factor: float = 1.0
    grace: timedelta = timedelta(seconds=30)

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "")

    @property
    def restarts(self) -> int:
        value = self.status.get("restarts")
        return value if isinstance(value, int) and value >= 0 else 0

    @property
    def open_leases(self) -> tuple[Lease, ...]:
        return tuple(lease for lease in self.leases if lease.open)


@dataclass(frozen=True, slots=True)
class Settle:
    """Write this status (when it differs) and stop; ``result`` labels the admission latency
    metric when the Run reached Running/Reserved/Failed by this write (else "")."""

    status: dict[str, Any]
    result: str = ""


@dataclass(frozen=True, slots=True)
class Observe:
    """The Run is Running: write ``status``, then consider one elastic step (``grow`` or the
    lease names ``shrink`` ends)."""

    status: dict[str, Any]
    grow: bool = False
    shrink: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Hold:
    """Leave the Run alone; look again after ``retry`` (None: only when something changes)."""

    retry: timedelta | None
    why: str


@dataclass(frozen=True, slots=True)
class StartNeeded:
    """No Leases, no Reservation, nothing blocking: cover, PLAN, COMMIT (or RESERVE)."""


Assessment = Settle | Observe | Hold | StartNeeded


def _base(facts: Facts, *, phase: str, restarts: int | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "restarts": facts.restarts if restarts is None else restarts,
        "observedGeneration": facts.generation,
    }
    return status


def _finish(
    facts: Facts,
    status: dict[str, Any],
    conds: Sequence[Cond],
    *,
    message: str,
    leases_open: Sequence[Lease] = (),
    funding: RunFunding | None = None,
) -> dict[str, Any]:
    status["message"] = message
    status["conditions"] = merge_conditions(
        facts.status, conds, now=facts.now, generation=facts.generation
    )
    status["width"] = width_status(facts.request, leases_open, phase=status["phase"])
    if funding is not None:
        status["funding"] = funding_status(funding)
    return status


def _requeued_cond(facts: Facts) -> list[Cond]:
    """Keep the Requeued record across later phases (it says why restarts were spent)."""
    old = condition(facts.status, REQUEUED)
    if old is None:
        return []
    return [Cond(REQUEUED, str(old.get("status")), str(old.get("reason")), str(old.get("message")))]


def failed_status(
    facts: Facts, reason: str, message: str, *, extra: Sequence[Cond] = ()
) -> dict[str, Any]:
    """Phase Failed with condition Failed(reason); funding kept from the Leases."""
    status = _base(facts, phase=FAILED)
    funding = run_funding(facts.leases, now=facts.now, spare_factor=facts.spare_factor)
    conds = [*extra, Cond(FAILED_CONDITION, "True", reason, message), *_requeued_cond(facts)]
    return _finish(facts, status, conds, message=message, funding=funding if facts.leases else None)


def pending_status(
    facts: Facts,
    reason: str,
    message: str,
    *,
    condition_message: str | None = None,
    restarts: int | None = None,
    extra: Sequence[Cond] = (),
) -> dict[str, Any]:
    """Phase Pending: condition Scheduled False with the (typed) reason."""
    status = _base(facts, phase=PENDING, restarts=restarts)
    scheduled = Cond(SCHEDULED, "False", reason, condition_message or message)
    conds = [scheduled, *extra]
    if not any(c.type == REQUEUED for c in extra):
        conds += _requeued_cond(facts)
    return _finish(facts, status, conds, message=message)


def reserved_status(
    facts: Facts, *, reservation: str, earliest_start: datetime, reason: str, message: str
) -> dict[str, Any]:
    """Phase Reserved: the Reservation's name and ETA; message = the typed reason verbatim."""
    status = _base(facts, phase=RESERVED)
    status["pendingReservation"] = reservation
    status["earliestStart"] = stamp_exact(earliest_start)
    conds = [Cond(SCHEDULED, "False", reason, message), *_requeued_cond(facts)]
    return _finish(facts, status, conds, message=message)


def running_status(
    facts: Facts,
    leases_open: Sequence[Lease],
    funding: RunFunding,
    *,
    message: str | None = None,
) -> dict[str, Any]:
    """Phase Running: width and funding from ``leases_open`` / ``funding``."""
    status = _base(facts, phase=RUNNING)
    allocated = current_width(leases_open)
    text = message if message is not None else f"Running on {allocated} GPUs"
    conds = [Cond(SCHEDULED, "True", BOUND, text), *_requeued_cond(facts)]
    return _finish(facts, status, conds, message=text, leases_open=leases_open, funding=funding)


def bound_status(facts: Facts, planned: Sequence[Lease]) -> dict[str, Any]:
    """Phase Running right after a successful bind, from the committed plan's Leases (the
    cache shows the real ones a moment later); funding is taken at the plan's start instant,
    which may be a little after ``facts.now``."""
    began = max((lease.start for lease in planned), default=facts.now)
    funding = run_funding(planned, now=max(began, facts.now), spare_factor=facts.spare_factor)
    return running_status(facts, planned, funding)


def completed_status(facts: Facts) -> dict[str, Any]:
    """Phase Completed: every rank succeeded; funding keeps the GPU-hours used."""
    status = _base(facts, phase=COMPLETED)
    funding = run_funding(facts.leases, now=facts.now, spare_factor=facts.spare_factor)
    message = "Completed: all ranks succeeded"
    conds = [Cond(COMPLETED_CONDITION, "True", COMPLETED, message), *_requeued_cond(facts)]
    return _finish(facts, status, conds, message=message, funding=funding)


def _typed_reason(message: str) -> str | None:
    """The reason a typed message (``NoFit: …``) starts with; None for untyped text."""
    head, sep, _ = message.partition(":")
    return head if sep and head.isidentifier() and head != RESERVED else None


def _reserved_reason(facts: Facts, resv: LiveReservation) -> tuple[str, str]:
    """The typed cover/pack reason and message a Reserved Run shows, so ``kubectl`` says why.

    The Run's own typed message while it names this Reservation; else the Reservation's (the
    forecaster records the blocked attempt's typed message verbatim); else the Run's blocked
    attempt (RESERVE may time out after the forecaster made it); the generic "waiting for
    Reservation" message only when none is typed, and it gives way as soon as the
    Reservation's message is.
    """
    old = condition(facts.status, SCHEDULED)
    reason = str(old.get("reason") or "") if old and old.get("status") == "False" else ""
    message = str(facts.status.get("message") or "")
    blocked = reason != WAITING_FOR_UPSTREAM and _typed_reason(message) == reason
    own = reason if blocked else None
    if own is not None and facts.status.get("pendingReservation") == resv.name:
        return own, message
    theirs = _typed_reason(resv.message)
    if theirs is not None:
        return theirs, resv.message
    if own is not None:
        return own, message
    return RESERVED, resv.message or f"Reserved: waiting for Reservation {resv.name}"


def _since(cond: Mapping[str, Any] | None) -> datetime | None:
    return None if cond is None else parse_stamp(cond.get("lastTransitionTime"))


def elastic_step(request: RunRequest, open_leases: Sequence[Lease]) -> tuple[bool, tuple[str, ...]]:
    """(grow?, leases to end by shrink) for a running malleable Run; fixed Runs never change."""
    m = request.malleable
    if m is None:
        return False, ()
    desired = min(m.desired_gpus, m.max_gpus)
    width = current_width(open_leases)
    if desired < width:
        return False, shrink_plan(request, open_leases, desired)
    return width < desired, ()


def may_grow(status: Mapping[str, Any] | None) -> bool:
    """Whether a Run's status says it runs below its desired width: such a Run may grow when
    capacity or money frees, so admission looks at it again then, not only on the resync."""
    status = status or {}
    width = status.get("width")
    if status.get("phase") != RUNNING or not isinstance(width, Mapping):
        return False
    allocated, desired = width.get("allocated"), width.get("desired")
    return isinstance(allocated, int) and isinstance(desired, int) and allocated < desired


def assess(facts: Facts) -> Assessment:
    """Apply the rules of this module, in order, to one Run (see the module docstring)."""
    phase, request, now = facts.phase, facts.request, facts.now
    if phase in TERMINAL:
        return Hold(None, f"terminal: {phase}")
    open_leases = facts.open_leases
    if open_leases:
        funding = run_funding(facts.leases, now=now, spare_factor=facts.spare_factor)
        grow, shrink = elastic_step(request, open_leases)
        return Observe(running_status(facts, open_leases, funding), grow=grow, shrink=shrink)

    attempt = current_attempt(facts.leases, facts.restarts)
    ended = attempt_outcome(attempt) if attempt else None
    if ended is not None:
        if ended.outcome == "Canceled":
            return Hold(timedelta(seconds=60), "leases canceled: the Run is being deleted")
        if ended.outcome == COMPLETED:
            return Settle(completed_status(facts))
        token = reason_token(ended.closure)
        if may_requeue(request, facts.restarts):
            nxt = facts.restarts + 1
            message = (
                f"Requeued from checkpoint after {ended.closure} "
                f"(restart {nxt} of {request.max_restarts})"
            )
            requeued = Cond(REQUEUED, "True", token, message)
            return Settle(pending_status(facts, token, message, restarts=nxt, extra=[requeued]))
        limit = (
            f"; no restarts left ({facts.restarts} of {request.max_restarts} used)"
            if request.checkpoint is not None
            else "; no checkpoint declared, so it is not requeued"
        )
        return Settle(
            failed_status(facts, token, f"{token}: the gang ended with {ended.closure}{limit}"),
            "failed",
        )

    if facts.denied is not None:
        denied = facts.denied
        return Settle(
            failed_status(
                facts,
                denied.reason,
                denied.message,
                extra=[Cond(UNAUTHORIZED, "True", denied.reason, denied.message)],
            ),
            "failed",
        )
    if facts.policy is not None:
        refusal = facts.policy
        return Settle(failed_status(facts, refusal.reason, refusal.message), "failed")

    dep = facts.dependency
    if isinstance(dep, UpstreamFailed):
        return Settle(failed_status(facts, dep.reason, dep.message), "failed")
    if isinstance(dep, Waiting):
        waiting = Cond(WAITING_FOR_UPSTREAM, "True", dep.reason, dep.message)
        return Settle(pending_status(facts, dep.reason, dep.message, extra=[waiting]))

    resv = facts.reservation
    if resv is not None:
        reason, message = _reserved_reason(facts, resv)
        return Settle(
            reserved_status(
                facts,
                reservation=resv.name,
                earliest_start=resv.earliest_start,
                reason=reason,
                message=message,
            ),
            "reserved",
        )

    since = _since(condition(facts.status, SCHEDULED))
    fresh = since is not None and now - since < facts.grace
    if phase == RUNNING and attempt is None and fresh:
        return Hold(timedelta(seconds=2), "bound: waiting for the cache to show the new leases")
    if phase == RESERVED and facts.status.get("pendingReservation") and fresh:
        return Hold(timedelta(seconds=2), "reserved: waiting for the cache to show the Reservation")
    return StartNeeded()


# -- writes ---------------------------------------------------------------------------------------


def _hours_free(doc: Any) -> Any:
    """A status fragment with GPU-hour figures removed (they move continuously)."""
    if isinstance(doc, Mapping):
        return {k: _hours_free(v) for k, v in doc.items() if not k.lower().endswith("gpuhours")}
    if isinstance(doc, list):
        return [_hours_free(v) for v in doc]
    return doc


def owned_view(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a Run status admission owns."""
    status = status or {}
    view = {k: status[k] for k in OWNED_KEYS if k in status and k != "conditions"}
    conds = own_conditions(status)
    if conds:
        view["conditions"] = conds
    return view


def needs_write(
    current: Mapping[str, Any] | None, desired: Mapping[str, Any], *, hours_matter: bool
) -> bool:
    """Whether applying ``desired`` would change what admission owns.

    GPU-hours advance every instant a Run holds GPUs; unless ``hours_matter`` (a periodic
    refresh) they are ignored, so a status write does not trigger an endless chain of writes.
    """
    have, want = owned_view(current), owned_view(desired)
    if hours_matter:
        return bool(have != want)
    return bool(_hours_free(have) != _hours_free(want))
