"""Reservation objects from engine decisions: manifest, status, audit and at-risk marks (pure).

The forecast service turns an engine :class:`~shared.engine.forecast.Forecast` into a
Reservation (immutable spec + status), keeps its countdown fresh, decides when to activate or
cancel it, and marks the Runs in its conflict set ``AtRisk``; the resolver turns a
:class:`~shared.engine.resolver.Resolution` into the audit record. Every field-level choice is
made here, without I/O or clocks, so it is unit-tested by round-tripping through the API models.

Status ownership (server-side apply, ARCHITECTURE §3): the forecaster (``jobtree-forecast``)
owns ``state`` until activation, ``reason``, ``message``, ``countdownSeconds``, ``forecast``,
``activatedAt`` and ``canceledAt``; the resolver (``jobtree-resolver``) owns ``audit``,
``releasedAt`` and takes over ``state``, ``reason`` and ``message`` when it activates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from shared.api import GROUP, Reservation, ReservationState
from shared.api.errors import ApiValidationError
from shared.api.lease import LABEL_RUN, label_value
from shared.bus.messages import RunRef
from shared.engine.deficit import min_demand
from shared.engine.durations import Expected
from shared.engine.forecast import Confidence, Forecast
from shared.engine.model import (
    DOMAIN_LABELS,
    DomainKey,
    RunKey,
    RunRequest,
    parse_run_label,
    run_label,
)
from shared.engine.resolver import Remedies, Resolution, Scope
from shared.engine.topology import Topology
from shared.kube.translate import (
    ANNOTATION_GPUS,
    ANNOTATION_RUN_GENERATION,
    LABEL_RUN_UID,
    parse_time,
    rfc3339,
)

FORECAST_MANAGER = "jobtree-forecast"
RESOLVER_MANAGER = "jobtree-resolver"
AT_RISK = "AtRisk"
AT_RISK_REASON = "ReservationConflict"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = FORECAST_MANAGER
"""Reservations the forecaster made carry this label; others are an administrator's."""
MAX_NAME = 253
MAX_SLICE_NODES = 512
MAX_NAME_SET = 64
"""``NameSet`` limit of the API (token leases, ended leases)."""

FORECAST_FIELDS = (
    "state",
    "reason",
    "message",
    "activatedAt",
    "canceledAt",
    "countdownSeconds",
    "forecast",
)
"""Status fields the forecaster applies; each apply must carry all it still wants to own."""


# ---------------------------------------------------------------------------- names


def reservation_name(run_name: str, uid: str, index: int = 0) -> str:
    """``<run>-<uid[:8]>`` (``-<index+1>`` for later incarnations), a valid object name."""
    tag = (uid.replace("-", "")[:8] or hashlib.sha256(run_name.encode()).hexdigest()[:8]).lower()
    suffix = f"-{tag}" + (f"-{index + 1}" if index else "")
    return run_name[: MAX_NAME - len(suffix)].rstrip("-.") + suffix


def next_reservation_name(run_name: str, uid: str, taken: Iterable[str]) -> str:
    """The first deterministic name not used by an earlier (finished) Reservation of the Run."""
    used = set(taken)
    index = 0
    while reservation_name(run_name, uid, index) in used:
        index += 1
    return reservation_name(run_name, uid, index)


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class ReservationView:
    """What the services need from a Reservation object, read once through the API model."""

    namespace: str
    name: str
    uid: str
    run: RunKey
    earliest_start: datetime
    nodes: tuple[str, ...]
    domain: DomainKey
    paying_envelope: str | None
    state: ReservationState | None
    status: Mapping[str, Any]
    managed: bool
    """Created by the forecaster (else by an administrator)."""
    run_uid: str | None
    run_generation: int | None
    activated_at: datetime | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def live(self) -> bool:
        """Still promising capacity: no status yet, Pending or Active."""
        return self.state in (None, ReservationState.PENDING, ReservationState.ACTIVE)


