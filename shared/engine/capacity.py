"""May a rank's pod go on a node? The resource, taint and selector rules a kubelet enforces.

Jobtree binds ranks with ``nodeName``, which skips kube-scheduler, so the checks the kubelet makes
at admission (SPEC §1) are made here instead, once, for pack, the binder's re-check and
``kubectl runs plan``:

* a pod counts as Kubernetes counts it: per resource, the larger of the sum of its containers
  (sidecars included) and its largest init step, plus the pod overhead (:func:`pod_requests`);
* a node's ``Load`` is what the other pods bound to it request: CPU, memory, ephemeral storage and
  one pod slot for every non-terminal pod, GPUs only for pods Jobtree did not create (a Jobtree
  pod's GPUs are its Lease's, already counted by the topology);
* a rank fits when its pod's requests fit the node's allocatable minus that load, every
  ``NoSchedule``/``NoExecute`` taint is tolerated and the template's ``nodeSelector`` and required
  node affinity match; an untolerated ``PreferNoSchedule`` taint only makes the node a last choice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from enum import StrEnum
from types import MappingProxyType

from shared.engine.model import (
    Node,
    NodeCapacity,
    PodNeeds,
    Requirement,
    Taint,
    TaintEffect,
    Toleration,
)

# ---------------------------------------------------------------------------- quantities

_QUANTITY = re.compile(r"^([+-]?[0-9]+(?:\.[0-9]*)?|[+-]?\.[0-9]+)([a-zA-Z]*)$")
_SUFFIX: Mapping[str, Decimal] = MappingProxyType(
    {
        "": Decimal(1),
        "n": Decimal("1e-9"),
        "u": Decimal("1e-6"),
        "m": Decimal("0.001"),
        "k": Decimal(10) ** 3,
        "M": Decimal(10) ** 6,
        "G": Decimal(10) ** 9,
        "T": Decimal(10) ** 12,
        "P": Decimal(10) ** 15,
        "E": Decimal(10) ** 18,
        "Ki": Decimal(2) ** 10,
        "Mi": Decimal(2) ** 20,
        "Gi": Decimal(2) ** 30,
        "Ti": Decimal(2) ** 40,
        "Pi": Decimal(2) ** 50,
        "Ei": Decimal(2) ** 60,
    }
)
_BINARY = (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))


def parse_quantity(value: object) -> Decimal | None:
    """A Kubernetes quantity (``"8"``, ``"500m"``, ``"64Gi"``) as a number; None if malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    match = _QUANTITY.match(value.strip())
    if match is None or match.group(2) not in _SUFFIX:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        return None


def parse_gpu_quantity(value: str | None) -> int:
    """Whole GPUs in a Kubernetes quantity string; anything unparsable or negative counts as 0.

    Extended resources are integers in practice ("8"), but the API allows any quantity form, and a
    malformed node must never crash the packer.
    """
    amount = parse_quantity(value)
    return 0 if amount is None else max(0, int(amount))


def whole(amount: Decimal, scale: int = 1) -> int:
    """``amount × scale`` rounded up (Kubernetes rounds requests up to its smallest unit)."""
    return int((amount * scale).to_integral_value(rounding=ROUND_CEILING))


def format_bytes(amount: int) -> str:
    """Bytes in the largest binary unit that states them exactly (``549755813888`` → 512Gi)."""
    for suffix, unit in _BINARY:
        if amount and amount % unit == 0:
            return f"{amount // unit}{suffix}"
    return str(amount)


def format_cpu(millis: int) -> str:
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


# ---------------------------------------------------------------------------- pod requests

Use = tuple[int, int, int, int]
"""(GPUs, CPU millicores, memory bytes, ephemeral-storage bytes) one container or pod requests."""

NO_USE: Use = (0, 0, 0, 0)


def _plus(a: Use, b: Use) -> Use:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


