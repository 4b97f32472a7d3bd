"""Reservation: a promise of capacity to a Run at a computed time (namespaced, with its Run).

Its spec is immutable: a promise that silently changed would make the ETA and the protection of
the intended slice meaningless, so a changed plan is a new Reservation. The status carries the
forecast (why the Run waits and what would have to give) and, after activation, the audit record
from which ``kubectl runs explain`` replays the lottery.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field, Strict, StringConstraints

from shared.api.base import CrdInfo, KubeObject, PrinterColumn, SpecModel, StatusModel
from shared.api.common import (
    IMMUTABLE_SPEC,
    Conditions,
    Count,
    DnsLabel,
    Domain,
    Flavor,
    Message,
    NameSet,
    NamespacedName,
    ObjectName,
    Owner,
    Reason,
    RunRef,
    Selector,
    Timestamp,
)
from shared.api.rules import ListType, Rule

ENVELOPE_REF_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
)


class IntendedSlice(SpecModel):
    """Where the Run is promised to start: one fabric domain, optionally named nodes."""

    domain: Domain
    """region, cluster and fabric.domain of the slice."""
    nodes: Annotated[list[ObjectName], ListType(), Field(max_length=512)] | None = None
    """Nodes protected for the Run; others may backfill them only if they end before
    earliestStart."""


class ReservationSpec(SpecModel):
    """The promise: which Run, where, paid by whom, from when. Immutable."""

    run_ref: RunRef
    intended_slice: IntendedSlice
    paying_envelope: (
        Annotated[str, StringConstraints(pattern=ENVELOPE_REF_PATTERN, max_length=317)] | None
    ) = None
    """Envelope expected to pay: ``<budget>/<envelope>`` (or a bare envelope name)."""
    earliest_start: Timestamp
    """When activation is attempted."""

    invariants: ClassVar[tuple[Rule, ...]] = (IMMUTABLE_SPEC,)


class ReservationState(StrEnum):
    PENDING = "Pending"
    ACTIVE = "Active"
    RELEASED = "Released"
    BLOCKED = "Blocked"
    CANCELED = "Canceled"


class Confidence(StrEnum):
    """What the ETA rests on."""

    WINDOW_ALIGNED = "window-aligned"
    WALLTIME = "walltime"
    CONSERVATIVE = "conservative"


class Scope(StatusModel):
    """Where the deficit is counted: a location, or one envelope's funding."""

    kind: Literal["Location", "Funding"] = "Location"
    flavor: Flavor
    selector: Selector | None = None
    budget: ObjectName | None = None
    envelope: DnsLabel | None = None


class RemedyAction(StrEnum):
    DROP_SPARE = "DropSpare"
    SHRINK = "Shrink"
    LOTTERY = "Lottery"


Probability = Annotated[float, Strict(), Field(ge=0, le=1)]


class Remedy(StatusModel):
    """One step activation would take: drop a spare, shrink a run, or draw lots."""

    action: RemedyAction
    run: NamespacedName | None = None
    gpus: Count = 0
    """GPUs this step frees (for Shrink: how much the run shrinks by)."""
    message: Message | None = None


RunSet = Annotated[list[NamespacedName], ListType(), Field(max_length=1024)]


class Forecast(StatusModel):
    deficit_gpus: Count = 0
    scope: Scope | None = None
    remedies: list[Remedy] | None = None
    conflict_set: RunSet | None = None
    """Runs (``namespace/name``) the resolver could cut."""
    kill_probability: dict[str, Probability] | None = None
    """Per conflicting Run (``namespace/name``): chance the lottery ends it."""
    confidence: Confidence | None = None
    expected_start: Timestamp | None = None
    """Expected start: the same search as earliestStart over lease ends predicted from the
    owners' completed Runs in the ledger (earliestStart stays the guarantee)."""
    expected_start_p10: Timestamp | None = None
    """Early end of the expected start's spread (the owners' 10th percentile durations)."""
    expected_start_p90: Timestamp | None = None
    """Late end of the spread (90th percentile durations); never after earliestStart."""
    expected_basis: Message | None = None
    """What the expected start was learnt from, e.g. ``212 completed Runs of org:ai:rai``."""
    open_claims: Annotated[list[ObjectName], ListType(), Field(max_length=1024)] | None = None
    """Reservations in scope whose Run has no walltime: their claims never end, and the ETA
    waits behind them."""


class Token(StatusModel):
    """Something the lottery could end: a malleable group above min, or a whole fixed run."""

    owner: Owner
    run: NamespacedName
    group: Count | None = None
    gpus: Count
    width: Count | None = None
    run_slack: Count | None = None
    leases: NameSet | None = None


class Draw(StatusModel):
    """One published lottery outcome."""

    step: Count
    owner: Owner
    run: NamespacedName
    group: Count | None = None
    """Group ended; absent when the whole run was ended."""
    gpus: Count


class Audit(StatusModel):
    """Everything needed to replay the activation's lottery and check it matched."""

    seed: Annotated[str, StringConstraints(max_length=128)]
    scope: Scope | None = None
    deficit_gpus: Count | None = None
    conflict_set: RunSet | None = None
    tokens: list[Token] | None = None
    draws: list[Draw] | None = None
    ended_leases: NameSet | None = None


class ReservationStatus(StatusModel):
    state: ReservationState | None = None
    reason: Reason | None = None
    message: Message | None = None
    activated_at: Timestamp | None = None
    released_at: Timestamp | None = None
    canceled_at: Timestamp | None = None
    countdown_seconds: Count | None = None
    """Seconds until earliestStart, kept fresh by the forecaster."""
    forecast: Forecast | None = None
    audit: Audit | None = None
    conditions: Conditions | None = None
    observed_generation: Count | None = None


class Reservation(KubeObject):
    """Capacity promised to a Run at a computed earliest start, protected from backfill."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        plural="reservations",
        scope="Namespaced",
        short_names=("resv",),
        columns=(
            PrinterColumn("Run", ".spec.runRef.name"),
            PrinterColumn("State", ".status.state"),
            PrinterColumn("Start", ".spec.earliestStart", description="earliest start"),
            PrinterColumn("Countdown", ".status.countdownSeconds", "integer"),
            PrinterColumn("Deficit", ".status.forecast.deficitGPUs", "integer"),
            PrinterColumn("Confidence", ".status.forecast.confidence", priority=1),
            PrinterColumn("Envelope", ".spec.payingEnvelope", priority=1),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
    )

    kind: Literal["Reservation"] = "Reservation"
    spec: ReservationSpec
    status: ReservationStatus | None = None
