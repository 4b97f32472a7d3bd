"""What the operator's Run panels show: Runs by phase and flavor, and the wait to first start.

Both are derived from Run objects as the API server holds them, so every admission replica
exports the same figures (the dashboard takes ``max``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from shared.api.run import RunPhase
from shared.control.run_status import parse_stamp

PHASES = tuple(RunPhase)
"""Every phase, so a phase whose last Run left is exported as 0 rather than vanishing."""


def run_flavor(run: Mapping[str, Any]) -> str:
    """The Run's GPU flavor (``spec.resources.gpuType``), ``""`` when it names none."""
    return str(((run.get("spec") or {}).get("resources") or {}).get("gpuType") or "")


def phase_counts(runs: Iterable[Mapping[str, Any]]) -> Counter[tuple[str, str]]:
    """Runs per (phase, flavor); a Run admission has not written yet counts as Pending."""
    counts: Counter[tuple[str, str]] = Counter()
    for run in runs:
        phase = str((run.get("status") or {}).get("phase") or RunPhase.PENDING)
        counts[(phase, run_flavor(run))] += 1
    return counts


def first_start_wait(
    run: Mapping[str, Any], written: Mapping[str, Any], now: datetime
) -> float | None:
    """Seconds from submission (``creationTimestamp``) to the first ``Running``, when the status
    just written moves a never-started Run to Running; None for any other write (a requeued Run
    restarting, a Running Run's refresh)."""
    before = run.get("status") or {}
    if written.get("phase") != RunPhase.RUNNING or before.get("phase") == RunPhase.RUNNING:
        return None
    if int(before.get("restarts") or 0) or int(written.get("restarts") or 0):
        return None
    created = parse_stamp((run.get("metadata") or {}).get("creationTimestamp"))
    return None if created is None else max(0.0, (now - created).total_seconds())
