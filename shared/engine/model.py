"""Immutable value types the decision engine reasons about.

The engine never sees Kubernetes objects: services translate Nodes, Budgets, Runs, Reservations
and Leases into these plain frozen records (see ``shared.kube.translate``), so every rule can be
tested as a pure function and replayed from recorded inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

DomainKey = tuple[str, str, str]
"""(region, cluster, fabric.domain): a fast-fabric island; a group never straddles two."""

RunKey = tuple[str, str]
"""(namespace, name) of a Run."""


def run_label(key: RunKey) -> str:
    """``namespace/name``: how the API spells a Run in sets and maps."""
    return f"{key[0]}/{key[1]}"


def parse_run_label(text: str) -> RunKey:
    namespace, _, name = text.partition("/")
    return namespace, name


Selector = Mapping[str, str]
"""Topology labels that must all be equal on a node (exact string comparison)."""

DOMAIN_LABELS = ("region", "cluster", "fabric.domain")
FLAVOR_LABEL = "gpu.flavor"
RACK_LABEL = "rack"
REQUIRED_LABELS = (*DOMAIN_LABELS, FLAVOR_LABEL)
TOPOLOGY_LABELS = (*DOMAIN_LABELS, RACK_LABEL, FLAVOR_LABEL)


def selector_matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    """True when every selector entry equals the label of the same key."""
    return all(labels.get(k) == v for k, v in selector.items())


class Role(StrEnum):
    ACTIVE = "Active"
    SPARE = "Spare"
    BORROWED = "Borrowed"


class FundingKind(StrEnum):
    """How a payer relates to the Run's owner (SPEC §3 cover)."""

    OWNED = "owned"
    FAMILY = "family"
    SPONSOR = "sponsor"


class LeaseReason(StrEnum):
    """Why the Lease was opened."""

    START = "Start"
    GROW = "Grow"
    SWAP = "Swap"
    FILL = "Fill"


class Closure(StrEnum):
    COMPLETED = "Completed"
    FAIL = "Fail"
    NODE_FAILURE = "NodeFailure"
    SWAP = "Swap"
    SHRINK = "Shrink"
    DROP_SPARE = "DropSpare"
    RANDOM_PREEMPT = "RandomPreempt"
    RECLAIMED_BY_SPARE = "ReclaimedBySpare"
    TIME_LIMIT = "TimeLimit"
    CANCELED = "Canceled"


class CoverFailure(StrEnum):
    """Typed reasons cover can fail; surfaced verbatim in Run status and `kubectl runs plan`."""

    INVALID_REQUEST = "InvalidRequest"
    NO_ENVELOPE = "NoEnvelope"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"
    ACL_DENIED = "ACLDenied"
    BORROW_LIMIT = "BorrowLimit"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str
    effect: str
    """A ``TaintEffect`` value; kept as text so an effect this code does not know stays visible."""


@dataclass(frozen=True, slots=True)
class Toleration:
    """A pod's toleration; empty ``key`` with ``Exists`` tolerates every taint (of ``effect``)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""
    """Empty: every effect."""


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """A node's allocatable resources besides GPUs (millicores, bytes, pod slots)."""

    cpu: int
    memory: int
    ephemeral: int
    pods: int


@dataclass(frozen=True, slots=True)
class Requirement:
    """One node-affinity match expression (or, with ``field``, a ``matchFields`` entry)."""

    key: str
    operator: str
    """In, NotIn, Exists, DoesNotExist, Gt, Lt."""
    values: tuple[str, ...] = ()
    field: bool = False
    """A ``matchFields`` requirement: ``key`` is ``metadata.name``, matched on the node name."""


@dataclass(frozen=True, slots=True)
class PodNeeds:
    """What one rank's pod asks of its node besides GPUs, from the Run's ``spec.template``.

    ``cpu`` in millicores, ``memory``/``ephemeral`` in bytes, counted as Kubernetes counts a pod
    (``shared.engine.capacity.pod_requests``); ``affinity`` is the required node affinity: any
    term matches when all its requirements do (no terms: no constraint).
    """

    cpu: int = 0
    memory: int = 0
    ephemeral: int = 0
    tolerations: tuple[Toleration, ...] = ()
    node_selector: Selector = field(default_factory=dict)
    affinity: tuple[tuple[Requirement, ...], ...] = ()