def read_reservation(obj: Mapping[str, Any]) -> ReservationView:
    """Parse a stored Reservation; ValueError when it is malformed."""
    try:
        resv = Reservation.parse(obj)
    except ApiValidationError as exc:
        raise ValueError(str(exc)) from exc
    meta, spec = resv.metadata, resv.spec
    if not meta.name or not meta.namespace:
        raise ValueError("reservation needs metadata.name and metadata.namespace")
    labels = meta.labels or {}
    annotations = meta.annotations or {}
    generation = annotations.get(ANNOTATION_RUN_GENERATION)
    status = obj.get("status") or {}
    domain = spec.intended_slice.domain
    activated = status.get("activatedAt")
    return ReservationView(
        namespace=meta.namespace,
        name=meta.name,
        uid=meta.uid or "",
        run=(spec.run_ref.namespace or meta.namespace, spec.run_ref.name),
        earliest_start=spec.earliest_start,
        nodes=tuple(spec.intended_slice.nodes or ()),
        domain=(domain["region"], domain["cluster"], domain["fabric.domain"]),
        paying_envelope=spec.paying_envelope,
        state=resv.status.state if resv.status else None,
        status=status if isinstance(status, Mapping) else {},
        managed=labels.get(LABEL_MANAGED_BY) == MANAGED_BY,
        run_uid=labels.get(LABEL_RUN_UID) or None,
        run_generation=int(generation) if generation and generation.isdigit() else None,
        activated_at=parse_time(activated) if isinstance(activated, str) else None,
    )


# ---------------------------------------------------------------------------- manifest


def _domain_map(domain: DomainKey) -> dict[str, str]:
    return dict(zip(DOMAIN_LABELS, domain, strict=True))


NO_NODES_IN_SCOPE = "NoNodesInScope"


def unreservable(scope: Scope, requested: Mapping[str, str] | None = None) -> str | None:
    """Why no Reservation can be made in ``scope`` (typed), or None.

    A location with no node of the flavor has nothing to protect and no instant at which the Run
    could start; answering that plainly lets the Run say which selector finds no nodes: the
    Run's own ``requested`` selector when it has one (it may name labels below the domain, such
    as ``rack``), else the location the scope was derived from.
    """
    if scope.nodes is None or scope.nodes:
        return None
    selector = dict(requested) if requested else _selector_of(scope)
    where = ", ".join(f"{key}={value}" for key, value in selector.items()) or "any location"
    return (
        f"{NO_NODES_IN_SCOPE}: no node of gpuType {scope.flavor} matches selector {{{where}}}; "
        "nothing to reserve until such nodes join"
    )


def intended_slice(forecast: Forecast, topology: Topology) -> tuple[DomainKey, tuple[str, ...]]:
    """Domain and nodes the Reservation protects.

    With a placement: the first group's domain and the placement's nodes in slice order. When
    conservative (no placement): the scope's nodes, the domain holding most GPUs first, so the
    claim (its GPUs laid over the nodes in order) lands in one domain whenever one can hold it.
    """
    placement = forecast.placement
    if placement is not None and placement.groups:
        nodes = tuple(dict.fromkeys(s.node for s in placement.slices))
        return placement.groups[0].domain, nodes[:MAX_SLICE_NODES]
    by_domain: dict[DomainKey, list[tuple[str, int]]] = {}
    for name in sorted(forecast.scope.nodes or ()):
        node = topology.node(name)
        if node is not None:
            by_domain.setdefault(node.domain, []).append((name, node.gpus))
    if not by_domain:
        raise ValueError(f"no nodes in scope {forecast.scope.label}: nothing to reserve")
    ranked = sorted(by_domain, key=lambda d: (-sum(g for _, g in by_domain[d]), d))
    nodes = tuple(name for domain in ranked for name, _ in by_domain[domain])
    return ranked[0], nodes[:MAX_SLICE_NODES]


def claim_gpus(forecast: Forecast, request: RunRequest) -> int:
    """GPUs the Reservation holds: the planned placement, else the Run's narrowest start."""
    if forecast.placement is not None:
        return forecast.placement.gpus
    return min_demand(request)


def paying_envelope(forecast: Forecast) -> str | None:
    """The placement's first payer; when conservative, the envelope whose lent headroom is
    reclaimed (funding scope), else unknown."""
    return forecast.paying_envelope or forecast.funding_scope_envelope


def reservation_manifest(
    name: str, run: RunRef, request: RunRequest, forecast: Forecast, topology: Topology
) -> dict[str, Any]:
    """The Reservation object (spec + metadata) the forecaster creates for a blocked Run."""
    domain, nodes = intended_slice(forecast, topology)
    spec: dict[str, Any] = {
        "runRef": {"name": run.name, "namespace": run.namespace},
        "intendedSlice": {"domain": _domain_map(domain), "nodes": list(nodes)},
        "earliestStart": rfc3339(forecast.earliest_start),
    }
    envelope = paying_envelope(forecast)
    if envelope is not None:
        spec["payingEnvelope"] = envelope
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Reservation",
        "metadata": {
            "name": name,
            "namespace": run.namespace,
            "labels": {
                LABEL_RUN: label_value(run.name),
                LABEL_RUN_UID: label_value(run.uid),
                LABEL_MANAGED_BY: MANAGED_BY,
            },
            "annotations": {
                ANNOTATION_GPUS: str(claim_gpus(forecast, request)),
                ANNOTATION_RUN_GENERATION: str(run.generation),
            },
        },
        "spec": spec,
    }


