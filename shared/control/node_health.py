"""Which nodes under open leases have failed (SPEC §1: NotReady past a grace, or deleted).

The packer announces each failure once as ``NODE_FAILED``; the resolver then swaps, shrinks or
requeues. A failure *episode* starts when a leased node is deleted or its Ready condition has
been False/Unknown for at least the grace period, and ends when the node is Ready again or no
open lease is left on it; one episode is reported exactly once. Cordoning is not a failure: a
cordoned node keeps its work.

Pure: the caller passes what it observed and ``now``; the returned :class:`HealthState` is the
memory to pass back next time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from shared.engine.state import Settings

NODE_DELETED = "NodeDeleted"
NOT_READY = "NotReady"
DEFAULT_GRACE = Settings().node_grace


@dataclass(frozen=True, slots=True)
class NodeCondition:
    """A node's readiness as observed: Ready true or not, and since when if the node says."""

    name: str
    ready: bool
    since: datetime | None = None
    """``lastTransitionTime`` of the Ready condition; None when it is absent."""


@dataclass(frozen=True, slots=True)
class NodeFailure:
    """One failure episode to announce."""

    node: str
    reason: str
    """``NodeDeleted`` or ``NotReady``."""
    since: datetime
    """When the node was deleted (first seen gone) or stopped being Ready."""


def node_condition(obj: Mapping[str, Any]) -> NodeCondition:
    """Readiness of a Node object: its Ready condition (absent or not True → not ready).

    ``spec.unschedulable`` (cordon) is deliberately not read: a cordoned node keeps its work.
    """
    name = str((obj.get("metadata") or {}).get("name") or "")
    ready, since = False, None
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if not isinstance(cond, Mapping) or cond.get("type") != "Ready":
            continue
        ready = cond.get("status") == "True"
        text = cond.get("lastTransitionTime")
        if isinstance(text, str):
            try:
                at = datetime.fromisoformat(text)
            except ValueError:
                at = None
            since = at if at is None or at.tzinfo is not None else at.replace(tzinfo=UTC)
    return NodeCondition(name, ready, since)


def has_failed(
    node: NodeCondition | None,
    now: datetime,
    grace: timedelta = DEFAULT_GRACE,
    first_seen: datetime | None = None,
) -> bool:
    """The failure rule for one node: deleted (``None``), or not Ready for at least ``grace``,
    counted from its Ready condition's last transition, else from ``first_seen``.

    The packer announces failures with it and the resolver and the binder re-check a claimed
    failure with it, so a forged ``NODE_FAILED`` for a healthy node changes nothing.
    """
    if node is None:
        return True
    if node.ready:
        return False
    since = node.since if node.since is not None else first_seen
    return since is not None and now - since >= grace


def _no_times() -> Mapping[str, datetime]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HealthState:
    """Memory between evaluations: episodes already reported, when trouble was first seen."""

    reported: frozenset[str] = frozenset()
    first_seen: Mapping[str, datetime] = field(default_factory=_no_times)
    """Node → when it was first observed deleted or NotReady (fallback for a missing
    ``lastTransitionTime``)."""


def evaluate(
    nodes: Mapping[str, NodeCondition],
    leased: Collection[str],
    state: HealthState,
    now: datetime,
    grace: timedelta = DEFAULT_GRACE,
) -> tuple[tuple[NodeFailure, ...], HealthState]:
    """New failures among ``leased`` nodes (those holding open leases) and the next state.

    ``nodes`` holds the nodes that still exist (at least the leased ones; others are not read).
    A deleted node fails at once: its pods are gone with it. A NotReady node fails once it has
    been NotReady for ``grace``, counted from its Ready condition's last transition, or from
    when it was first seen NotReady.
    """
    failures: list[NodeFailure] = []
    reported = set(state.reported)
    first_seen: dict[str, datetime] = {}
    for name in sorted(leased):
        node = nodes.get(name)
        if node is not None and node.ready:
            reported.discard(name)
            continue
        seen = state.first_seen.get(name, now)
        first_seen[name] = seen
        if not has_failed(node, now, grace, seen):
            continue
        if node is None:
            failure = NodeFailure(name, NODE_DELETED, seen)
        else:
            failure = NodeFailure(name, NOT_READY, node.since or seen)
        if name not in reported:
            reported.add(name)
            failures.append(failure)
    # An episode also ends when no open lease is left on the node.
    reported &= set(leased)
    return tuple(failures), HealthState(frozenset(reported), MappingProxyType(first_seen))


def next_due(
    nodes: Mapping[str, NodeCondition],
    leased: Collection[str],
    state: HealthState,
    now: datetime,
    grace: timedelta = DEFAULT_GRACE,
) -> datetime | None:
    """The earliest instant a leased NotReady node not yet reported crosses the grace."""
    due: datetime | None = None
    for name in leased:
        node = nodes.get(name)
        if node is None or node.ready or name in state.reported:
            continue
        since = node.since if node.since is not None else state.first_seen.get(name, now)
        at = since + grace
        if due is None or at < due:
            due = at
    return due
