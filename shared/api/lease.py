"""Lease: one immutable ledger entry for GPUs held on behalf of a Run (cluster-scoped).

All usage, chargeback and audits are derived from Leases, so they must be trustworthy after the
fact: the spec never changes, the status only moves from open to closed, and a closed Lease never
reopens. Leases outlive their Run and namespace (cluster-scoped, no owner reference) and carry
labels so audits are label queries. The kind collides with ``coordination.k8s.io/Lease``: use
``kubectl get leases.rq.davidlangworthy.io`` or the short names ``gpulease`` / ``gl``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints

from shared.api.base import GROUP, CrdInfo, KubeObject, PrinterColumn, SpecModel, StatusModel
from shared.api.common import (
    IMMUTABLE_SPEC,
    DnsLabel,
    Flag,
    Gpus,
    ObjectName,
    Owner,
    RunRef,
    Timestamp,
)
from shared.api.rules import ListType, Rule
from shared.engine.model import Closure, Role
from shared.engine.model import LeaseReason as LeaseReason
from shared.engine.resolver import random_preempt_closure

# The ledger vocabulary is the engine's: one definition, used by the API and every rule.
LeaseRole = Role
ClosureReason = Closure


_PLAIN_CLOSURES = "|".join(c.value for c in ClosureReason if c is not ClosureReason.RANDOM_PREEMPT)
CLOSURE_REASON_PATTERN = rf"^({_PLAIN_CLOSURES}|RandomPreempt\([0-9A-Za-z]{{1,128}}\))$"


random_preempt = random_preempt_closure
"""The closure reason of a lease ended by the lottery: names the published seed."""


class LeaseRunRef(RunRef):
    """The Run served, with its namespace."""

    namespace: DnsLabel
    """Required: the Lease is cluster-scoped and outlives the namespace."""


class LeaseSlice(SpecModel):
    """The GPUs held: how many, on which nodes, in which role."""

    nodes: Annotated[list[ObjectName], ListType(), Field(min_length=1, max_length=64)]
    """Nodes the GPUs sit on (normally one: one Lease per rank)."""
    gpus: Gpus
    """GPUs held."""
    role: LeaseRole
    """Active (a rank), Spare (held for swaps) or Borrowed (opportunistic use of a spare)."""


class Interval(SpecModel):
    """When the Lease opened."""

    start: Timestamp
    """When the Lease opened; its end is ``status.endTime``."""


class LeaseSpec(SpecModel):
    """Who held which GPUs, why, from when, and who paid. Never changes."""

    owner: Owner
    """Owner of the Run the GPUs serve."""
    run_ref: LeaseRunRef
    comp_path: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=63)]],
            Field(max_length=16),
        ]
        | None
    ) = None
    """Position in the Run's composition, outermost first, e.g. ``["SHARD[1]", "D"]``."""
    slice: LeaseSlice
    interval: Interval
    paid_by_envelope: DnsLabel
    """The one envelope paying for this Lease; its selector matches the Lease's nodes."""
    paid_by_budget: ObjectName
    """Budget object holding that envelope."""
    paid_by_owner: Owner
    """Owner of that Budget (differs from ``owner`` when family or a sponsor pays)."""
    reason: LeaseReason

    invariants: ClassVar[tuple[Rule, ...]] = (IMMUTABLE_SPEC,)


class LeaseStatus(StatusModel):
    """Append-only: set once when the Lease closes."""

    closed: Flag = False
    end_time: Timestamp | None = None
    closure_reason: (
        Annotated[str, StringConstraints(pattern=CLOSURE_REASON_PATTERN, max_length=160)] | None
    ) = None
    """Completed, Fail, NodeFailure, Swap, Shrink, DropSpare, RandomPreempt(<seed>),
    ReclaimedBySpare, TimeLimit or Canceled."""

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.closed) || !self.closed"
            " || (has(self.endTime) && has(self.closureReason))",
            field="closed",
            message="requires endTime and closureReason",
            ok=lambda s: not s.closed or (s.end_time is not None and s.closure_reason is not None),
        ),
        Rule(
            cel="!has(self.endTime) || (has(self.closed) && self.closed)",
            field="endTime",
            message="may only be set when closed is true",
            ok=lambda s: s.end_time is None or s.closed,
        ),
        Rule(
            cel="!has(self.closureReason) || (has(self.closed) && self.closed)",
            field="closureReason",
            message="may only be set when closed is true",
            ok=lambda s: s.closure_reason is None or s.closed,
        ),
    )