def run_identity_metadata(view: ReservationView, run: RunRef) -> dict[str, Any]:
    """Metadata recording which Run incarnation an administrator's Reservation serves."""
    return {
        "name": view.name,
        "namespace": view.namespace,
        "labels": {LABEL_RUN: label_value(run.name), LABEL_RUN_UID: label_value(run.uid)},
        "annotations": {ANNOTATION_RUN_GENERATION: str(run.generation)},
    }


# ---------------------------------------------------------------------------- status


def countdown(earliest_start: datetime, now: datetime) -> int:
    """Whole seconds until ``earliest_start``, never negative."""
    return max(0, int((earliest_start - now).total_seconds()))


def _selector_of(scope: Scope) -> dict[str, str]:
    """The location a scope label names: ``<flavor>@<region>/<cluster>/<fabric>``, ``*`` open."""
    _, _, where = scope.label.partition("@")
    values = where.split("/") if where else []
    return {
        key: value
        for key, value in zip(DOMAIN_LABELS, values, strict=False)
        if value and value != "*"
    }


def api_scope(scope: Scope, funding_envelope: str | None = None) -> dict[str, Any]:
    """The API's ``Scope``: a location (flavor + selector) or one envelope's funding."""
    if funding_envelope is not None:
        budget, _, envelope = funding_envelope.rpartition("/")
        out: dict[str, Any] = {"kind": "Funding", "flavor": scope.flavor, "envelope": envelope}
        if budget:
            out["budget"] = budget
        return out
    out = {"kind": "Location", "flavor": scope.flavor}
    selector = _selector_of(scope)
    if selector:
        out["selector"] = selector
    return out


def remedy_list(remedies: Remedies) -> list[dict[str, Any]]:
    """What activation would do, in the resolver's order: drop spares, shrink, draw lots."""
    out: list[dict[str, Any]] = []
    for key, gpus in remedies.spare_drops.items():
        out.append(
            {
                "action": "DropSpare",
                "run": run_label(key),
                "gpus": gpus,
                "message": f"drop {gpus} spare GPUs of {run_label(key)}",
            }
        )
    for key, gpus in remedies.shrinks.items():
        out.append(
            {
                "action": "Shrink",
                "run": run_label(key),
                "gpus": gpus,
                "message": f"shrink {run_label(key)} by {gpus} GPUs",
            }
        )
    if remedies.lottery_likely:
        among = len(remedies.conflict_set)
        out.append(
            {
                "action": "Lottery",
                "gpus": remedies.deficit_after_cuts,
                "message": f"seeded lottery for {remedies.deficit_after_cuts} GPUs "
                f"among {among} runs",
            }
        )
    return out


def _probability(value: float) -> float:
    return min(1.0, max(0.0, round(float(value), 4)))


def expected_block(expected: Expected | None, open_claims: Iterable[str] = ()) -> dict[str, Any]:
    """The expected start, its spread and basis, and the open-ended claims, as status fields."""
    out: dict[str, Any] = {}
    if expected is not None:
        out.update(
            expectedStart=rfc3339(expected.at),
            expectedStartP10=rfc3339(expected.p10),
            expectedStartP90=rfc3339(expected.p90),
            expectedBasis=expected.basis,
        )
    claims = sorted(open_claims)[:1024]
    if claims:
        out["openClaims"] = claims
    return out


def forecast_block(
    deficit: int,
    scope: Scope,
    remedies: Remedies,
    confidence: str | None,
    funding_envelope: str | None = None,
    expected: Expected | None = None,
    open_claims: Iterable[str] = (),
) -> dict[str, Any]:
    """``status.forecast``: deficit, scope, remedies, conflict set, kill odds, confidence, and
    the expected start with its spread."""
    out: dict[str, Any] = {
        "deficitGPUs": max(0, deficit),
        "scope": api_scope(scope, funding_envelope),
        "remedies": remedy_list(remedies),
        "conflictSet": [run_label(key) for key in remedies.conflict_set],
        "killProbability": {
            run_label(key): _probability(p) for key, p in remedies.kill_probability.items()
        },
    }
    if confidence is not None:
        out["confidence"] = confidence
    out.update(expected_block(expected, open_claims))
    return out


