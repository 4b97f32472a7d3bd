"""Run: a gang of GPU pods that start together or not at all (namespaced).

The spec says what the researcher wants (size, shape, walltime, elasticity, who may co-fund);
the status reports what Jobtree decided (phase, ETA, live width and who pays for it).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from shared.api.base import CrdInfo, KubeObject, PrinterColumn, SpecModel, StatusModel
from shared.api.common import (
    Conditions,
    Count,
    Duration,
    Flag,
    Flavor,
    GpuHours,
    Gpus,
    Message,
    NameSet,
    ObjectName,
    Owner,
    OwnerSet,
    PositiveDuration,
    Selector,
    Timestamp,
)
from shared.api.rules import ListType, Rule


class Resources(SpecModel):
    """GPU flavor and gang width."""

    gpu_type: Flavor
    """GPU flavor (the ``gpu.flavor`` node label), e.g. ``H100-80GB``."""
    total_gpus: Gpus
    """Gang width in GPUs; for malleable Runs the starting width."""


class Locality(SpecModel):
    """Where and in which shape the gang is placed."""

    group_gpus: Gpus | None = None
    """Split the gang into fixed groups of this many GPUs (last one smaller); each group stays
    inside one fabric domain."""
    allow_cross_group_spread: Flag = True
    """False puts every group in one domain or fails fast."""
    selector: Selector | None = None
    """Requested location; defaults to the locations of the owner's own envelopes."""


class Runtime(SpecModel):
    """Checkpointing, walltime and restarts."""

    checkpoint: Duration | None = None
    """Checkpoint interval: a Run that declares it is requeued (not failed) when cut."""
    max_duration: PositiveDuration | None = None
    """Walltime: leases close with TimeLimit past it; forecasts replay it."""
    max_restarts: Count = 0
    """How many times the gang is requeued from its checkpoint before it fails."""


def _aligned(value: int, m: Malleable) -> bool:
    """On the step grid that starts at minTotalGPUs."""
    return m.step_gpus > 0 and (value - m.min_total_gpus) % m.step_gpus == 0


def _within(value: int, m: Malleable) -> bool:
    return m.min_total_gpus <= value <= m.max_total_gpus


class Malleable(SpecModel):
    """Elastic width: the Run may start at, grow to and shrink to any step in [min, max]."""

    min_total_gpus: Gpus
    """Smallest width the Run may start at or be shrunk to."""
    max_total_gpus: Gpus
    """Largest width; minTotalGPUs plus a multiple of stepGPUs."""
    step_gpus: Gpus
    """Grow/shrink granularity; usually a multiple of locality.groupGPUs."""
    desired_total_gpus: Gpus | None = None
    """Width to grow toward; defaults to maxTotalGPUs."""

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.maxTotalGPUs >= self.minTotalGPUs",
            field="maxTotalGPUs",
            message="must be >= minTotalGPUs",
            ok=lambda m: m.max_total_gpus >= m.min_total_gpus,
            detail=lambda m: f"{m.max_total_gpus} < {m.min_total_gpus}",
        ),
        Rule(
            cel="self.maxTotalGPUs < self.minTotalGPUs || self.stepGPUs <= 0"
            " || (self.maxTotalGPUs - self.minTotalGPUs) % self.stepGPUs == 0",
            field="maxTotalGPUs",
            message="must be minTotalGPUs plus a multiple of stepGPUs",
            ok=lambda m: _aligned(m.max_total_gpus, m),
            detail=lambda m: (
                f"{m.max_total_gpus} = {m.min_total_gpus} + "
                f"{(m.max_total_gpus - m.min_total_gpus) / m.step_gpus:g} × {m.step_gpus}"
            ),
        ),
        Rule(
            cel="!has(self.desiredTotalGPUs) || (self.desiredTotalGPUs >= self.minTotalGPUs"
            " && self.desiredTotalGPUs <= self.maxTotalGPUs)",
            field="desiredTotalGPUs",
            message="must be within [minTotalGPUs, maxTotalGPUs]",
            ok=lambda m: m.desired_total_gpus is None or _within(m.desired_total_gpus, m),
            detail=lambda m: (
                f"{m.desired_total_gpus} not in [{m.min_total_gpus}, {m.max_total_gpus}]"
            ),
        ),
        Rule(
            cel="!has(self.desiredTotalGPUs) || self.stepGPUs <= 0"
            " || (self.desiredTotalGPUs - self.minTotalGPUs) % self.stepGPUs == 0",
            field="desiredTotalGPUs",
            message="must be minTotalGPUs plus a multiple of stepGPUs",
            ok=lambda m: m.desired_total_gpus is None or _aligned(m.desired_total_gpus, m),
            detail=lambda m: (
                f"{m.desired_total_gpus} is off the {m.min_total_gpus} + n × {m.step_gpus} grid"
            ),
        ),
    )

    @model_validator(mode="after")
    def _default_desired(self) -> Self:
        if self.desired_total_gpus is None:
            self.desired_total_gpus = self.max_total_gpus
        return self


class Funding(SpecModel):
    """Co-funding: whether sponsors outside the family may pay for part of the gang."""

    allow_borrow: Flag = False
    """Whether sponsors (cover step 6) may pay at all; family sharing needs no consent."""
    max_borrow_gpus: Gpus | None = None
    """Most GPUs sponsors may pay for at once."""
    sponsors: OwnerSet | None = None
    """Owners whose lending envelopes may be borrowed (their ``lending.to`` must match us)."""


