"""Field types and small objects shared by several kinds.

Each constrained string is defined once here so the pydantic models and the generated CRDs agree
on patterns and length limits. Length limits are not decoration: the API server estimates the cost
of every CEL rule from them and refuses CRDs whose rules could be too expensive.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, Strict, StrictBool, StringConstraints

from shared.api.base import SpecModel, StatusModel
from shared.api.rules import ListType, Rule

DOMAIN_LABELS = ("region", "cluster", "fabric.domain")
"""Node labels whose values form a fast-fabric domain; groups never straddle two."""
TOPOLOGY_LABELS = (*DOMAIN_LABELS, "rack", "gpu.flavor")
"""Every label a location selector may name (SPEC §1)."""

OWNER_PATTERN = r"^[a-z0-9-]+(:[a-z0-9-]+)*$"
OWNER_GLOB_PATTERN = r"^[a-z0-9*?-]+(:[a-z0-9*?-]+)*$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
NAMESPACED_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DURATION_PATTERN = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
"""``90s``, ``30m``, ``4h``, ``1h30m``, ``2d``; the two-character minimum forces one unit."""
CONDITION_TYPE_PATTERN = r"^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

Owner = Annotated[str, StringConstraints(pattern=OWNER_PATTERN, max_length=253)]
"""Colon-separated owner path, e.g. ``org:ai:rai:sys``; parent = path minus its last segment."""
OwnerGlob = Annotated[str, StringConstraints(pattern=OWNER_GLOB_PATTERN, max_length=253)]
"""Shell-style glob over owners (``*`` matches any run of characters, ``:`` included)."""
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
ObjectName = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
LabelValue = Annotated[
    str, StringConstraints(pattern=LABEL_VALUE_PATTERN, min_length=1, max_length=63)
]
Flavor = LabelValue
"""GPU flavor: the value of the node label ``gpu.flavor``, e.g. ``H100-80GB``."""
NamespacedName = Annotated[str, StringConstraints(pattern=NAMESPACED_NAME_PATTERN, max_length=317)]
"""``<namespace>/<name>`` of a Run."""
Timestamp = AwareDatetime
"""RFC 3339 instant with an explicit offset (``2026-01-05T00:00:00Z``)."""
Reason = Annotated[str, StringConstraints(pattern=REASON_PATTERN, max_length=1024)]
Message = Annotated[str, StringConstraints(max_length=32768)]
# Strict numbers and flags: the API server rejects "8" for an integer, so the models must too.
Int = Annotated[int, Strict()]
Gpus = Annotated[Int, Field(ge=1)]
Count = Annotated[Int, Field(ge=0)]
GpuHours = Annotated[float, Strict(), Field(ge=0)]
Flag = StrictBool

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(DURATION_PATTERN)
_COMPONENT_RE = re.compile(r"([0-9]+)([dhms])")


def parse_duration(text: str) -> timedelta:
    """``1h30m`` -> ``timedelta(hours=1, minutes=30)``; ValueError for anything else."""
    if len(text) < 2 or not _DURATION_RE.fullmatch(text):
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 4h, 1h30m, 2d")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _COMPONENT_RE.findall(text))
    return timedelta(seconds=seconds)


Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, min_length=2, max_length=32)]
"""A duration such as ``30m``, ``4h``, ``1h30m`` or ``90s`` (units d, h, m, s)."""
PositiveDuration = Annotated[
    Duration,
    Rule(
        cel="!self.matches('^[0dhms]+$')",
        message="must be a positive duration",
        ok=lambda s: parse_duration(s) > timedelta(0),
    ),
]

IMMUTABLE_SPEC = Rule(cel="self == oldSelf", message="spec is immutable")
"""Transition rule of the ledger-like kinds (Reservation, Lease): a changed plan is a new object."""

_KEYS_CEL = "self.all(k, k in [{}])"


def _keys_rule(allowed: tuple[str, ...], message: str) -> Rule:
    """Map keys restricted to ``allowed`` (a pattern cannot constrain map keys)."""
    return Rule(
        cel=_KEYS_CEL.format(", ".join(f"'{k}'" for k in allowed)),
        message=message,
        ok=lambda m: set(m) <= set(allowed),
        detail=lambda m: "got " + ", ".join(sorted(set(m) - set(allowed))),
    )


Selector = Annotated[
    dict[str, LabelValue],
    Field(min_length=1, max_length=len(TOPOLOGY_LABELS)),
    _keys_rule(TOPOLOGY_LABELS, "keys must be topology labels: " + ", ".join(TOPOLOGY_LABELS)),
]
"""Topology labels a node must carry with exactly these values (≥1 entry)."""
Domain = Annotated[
    dict[str, LabelValue],
    Field(min_length=len(DOMAIN_LABELS), max_length=len(DOMAIN_LABELS)),
    _keys_rule(DOMAIN_LABELS, "keys must be exactly " + ", ".join(DOMAIN_LABELS)),
]
"""A fast-fabric domain: values for region, cluster and fabric.domain."""
OwnerSet = Annotated[list[Owner], ListType(), Field(max_length=32)]
NameSet = Annotated[list[ObjectName], ListType(), Field(max_length=64)]


class RunRef(SpecModel):
    """Names the Run an object belongs to."""

    name: ObjectName
    """Run name."""
    namespace: DnsLabel | None = None
    """Defaults to the referring object's namespace."""


class Condition(StatusModel):
    """Standard Kubernetes condition, so generic tooling (``kubectl wait``) understands it."""

    type: Annotated[str, StringConstraints(pattern=CONDITION_TYPE_PATTERN, max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Reason | None = None
    message: Message | None = None
    last_transition_time: Timestamp | None = None
    observed_generation: Count | None = None


Conditions = Annotated[list[Condition], ListType("type"), Field(max_length=32)]