def pending_status(
    forecast: Forecast, now: datetime, expected: Expected | None = None
) -> dict[str, Any]:
    """The status of a fresh Reservation: Pending, the typed reason, ETA countdown, forecast."""
    return {
        "state": ReservationState.PENDING.value,
        "reason": forecast.blocked.reason,
        "message": forecast.blocked.message[:32768],
        "countdownSeconds": forecast.countdown_seconds(now),
        "forecast": forecast_block(
            forecast.deficit_gpus,
            forecast.scope,
            forecast.remedies,
            forecast.confidence.value,
            forecast.funding_scope_envelope,
            expected,
            forecast.open_claims,
        ),
    }


def preview_status(
    *,
    deficit: int,
    scope: Scope,
    remedies: Remedies,
    reason: str,
    message: str,
    earliest_start: datetime,
    now: datetime,
    confidence: str | None = None,
    funding_envelope: str | None = None,
    expected: Expected | None = None,
    open_claims: Iterable[str] = (),
) -> dict[str, Any]:
    """A Pending status for a Reservation whose time was given (an administrator's) or that is
    refreshed: what its slice lacks now, what activation would cut, and the expected start."""
    return {
        "state": ReservationState.PENDING.value,
        "reason": reason,
        "message": message[:32768],
        "countdownSeconds": countdown(earliest_start, now),
        "forecast": forecast_block(
            deficit, scope, remedies, confidence, funding_envelope, expected, open_claims
        ),
    }


def waiting_status(view: ReservationView, now: datetime) -> dict[str, Any]:
    """Pending on a Run that does not exist yet."""
    return {
        "state": ReservationState.PENDING.value,
        "reason": "RunNotFound",
        "message": f"Run {run_label(view.run)} does not exist yet",
        "countdownSeconds": countdown(view.earliest_start, now),
    }


def _without_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def owned_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The forecaster's fields of a stored status (what a re-apply must carry again).

    Nulls are dropped: when an apply empties a map the manager owned (the conflict set's
    ``killProbability`` once nobody is at risk), the API server may store it as ``null``, which
    the schema refuses when applied back.
    """
    return {
        key: _without_nulls(status[key])
        for key in FORECAST_FIELDS
        if key in status and status[key] is not None
    }


def refreshed_status(
    status: Mapping[str, Any], earliest_start: datetime, now: datetime
) -> dict[str, Any]:
    """The forecaster's fields with a fresh countdown."""
    out = owned_status(status)
    out["countdownSeconds"] = countdown(earliest_start, now)
    return out