NO_NEEDS = PodNeeds()


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    flavor: str
    domain: DomainKey
    labels: Mapping[str, str]
    gpus: int
    ready: bool = True
    cordoned: bool = False
    capacity: NodeCapacity | None = None
    """Allocatable CPU, memory, ephemeral storage and pods; ``None`` only for engine-built
    nodes that declare GPUs alone (every node read from the API server has one)."""
    taints: tuple[Taint, ...] = ()

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.cordoned


@dataclass(frozen=True, slots=True)
class Lending:
    allow: bool = False
    to: tuple[str, ...] = ()
    max_concurrency: int | None = None
    max_gpu_hours: float | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    budget: str
    owner: str
    name: str
    flavor: str
    selector: Selector
    concurrency: int
    max_gpu_hours: float | None = None
    start: datetime | None = None
    end: datetime | None = None
    reservations_before_start: bool = False
    admission_before_start: bool = False
    lending: Lending = field(default_factory=Lending)

    @property
    def key(self) -> str:
        """Cluster-unique id: Budget object name and envelope name."""
        return f"{self.budget}/{self.name}"


@dataclass(frozen=True, slots=True)
class AggregateCap:
    budget: str
    name: str
    flavor: str
    envelopes: tuple[str, ...]
    """Envelope keys (``budget/name``) the cap bounds together."""
    max_concurrency: int | None = None
    max_gpu_hours: float | None = None

    @property
    def key(self) -> str:
        return f"{self.budget}/{self.name}"


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    owner: str
    parents: tuple[str, ...]
    envelopes: tuple[Envelope, ...]
    caps: tuple[AggregateCap, ...] = ()


@dataclass(frozen=True, slots=True)
class Malleable:
    min_gpus: int
    max_gpus: int
    step_gpus: int
    desired_gpus: int


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What a Run asks for, as the engine needs it."""

    key: RunKey
    uid: str
    owner: str
    flavor: str
    total_gpus: int
    group_gpus: int | None = None
    allow_cross_group_spread: bool = True
    selector: Selector = field(default_factory=dict)
    spares_per_group: int = 0
    malleable: Malleable | None = None
    allow_borrow: bool = False
    max_borrow_gpus: int | None = None
    sponsors: tuple[str, ...] = ()
    max_duration: timedelta | None = None
    checkpoint: timedelta | None = None
    max_restarts: int = 0
    opportunistic: bool = False
    pod: PodNeeds = NO_NEEDS
    """What each rank's pod needs of its node besides GPUs (requests, tolerations, selectors)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """One open or closed ledger entry: GPUs of one rank on one node, paid by one envelope."""

    name: str
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
    start: datetime
    reason: LeaseReason = LeaseReason.START
    end: datetime | None = None
    closure: str | None = None
    expected_end: datetime | None = None
    """start + the Run's maxDuration when it has one: what the forecast replays."""

    @property
    def open(self) -> bool:
        return self.end is None


@dataclass(frozen=True, slots=True)
class ReservationClaim:
    """Capacity promised to a pending Reservation, protected from backfill."""

    name: str
    run: RunKey
    earliest_start: datetime
    nodes: tuple[str, ...]
    gpus: int
    envelope: str | None = None
    duration: timedelta | None = None
    """The claimant's walltime (maxDuration): the claim holds its GPUs from ``earliest_start``
    for this long; ``None`` holds them open-ended (the claimant has no walltime)."""
    owner: str | None = None
    """The claimant's owner: whose history predicts how much of that walltime it will use."""

    @property
    def end(self) -> datetime | None:
        """When the claimant's walltime would be over if it started at ``earliest_start``."""
        return None if self.duration is None else self.earliest_start + self.duration