def _once_set(field: str) -> Rule:
    """Transition rule: a status field, once set, keeps its value (and cannot be removed)."""
    return Rule(
        cel=f"!has(oldSelf.status) || !has(oldSelf.status.{field})"
        f" || (has(self.status) && has(self.status.{field})"
        f" && self.status.{field} == oldSelf.status.{field})",
        field=f"status.{field}",
        message="is immutable once set",
    )


class Lease(KubeObject):
    """Immutable ledger entry: GPUs on nodes held for a Run, paid by exactly one envelope."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        plural="leases",
        scope="Cluster",
        short_names=("gpulease", "gl"),
        columns=(
            PrinterColumn("Owner", ".spec.owner"),
            PrinterColumn("Run", ".spec.runRef.name"),
            PrinterColumn("Role", ".spec.slice.role"),
            PrinterColumn("GPUs", ".spec.slice.gpus", "integer"),
            PrinterColumn("Envelope", ".spec.paidByEnvelope"),
            PrinterColumn("Closed", ".status.closed", "boolean"),
            PrinterColumn("Closure", ".status.closureReason"),
            PrinterColumn("Namespace", ".spec.runRef.namespace", priority=1),
            PrinterColumn("Nodes", ".spec.slice.nodes", priority=1),
            PrinterColumn("Payer", ".spec.paidByOwner", priority=1),
            PrinterColumn("Reason", ".spec.reason", priority=1),
            PrinterColumn("Start", ".spec.interval.start", "date", priority=1),
            PrinterColumn("End", ".status.endTime", "date", priority=1),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
    )

    kind: Literal["Lease"] = "Lease"
    spec: LeaseSpec
    status: LeaseStatus | None = None

    invariants: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.status) || !has(self.status.endTime)"
            " || self.status.endTime >= self.spec.interval.start",
            field="status.endTime",
            message="must not be before spec.interval.start",
            ok=lambda g: (
                g.status is None
                or g.status.end_time is None
                or g.status.end_time >= g.spec.interval.start
            ),
        ),
        Rule(
            cel="!has(oldSelf.status) || !has(oldSelf.status.closed) || !oldSelf.status.closed"
            " || (has(self.status) && has(self.status.closed) && self.status.closed)",
            field="status.closed",
            message="cannot change from true to false: a closed Lease never reopens",
        ),
        _once_set("endTime"),
        _once_set("closureReason"),
    )


LABEL_RUN = f"{GROUP}/run"
LABEL_NAMESPACE = f"{GROUP}/namespace"
LABEL_OWNER = f"{GROUP}/owner"
LABEL_ENVELOPE = f"{GROUP}/envelope"
LABEL_BUDGET = f"{GROUP}/budget"
LABEL_NODE = f"{GROUP}/node"
LABEL_ROLE = f"{GROUP}/role"
_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def label_value(text: str) -> str:
    """A valid label value for ``text``: owner ``:`` becomes ``.``; over-long values keep a
    prefix plus a hash so distinct inputs stay distinct and queryable."""
    value = _LABEL_SAFE.sub("-", text.replace(":", "."))
    if len(value) > 63:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        value = f"{value[:52]}-{digest}"
    return value.strip("-_.") or "x"


def lease_labels(spec: LeaseSpec) -> dict[str, str]:
    """Labels that make audits label queries (node only for single-node slices)."""
    labels = {
        LABEL_RUN: spec.run_ref.name,
        LABEL_NAMESPACE: spec.run_ref.namespace,
        LABEL_OWNER: spec.owner,
        LABEL_ENVELOPE: spec.paid_by_envelope,
        LABEL_BUDGET: spec.paid_by_budget,
        LABEL_ROLE: spec.slice.role.value,
    }
    if len(spec.slice.nodes) == 1:
        labels[LABEL_NODE] = spec.slice.nodes[0]
    return {key: label_value(value) for key, value in labels.items()}
