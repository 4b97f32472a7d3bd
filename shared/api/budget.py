"""Budget: time- and location-scoped GPU envelopes held by one owner (cluster-scoped).

Budgets form a family tree: a Budget's parents are its explicit ``parents``, else its owner path
parent when a Budget with that owner exists (``shared.engine.family`` holds the rule); cover funds
Runs from them in a fixed structural order. The invariants here are the ones an administrator
must not be able to get wrong at ``kubectl apply`` time, e.g. more GPU-hours than the window can
ever burn.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, Strict

from shared.api.base import CrdInfo, KubeObject, PrinterColumn, SpecModel, StatusModel
from shared.api.common import (
    Conditions,
    Count,
    DnsLabel,
    Flag,
    Flavor,
    GpuHours,
    Gpus,
    Int,
    Owner,
    OwnerGlob,
    OwnerSet,
    Selector,
    Timestamp,
)
from shared.api.rules import ListType, Rule


class PreActivation(SpecModel):
    """What an envelope allows before its window ``start``."""

    allow_reservations: Flag = False
    """Runs may hold Reservations against the envelope, activating when the window opens."""
    allow_admission: Flag = False
    """Runs may start (and be charged) before the window opens."""


class Lending(SpecModel):
    """Sponsorship policy: which non-family owners may borrow this envelope, and how much."""

    allow: Flag = False
    """Whether sponsored Runs may borrow at all."""
    to: Annotated[list[OwnerGlob], ListType(), Field(max_length=32)] | None = None
    """Owner globs allowed to borrow (``org:ai:*``); required when ``allow`` is true."""
    max_concurrency: Gpus | None = None
    """Most GPUs lent out at once (≤ the envelope's concurrency)."""
    max_gpu_hours: GpuHours | None = None
    """Most GPU-hours lent out over the window (≤ the envelope's maxGPUHours)."""

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.allow) || !self.allow || (has(self.to) && size(self.to) > 0)",
            field="to",
            message="must list at least one owner glob when allow is true",
            ok=lambda s: not s.allow or bool(s.to),
        ),
    )


def window_seconds(env: Envelope) -> int | None:
    """Whole seconds between start and end, when both are set and ordered."""
    if env.start is None or env.end is None or env.end <= env.start:
        return None
    return int((env.end - env.start).total_seconds())


def window_gpu_hours(env: Envelope) -> float | None:
    """Concurrency × window hours: the most GPU-hours the window can physically burn."""
    seconds = window_seconds(env)
    return None if seconds is None else env.concurrency * seconds / 3600


def _within_window(env: Envelope) -> bool:
    bound = window_gpu_hours(env)
    return env.max_gpu_hours is None or bound is None or env.max_gpu_hours <= bound


class Envelope(SpecModel):
    """A bound on GPU concurrency (and optionally GPU-hours) of one flavor in one location."""

    name: DnsLabel
    """Unique within the Budget; Leases name it in ``paidByEnvelope``."""
    flavor: Flavor
    """GPU flavor paid for (the ``gpu.flavor`` node label), e.g. ``H100-80GB``."""
    selector: Selector
    """Topology labels of the nodes this envelope pays for (≥1 entry)."""
    concurrency: Gpus
    """Most GPUs held at once by leases this envelope pays for."""
    max_gpu_hours: GpuHours | None = None
    """Total GPU-hours over the window; ≤ concurrency × window hours."""
    start: Timestamp | None = None
    """Window start (RFC 3339); before it only ``preActivation`` applies."""
    end: Timestamp | None = None
    """Window end (RFC 3339), after ``start``; the envelope pays for nothing after it."""
    pre_activation: PreActivation | None = None
    lending: Lending | None = None

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.start) || !has(self.end) || self.end > self.start",
            field="end",
            message="must be after start",
            ok=lambda e: e.start is None or e.end is None or e.end > e.start,
            detail=lambda e: f"{e.end.isoformat()} <= {e.start.isoformat()}",
        ),
        Rule(
            cel="!has(self.maxGPUHours) || !has(self.start) || !has(self.end)"
            " || self.end <= self.start || self.maxGPUHours <= double(self.concurrency)"
            " * double((self.end - self.start).getSeconds()) / 3600.0",
            field="maxGPUHours",
            message="exceeds concurrency × window hours",
            ok=_within_window,
            detail=lambda e: (
                f"{e.max_gpu_hours:g} > {e.concurrency} GPUs × "
                f"{(e.end - e.start).total_seconds() / 3600:g}h = {window_gpu_hours(e):g}"
            ),
        ),
        Rule(
            cel="!has(self.lending) || !has(self.lending.maxConcurrency)"
            " || self.lending.maxConcurrency <= self.concurrency",
            field="lending.maxConcurrency",
            message="must not exceed the envelope's concurrency",
            ok=lambda e: (
                e.lending is None
                or e.lending.max_concurrency is None
                or e.lending.max_concurrency <= e.concurrency
            ),
        ),
        Rule(
            cel="!has(self.lending) || !has(self.lending.maxGPUHours)"
            " || !has(self.maxGPUHours) || self.lending.maxGPUHours <= self.maxGPUHours",
            field="lending.maxGPUHours",
            message="must not exceed the envelope's maxGPUHours",
            ok=lambda e: (
                e.lending is None
                or e.lending.max_gpu_hours is None
                or e.max_gpu_hours is None
                or e.lending.max_gpu_hours <= e.max_gpu_hours
            ),
        ),
    )