PodTemplate = Annotated[
    dict[str, Any],
    Field(
        json_schema_extra={
            "x-kubernetes-preserve-unknown-fields": True,
            "x-kubernetes-embedded-resource": False,
        }
    ),
]
"""A core/v1 PodTemplateSpec, validated by the API server when pods are created from it."""


class RunSpec(SpecModel):
    """What the researcher asks for: size, shape, walltime, elasticity and co-funding."""

    owner: Owner
    """Budget owner the Run charges first, e.g. ``org:ai:rai:sys``."""
    resources: Resources
    locality: Locality | None = None
    runtime: Runtime | None = None
    malleable: Malleable | None = None
    funding: Funding | None = None
    spares_per_group: Count = 0
    """Spare GPUs held per group in the group's domain, swapped in when a node fails."""
    template: PodTemplate | None = None
    """Pod template for every rank. Without it a configurable hold image keeps the GPUs: a
    capacity hold, not a workload."""
    after: NameSet | None = None
    """Runs in this namespace that must Complete first; if one fails this Run fails with
    UpstreamFailed."""
    opportunistic: Flag = False
    """May run on other Runs' spare GPUs, reclaimable at any moment."""

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.malleable) || (self.resources.totalGPUs >= self.malleable.minTotalGPUs"
            " && self.resources.totalGPUs <= self.malleable.maxTotalGPUs)",
            field="resources.totalGPUs",
            message="must be within [malleable.minTotalGPUs, malleable.maxTotalGPUs]",
            ok=lambda s: s.malleable is None or _within(s.resources.total_gpus, s.malleable),
            detail=lambda s: (
                f"{s.resources.total_gpus} not in "
                f"[{s.malleable.min_total_gpus}, {s.malleable.max_total_gpus}]"
            ),
        ),
        Rule(
            cel="!has(self.malleable) || self.malleable.stepGPUs <= 0"
            " || (self.resources.totalGPUs - self.malleable.minTotalGPUs)"
            " % self.malleable.stepGPUs == 0",
            field="resources.totalGPUs",
            message="must be malleable.minTotalGPUs plus a multiple of malleable.stepGPUs",
            ok=lambda s: s.malleable is None or _aligned(s.resources.total_gpus, s.malleable),
        ),
        Rule(
            cel="!has(self.sparesPerGroup) || self.sparesPerGroup == 0 || has(self.malleable)"
            " || (has(self.locality) && has(self.locality.groupGPUs))",
            field="sparesPerGroup",
            message="needs groups: set locality.groupGPUs (or malleable)",
            ok=lambda s: (
                not s.spares_per_group
                or s.malleable is not None
                or (s.locality is not None and s.locality.group_gpus is not None)
            ),
        ),
    )


class RunPhase(StrEnum):
    PENDING = "Pending"
    RESERVED = "Reserved"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"


class Width(StatusModel):
    """Gang width in GPUs: the malleable bounds, the goal, what is held and what is awaited."""

    min: Count = 0
    max: Count = 0
    desired: Count = 0
    allocated: Count = 0
    pending: Count = 0


class SponsorFunding(StatusModel):
    """One relative or sponsor paying for part of the Run."""

    owner: Owner
    kind: Literal["family", "sponsor"]
    gpus: Count = 0
    gpu_hours: GpuHours = 0.0


class RunFunding(StatusModel):
    """Who pays for the live leases: owned (Run owner), shared (family), borrowed (sponsors)."""

    owned_gpus: Count = 0
    owned_gpu_hours: GpuHours = 0.0
    shared_gpus: Count = 0
    shared_gpu_hours: GpuHours = 0.0
    borrowed_gpus: Count = 0
    borrowed_gpu_hours: GpuHours = 0.0
    sponsors: Annotated[list[SponsorFunding], ListType("owner")] | None = None


class RunStatus(StatusModel):
    phase: RunPhase | None = None
    conditions: Conditions | None = None
    message: Message | None = None
    pending_reservation: ObjectName | None = None
    """Name of the Reservation holding this Run's place, while Reserved."""
    earliest_start: Timestamp | None = None
    """Computed ETA (see the Reservation's forecast for what it rests on)."""
    width: Width | None = None
    funding: RunFunding | None = None
    restarts: Count | None = None
    """Requeues so far, counted against runtime.maxRestarts."""
    observed_generation: Count | None = None


class Run(KubeObject):
    """A gang of GPU pods that start together or not at all, funded by Budgets."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        plural="runs",
        scope="Namespaced",
        short_names=("rn",),
        columns=(
            PrinterColumn("Owner", ".spec.owner"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("GPUs", ".spec.resources.totalGPUs", "integer"),
            PrinterColumn("Allocated", ".status.width.allocated", "integer"),
            PrinterColumn("ETA", ".status.earliestStart", description="computed earliest start"),
            PrinterColumn("Flavor", ".spec.resources.gpuType", priority=1),
            PrinterColumn("Reservation", ".status.pendingReservation", priority=1),
            PrinterColumn("Borrowed", ".status.funding.borrowedGPUs", "integer", priority=1),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
    )

    kind: Literal["Run"] = "Run"
    spec: RunSpec
    status: RunStatus | None = None

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.spec.after) || !has(self.metadata.name)"
            " || !(self.metadata.name in self.spec.after)",
            field="spec.after",
            message="must not name the Run itself",
            ok=lambda r: r.spec.after is None or r.metadata.name not in r.spec.after,
        ),
    )