def _max(a: Use, b: Use) -> Use:
    return (max(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def pod_requests(
    containers: Iterable[Use], init: Iterable[tuple[Use, bool]] = (), overhead: Use = NO_USE
) -> Use:
    """What a pod takes from its node, per resource, as the kubelet and scheduler count it.

    Regular containers run together: their requests add up. Init containers run one at a time
    before them; a restartable one (``restartPolicy: Always``, a sidecar) keeps running, so it
    adds to every later step and to the regular containers. The pod needs the larger of the two
    phases, plus the runtime's overhead. ``init`` is (requests, restartable) in spec order.
    """
    total = NO_USE
    for use in containers:
        total = _plus(total, use)
    sidecars = NO_USE
    steps = NO_USE
    for use, restartable in init:
        if restartable:
            total = _plus(total, use)
            sidecars = _plus(sidecars, use)
            steps = _max(steps, sidecars)
        else:
            steps = _max(steps, _plus(use, sidecars))
    return _plus(_max(total, steps), overhead)


# ---------------------------------------------------------------------------- node load


@dataclass(frozen=True, slots=True)
class Load:
    """What the pods bound to a node request of it (GPUs: only pods Jobtree did not create)."""

    gpus: int = 0
    cpu: int = 0
    memory: int = 0
    ephemeral: int = 0
    pods: int = 0


NO_LOAD = Load()

PodUse = tuple[int, int, int, int]
"""One pod's counted (GPUs, CPU, memory, ephemeral): GPUs are 0 for Jobtree's own pods."""


def load_of(uses: Iterable[PodUse]) -> Load:
    """A node's load from the counted requests of its non-terminal pods."""
    gpus = cpu = memory = ephemeral = pods = 0
    for g, c, m, e in uses:
        gpus += g
        cpu += c
        memory += m
        ephemeral += e
        pods += 1
    return Load(gpus, cpu, memory, ephemeral, pods) if pods else NO_LOAD


# ---------------------------------------------------------------------------- taints


_BLOCKING = (TaintEffect.NO_SCHEDULE.value, TaintEffect.NO_EXECUTE.value)


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """The Kubernetes toleration match: effect (empty = any), key (empty + Exists = any), value."""
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.operator == "Exists":
        return not toleration.key or toleration.key == taint.key
    return toleration.key == taint.key and toleration.value == taint.value


def untolerated(
    taints: Iterable[Taint], tolerations: Sequence[Toleration], effects: Sequence[str] = _BLOCKING
) -> tuple[Taint, ...]:
    """The node's taints of ``effects`` that no toleration matches."""
    return tuple(
        t
        for t in taints
        if t.effect in effects and not any(tolerates(tol, t) for tol in tolerations)
    )


def disfavoured(node: Node, needs: PodNeeds) -> bool:
    """An untolerated ``PreferNoSchedule`` taint: the node is used only after the others."""
    return bool(
        node.taints
        and untolerated(node.taints, needs.tolerations, (TaintEffect.PREFER_NO_SCHEDULE.value,))
    )


# ---------------------------------------------------------------------------- selectors


def _requirement_ok(node: Node, req: Requirement) -> bool:
    if req.field:
        value = node.name if req.key == "metadata.name" else None
    else:
        value = node.labels.get(req.key)
    present = value is not None
    op = req.operator
    if op == "In":
        return present and value in req.values
    if op == "NotIn":
        return not present or value not in req.values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and value is not None and len(req.values) == 1:
        try:
            have, bound = int(value), int(req.values[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False


def selected(node: Node, needs: PodNeeds) -> bool:
    """``nodeSelector`` and required node affinity (any term whose requirements all hold)."""
    labels = node.labels
    if needs.node_selector and any(labels.get(k) != v for k, v in needs.node_selector.items()):
        return False
    if not needs.affinity:
        return True
    return any(all(_requirement_ok(node, r) for r in term) for term in needs.affinity)


# ---------------------------------------------------------------------------- fit


class Exclusion(StrEnum):
    """Why a node takes no rank of a Run; the words ``kubectl runs plan`` shows."""

    NOT_READY = "not Ready"
    CORDONED = "cordoned"
    TAINTED = "tainted"
    NOT_SELECTED = "not selected by the template"
    GPUS_HELD = "GPUs held by other pods"
    CPU = "too little CPU"
    MEMORY = "too little memory"
    EPHEMERAL = "too little ephemeral storage"
    PODS = "no pod slots left"


UNLIMITED = 1 << 30
"""Rank pods a node without declared capacity can take: GPUs alone bound it."""


def slots(capacity: NodeCapacity | None, load: Load, needs: PodNeeds) -> int:
    """How many more rank pods fit the node's allocatable minus its load (GPUs aside)."""
    if capacity is None:
        return UNLIMITED
    room = capacity.pods - load.pods
    for have, used, want in (
        (capacity.cpu, load.cpu, needs.cpu),
        (capacity.memory, load.memory, needs.memory),
        (capacity.ephemeral, load.ephemeral, needs.ephemeral),
    ):
        if want > 0:
            room = min(room, (have - used) // want)
    return max(0, room)


def short_resource(capacity: NodeCapacity | None, load: Load, needs: PodNeeds) -> Exclusion | None:
    """The first resource that keeps one more rank pod off the node, or None."""
    if capacity is None:
        return None
    if capacity.pods - load.pods < 1:
        return Exclusion.PODS
    for have, used, want, why in (
        (capacity.cpu, load.cpu, needs.cpu, Exclusion.CPU),
        (capacity.memory, load.memory, needs.memory, Exclusion.MEMORY),
        (capacity.ephemeral, load.ephemeral, needs.ephemeral, Exclusion.EPHEMERAL),
    ):
        if want > have - used:
            return why
    return None


def exclusion(node: Node, load: Load, needs: PodNeeds) -> Exclusion | None:
    """Why the node can take no rank pod of a Run with these needs (GPUs aside), or None."""
    if not node.ready:
        return Exclusion.NOT_READY
    if node.cordoned:
        return Exclusion.CORDONED
    if node.taints and untolerated(node.taints, needs.tolerations):
        return Exclusion.TAINTED
    if not selected(node, needs):
        return Exclusion.NOT_SELECTED
    return short_resource(node.capacity, load, needs)


RESOURCES_DO_NOT_FIT = "ResourcesDoNotFit"


def never_fits(needs: PodNeeds, flavor: str, nodes: Iterable[Node]) -> str | None:
    """Typed refusal when no node of the flavor could hold one rank even empty, else None.

    Judged on allocatable alone (taints and other pods come and go); with no node of the flavor
    (or none declaring capacity) there is nothing to judge and the answer is None.
    """
    largest: NodeCapacity | None = None
    for node in nodes:
        cap = node.capacity
        if cap is None:
            return None
        if largest is None:
            largest = cap
        else:
            largest = NodeCapacity(
                max(largest.cpu, cap.cpu),
                max(largest.memory, cap.memory),
                max(largest.ephemeral, cap.ephemeral),
                max(largest.pods, cap.pods),
            )
    if largest is None:
        return None
    for name, want, have, shown in (
        ("cpu", needs.cpu, largest.cpu, format_cpu),
        ("memory", needs.memory, largest.memory, format_bytes),
        ("ephemeral-storage", needs.ephemeral, largest.ephemeral, format_bytes),
    ):
        if want > have:
            return (
                f"{RESOURCES_DO_NOT_FIT}: {name} {shown(want)} per rank exceeds every {flavor} "
                f"node (largest {shown(have)})"
            )
    if largest.pods < 1:
        return f"{RESOURCES_DO_NOT_FIT}: no {flavor} node accepts pods (allocatable pods 0)"
    return None