class AggregateCap(SpecModel):
    """One bound over several envelopes of the same flavor (e.g. a regional total)."""

    name: DnsLabel
    flavor: Flavor
    """Flavor of every envelope the cap bounds."""
    envelopes: Annotated[list[DnsLabel], ListType(), Field(min_length=1, max_length=32)]
    """Names of this Budget's envelopes the cap bounds together."""
    max_concurrency: Gpus | None = None
    """Most GPUs held at once across those envelopes."""
    max_gpu_hours: GpuHours | None = None
    """Most GPU-hours consumed across those envelopes."""

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.maxConcurrency) || has(self.maxGPUHours)",
            message="an aggregate cap needs maxConcurrency or maxGPUHours",
            ok=lambda c: c.max_concurrency is not None or c.max_gpu_hours is not None,
        ),
    )


def _caps_name_envelopes(spec: BudgetSpec) -> bool:
    flavors = {e.name: e.flavor for e in spec.envelopes}
    return all(flavors.get(n) == c.flavor for c in spec.aggregate_caps or () for n in c.envelopes)


class BudgetSpec(SpecModel):
    """Who owns the money, where it sits in the family tree, and its envelopes."""

    owner: Owner
    """Owner path, e.g. ``org:ai:rai:sys``."""
    parents: OwnerSet | None = None
    """Explicit parents; when absent the parent is the owner path minus its last segment if a
    Budget with that owner exists (the family is the tree of Budgets that exist)."""
    envelopes: Annotated[list[Envelope], ListType("name"), Field(min_length=1, max_length=32)]
    """GPU envelopes (≥1), unique by name."""
    aggregate_caps: Annotated[list[AggregateCap], ListType("name"), Field(max_length=16)] | None = (
        None
    )
    """Bounds over several envelopes at once, unique by name."""

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.aggregateCaps) || self.aggregateCaps.all(c, c.envelopes.all(n,"
            " self.envelopes.exists(e, e.name == n && e.flavor == c.flavor)))",
            field="aggregateCaps",
            message="must name envelopes of this Budget with the cap's flavor",
            ok=_caps_name_envelopes,
        ),
    )


class Headroom(StatusModel):
    """What is still available; negative when a cap was lowered below current use."""

    concurrency: Int
    gpu_hours: Annotated[float, Strict()] | None = None
    """Absent when no GPU-hours bound applies."""


class Usage(StatusModel):
    """GPUs held now and GPU-hours consumed, derived from leases."""

    gpus: Count = 0
    gpu_hours: GpuHours = 0.0


class EnvelopeUsage(StatusModel):
    """Use of one envelope split by who holds it."""

    owned: Usage = Field(default_factory=Usage)
    """Leases of the envelope owner's own Runs (Active role)."""
    shared: Usage = Field(default_factory=Usage)
    """Leases of relatives' Runs through family sharing."""
    borrowed_out: Usage = Field(default_factory=Usage)
    """Leases of sponsored (non-family) Runs through lending."""
    spare: Usage = Field(default_factory=Usage)
    """Spare-role leases (GPU-hours charged at the spare factor)."""


class EnvelopeStatus(StatusModel):
    name: DnsLabel
    flavor: Flavor | None = None
    active: Flag | None = None
    """Whether now is inside the envelope's window."""
    headroom: Headroom
    usage: EnvelopeUsage = Field(default_factory=EnvelopeUsage)


class AggregateCapStatus(StatusModel):
    name: DnsLabel
    headroom: Headroom
    usage: Usage = Field(default_factory=Usage)


class BudgetStatus(StatusModel):
    """Headroom and usage per envelope and aggregate cap, replayed from the Lease ledger."""

    envelopes: Annotated[list[EnvelopeStatus], ListType("name")] | None = None
    aggregate_caps: Annotated[list[AggregateCapStatus], ListType("name")] | None = None
    updated_at: Timestamp | None = None
    observed_generation: Count | None = None
    conditions: Conditions | None = None


class Budget(KubeObject):
    """GPU envelopes of one owner: concurrency and GPU-hours by flavor, location and window."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        plural="budgets",
        scope="Cluster",
        short_names=("bud",),
        columns=(
            PrinterColumn("Owner", ".spec.owner"),
            PrinterColumn("Envelopes", ".spec.envelopes[*].name"),
            PrinterColumn(
                "Headroom", ".status.envelopes[*].headroom.concurrency", description="GPUs free"
            ),
            PrinterColumn("Flavors", ".spec.envelopes[*].flavor", priority=1),
            PrinterColumn("Updated", ".status.updatedAt", "date", priority=1),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
    )

    kind: Literal["Budget"] = "Budget"
    spec: BudgetSpec
    status: BudgetStatus | None = None
