"""Budget status: headroom and usage per envelope and aggregate cap, from the Lease ledger only.

SPEC §3 Accounting: budget figures are derived from Leases and equal a replay of the ledger at
any time, so this module only reads an engine ``Usage`` snapshot (``shared.engine.accounting``)
and lays it out in the ``BudgetStatus`` shape (camelCase, ready for server-side apply) plus the
rows of the budget metrics. Rules:

* envelope headroom = ``accounting.headroom`` (concurrency never negative; GPU-hours absent when
  the envelope has no ``maxGPUHours``; a closed window has none left); ``active`` says whether
  now is inside the window;
* usage is split into the exclusive classes owned / shared / borrowed-out / spare (they sum to
  the envelope's total);
* an aggregate cap's headroom is ``accounting.cap_headroom``; a cap without ``maxConcurrency``
  reports the sum of its envelopes' concurrency headroom (the cap itself admits anything);
* GPU-hours are rounded to microhour precision so an unchanged ledger gives an identical status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.engine.accounting import (
    Meter,
    Usage,
    UsageClass,
    cap_headroom,
    headroom,
)
from shared.engine.model import Budget

_DIGITS = 6
CLASS_LABELS: Mapping[UsageClass, str] = {
    UsageClass.OWNED: "owned",
    UsageClass.SHARED: "shared",
    UsageClass.BORROWED_OUT: "borrowed",
    UsageClass.SPARE: "spare",
}
"""Metric ``class`` label of each usage class (``jobtree_budgets_concurrency_gpus``)."""
_STATUS_KEYS: Mapping[UsageClass, str] = {
    UsageClass.OWNED: "owned",
    UsageClass.SHARED: "shared",
    UsageClass.BORROWED_OUT: "borrowedOut",
    UsageClass.SPARE: "spare",
}


def _hours(value: float) -> float:
    return round(max(0.0, value), _DIGITS)


def _usage(meter: Meter) -> dict[str, Any]:
    return {"gpus": max(0, meter.gpus), "gpuHours": _hours(meter.gpu_hours)}


def _stamp(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class EnvelopeFigures:
    """One envelope's numbers: what the status shows and the metrics export."""

    budget: str
    owner: str
    envelope: str
    flavor: str
    active: bool
    headroom_gpus: int
    headroom_gpu_hours: float | None
    concurrency_by_class: Mapping[str, int]
    """GPUs held now per metric class (owned, shared, borrowed, spare)."""


def envelope_figures(budget: Budget, usage: Usage, now: datetime) -> tuple[EnvelopeFigures, ...]:
    """Headroom and per-class concurrency of every envelope, in spec order."""
    out = []
    for env in budget.envelopes:
        room = headroom(env, usage, now)
        used = usage.envelope(env.key)
        out.append(
            EnvelopeFigures(
                budget=budget.name,
                owner=budget.owner,
                envelope=env.name,
                flavor=env.flavor,
                active=room.window_open,
                headroom_gpus=room.concurrency_gpus or 0,
                headroom_gpu_hours=None if room.gpu_hours is None else _hours(room.gpu_hours),
                concurrency_by_class={
                    label: max(0, used.by_class(cls).gpus) for cls, label in CLASS_LABELS.items()
                },
            )
        )
    return tuple(out)


def budget_status(
    budget: Budget, usage: Usage, *, now: datetime, generation: int | None
) -> dict[str, Any]:
    """The Budget ``status`` admission applies (camelCase, no ``conditions``)."""
    envelopes: list[dict[str, Any]] = []
    room_by_key: dict[str, int] = {}
    for env, fig in zip(budget.envelopes, envelope_figures(budget, usage, now), strict=True):
        room_by_key[env.key] = fig.headroom_gpus
        used = usage.envelope(env.key)
        head: dict[str, Any] = {"concurrency": fig.headroom_gpus}
        if fig.headroom_gpu_hours is not None:
            head["gpuHours"] = fig.headroom_gpu_hours
        envelopes.append(
            {
                "name": env.name,
                "flavor": env.flavor,
                "active": fig.active,
                "headroom": head,
                "usage": {key: _usage(used.by_class(cls)) for cls, key in _STATUS_KEYS.items()},
            }
        )
    caps: list[dict[str, Any]] = []
    for cap in budget.caps:
        room = cap_headroom(cap, usage)
        conc = room.concurrency_gpus
        if conc is None:
            conc = sum(room_by_key.get(key, 0) for key in dict.fromkeys(cap.envelopes))
        cap_head: dict[str, Any] = {"concurrency": conc}
        if room.gpu_hours is not None:
            cap_head["gpuHours"] = _hours(room.gpu_hours)
        caps.append({"name": cap.name, "headroom": cap_head, "usage": _usage(usage.cap(cap.key))})
    status: dict[str, Any] = {"envelopes": envelopes, "updatedAt": _stamp(now)}
    if caps:
        status["aggregateCaps"] = caps
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def material(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parts of a Budget status that carry information (``updatedAt`` and ``conditions``
    dropped), to skip writes that would only move the timestamp."""
    if not status:
        return {}
    return {k: v for k, v in status.items() if k not in ("updatedAt", "conditions")}