def active_status(status: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """Activation started: state Active, ``activatedAt`` (it seeds the lottery), countdown 0."""
    out = owned_status(status)
    out.update(
        state=ReservationState.ACTIVE.value,
        activatedAt=rfc3339(now),
        countdownSeconds=0,
    )
    return out


def canceled_status(
    status: Mapping[str, Any], now: datetime, reason: str, message: str
) -> dict[str, Any]:
    """The Run was deleted or changed spec: the promise is void."""
    out = owned_status(status)
    out.update(
        state=ReservationState.CANCELED.value,
        reason=reason,
        message=message,
        canceledAt=rfc3339(now),
        countdownSeconds=0,
    )
    return out


# ---------------------------------------------------------------------------- the timer


class Step(StrEnum):
    """What the forecaster's timer does with one Reservation on one tick."""

    NOTHING = "Nothing"
    INITIALISE = "Initialise"
    """An administrator's, first seen with its Run: record the Run incarnation, publish the
    forecast of its slice."""
    WAIT_FOR_RUN = "WaitForRun"
    """Its Run does not exist (yet): publish that; initialise and activate once it appears."""
    REFRESH = "Refresh"
    ACTIVATE = "Activate"
    RETRY = "Retry"
    """Active for longer than the retry interval with no outcome: send ACTIVATE again."""
    CANCEL = "Cancel"


@dataclass(frozen=True, slots=True)
class RunFacts:
    """The served Run as the cache shows it (None fields: the Run does not exist)."""

    uid: str
    generation: int
    running: bool = False
    """The Run holds working leases: it started without waiting for this Reservation."""


STARTED_EARLY = "StartedEarly"
REFORECAST = "Reforecast"


def is_conservative(view: ReservationView) -> bool:
    """The published ETA was the configured lead, not an instant anything bounded."""
    forecast = view.status.get("forecast") or {}
    return forecast.get("confidence") == Confidence.CONSERVATIVE.value


def reforecast_reason(at: datetime, confidence: Confidence) -> tuple[str, str]:
    """(reason, message) of a conservative Reservation replaced by an honest ETA."""
    return (
        REFORECAST,
        f"conservative ETA reached without room; {confidence.value} now bounds the wait at "
        f"{rfc3339(at)}: re-forecast instead of cutting other Runs",
    )


def cancel_reason(view: ReservationView, run: RunFacts | None) -> tuple[str, str] | None:
    """(reason, message) when the Run the Reservation serves was deleted or changed spec, or
    (for a forecaster-made Reservation not yet activated) already started without it."""
    served = run_label(view.run)
    if run is None:
        if view.run_uid is None:
            return None  # never seen: an administrator may create the Run after this
        return "RunDeleted", f"Run {served} was deleted"
    if view.run_uid is not None and view.run_uid != label_value(run.uid):
        return "RunDeleted", f"Run {served} was deleted and created again"
    if view.run_generation is not None and run.generation != view.run_generation:
        return (
            "RunChanged",
            f"Run {served} changed spec (generation {view.run_generation} -> {run.generation})",
        )
    if run.running and view.managed and view.state is ReservationState.PENDING:
        return (
            STARTED_EARLY,
            f"Run {served} started before earliestStart: capacity freed up earlier than forecast",
        )
    return None


def next_step(
    view: ReservationView,
    run: RunFacts | None,
    now: datetime,
    *,
    retry_after: timedelta,
    in_flight: bool = False,
) -> Step:
    """The timer's decision for one Reservation (``in_flight``: this process is activating it)."""
    if in_flight or not view.live:
        return Step.NOTHING
    if cancel_reason(view, run) is not None:
        return Step.CANCEL
    if run is None:
        waiting = view.state in (None, ReservationState.PENDING)
        return Step.WAIT_FOR_RUN if waiting else Step.NOTHING
    if view.state is None and view.managed:
        # The forecaster's own RESERVE writes the first status right after creating the object;
        # the watch cache may not show it yet, and initialising would overwrite that forecast.
        return Step.NOTHING
    if view.state is None or view.run_uid is None:
        return Step.INITIALISE
    if view.state is ReservationState.ACTIVE:
        since = view.activated_at
        if since is None or now - since >= retry_after:
            return Step.RETRY
        return Step.NOTHING
    if now >= view.earliest_start:
        return Step.ACTIVATE
    return Step.REFRESH


# ---------------------------------------------------------------------------- at risk


@dataclass(frozen=True, slots=True)
class Risk:
    """A Run's chance of being cut by the pending Reservations whose conflict set names it."""

    probability: float
    """1 − Π(1 − pᵢ) over the Reservations (their lotteries are independent draws)."""
    by_reservation: tuple[tuple[str, float], ...]
    """(``namespace/name`` of the Reservation, its kill probability), by name."""

    @property
    def message(self) -> str:
        parts = ", ".join(f"{name} at {p:.0%}" for name, p in self.by_reservation[:10])
        more = len(self.by_reservation) - 10
        tail = f" and {more} more" if more > 0 else ""
        return (
            f"kill probability {self.probability:.2f} if pending Reservations activate "
            f"({parts}{tail})"
        )


def risks(reservations: Iterable[ReservationView]) -> dict[RunKey, Risk]:
    """Runs in the conflict set of a live Reservation, with their combined kill probability."""
    found: dict[RunKey, list[tuple[str, float]]] = {}
    for view in reservations:
        if view.state not in (ReservationState.PENDING, ReservationState.ACTIVE):
            continue
        forecast = view.status.get("forecast") or {}
        odds = forecast.get("killProbability") or {}
        for label in forecast.get("conflictSet") or ():
            p = odds.get(label)
            if not isinstance(p, int | float) or p <= 0:
                continue
            found.setdefault(parse_run_label(label), []).append((view.key, float(p)))
    out: dict[RunKey, Risk] = {}
    for key, entries in sorted(found.items()):
        survive = 1.0
        for _, p in entries:
            survive *= 1.0 - min(1.0, p)
        out[key] = Risk(_probability(1.0 - survive), tuple(sorted(entries)))
    return out


def condition_of(run_obj: Mapping[str, Any], kind: str = AT_RISK) -> Mapping[str, Any] | None:
    """The Run's condition of type ``kind``, if any."""
    for cond in (run_obj.get("status") or {}).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond
    return None


def at_risk_condition(
    risk: Risk, now: datetime, previous: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``AtRisk`` condition; the transition time survives while it stays True."""
    since = now
    if previous is not None and previous.get("status") == "True":
        text = previous.get("lastTransitionTime")
        if isinstance(text, str):
            since = parse_time(text)
    return {
        "type": AT_RISK,
        "status": "True",
        "reason": AT_RISK_REASON,
        "message": risk.message,
        "lastTransitionTime": rfc3339(since),
    }


def cleared_condition(now: datetime) -> dict[str, Any]:
    """``AtRisk`` False: no live Reservation would cut the Run any more (kept, not removed, so
    the Run's status never loses the field the forecaster owns)."""
    return {
        "type": AT_RISK,
        "status": "False",
        "reason": "NoConflict",
        "message": "no pending Reservation would cut this Run",
        "lastTransitionTime": rfc3339(now),
    }


@dataclass(frozen=True, slots=True)
class RiskPlan:
    """Condition writes that bring the Runs' ``AtRisk`` marks in line with the Reservations."""

    mark: Mapping[RunKey, dict[str, Any]]
    """Runs to mark (or re-mark with new odds)."""
    clear: Mapping[RunKey, dict[str, Any]]
    """Runs marked True that no live Reservation backs any more: their False condition."""


def same_mark(have: Mapping[str, Any] | None, want: Mapping[str, Any]) -> bool:
    """Whether condition ``have`` already says what ``want`` says (its time aside)."""
    return have is not None and all(have.get(k) == want[k] for k in ("status", "reason", "message"))


def risk_plan(
    current: Mapping[RunKey, Risk],
    runs: Mapping[RunKey, Mapping[str, Any]],
    now: datetime,
    sent: Mapping[RunKey, Mapping[str, Any]] = MappingProxyType({}),
) -> RiskPlan:
    """Mark Runs whose condition differs from ``current``; clear marks no longer backed.

    ``sent`` holds the conditions already applied that the watch cache may not show yet: they
    are not applied again (a burst of Reservations would otherwise re-patch the same marks).
    """
    mark: dict[RunKey, dict[str, Any]] = {}
    for key, risk in current.items():
        obj = runs.get(key)
        if obj is None:
            continue
        previous = condition_of(obj)
        wanted = at_risk_condition(risk, now, previous)
        if not (same_mark(previous, wanted) or same_mark(sent.get(key), wanted)):
            mark[key] = wanted
    clear = {
        key: cleared_condition(now)
        for key, obj in sorted(runs.items())
        if key not in current
        and (condition_of(obj) or {}).get("status") == "True"
        and (sent.get(key) or {}).get("status") != "False"
    }
    return RiskPlan(mark, clear)


# ---------------------------------------------------------------------------- audit


def audit_record(
    resolution: Resolution,
    scope: Scope,
    deficit: int,
    funding_envelope: str | None = None,
) -> dict[str, Any]:
    """``status.audit``: seed, scope, deficit, conflict set, tokens, draws and ended leases.

    With the seed, the tokens and the lottery deficit anyone can replay the draws
    (``shared.engine.lottery.replay``). The seed is empty when no lottery was needed.
    """
    tokens: list[dict[str, Any]] = []
    for token in resolution.tokens:
        entry: dict[str, Any] = {
            "owner": token.owner,
            "run": run_label(token.run),
            "gpus": token.gpus,
            "leases": list(token.lease_names[:MAX_NAME_SET]),
        }
        if token.group is not None:
            entry["group"] = token.group
        if token.width is not None:
            entry["width"] = token.width
        if token.run_slack is not None:
            entry["runSlack"] = token.run_slack
        tokens.append(entry)
    draws: list[dict[str, Any]] = []
    for draw in resolution.draws:
        entry = {
            "step": draw.step,
            "owner": draw.owner,
            "run": run_label(draw.token.run),
            "gpus": draw.token.gpus,
        }
        if draw.token.group is not None:
            entry["group"] = draw.token.group
        draws.append(entry)
    ended = list(dict.fromkeys(name for name, _ in resolution.ended_leases))
    return {
        "seed": resolution.seed or "",
        "scope": api_scope(scope, funding_envelope),
        "deficitGPUs": max(0, resolution.lottery_deficit if resolution.seed else deficit),
        "conflictSet": [run_label(key) for key in resolution.conflict_set],
        "tokens": tokens,
        "draws": draws,
        "endedLeases": ended[:MAX_NAME_SET],
    }
