"""``spec.after``: a Run waits for its upstream Runs to Complete (SPEC §2 Run, a job tree).

Rules: every upstream Completed → ready; any upstream Failed → the Run fails with
``UpstreamFailed`` (a failed upstream never completes, so waiting would be forever); otherwise the
Run waits (``WaitingForUpstream``), naming the upstreams not yet Completed — including ones that
do not exist (yet): a job tree may be submitted in any order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

UPSTREAM_FAILED = "UpstreamFailed"
WAITING_FOR_UPSTREAM = "WaitingForUpstream"
_COMPLETED = "Completed"
_FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class Ready:
    """Nothing to wait for."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """Upstreams not Completed yet; ``missing`` lists those that do not exist."""

    pending: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def reason(self) -> str:
        return WAITING_FOR_UPSTREAM

    @property
    def message(self) -> str:
        parts = []
        present = [n for n in self.pending if n not in self.missing]
        if present:
            parts.append("waiting for " + ", ".join(present) + " to complete")
        if self.missing:
            parts.append("not found yet: " + ", ".join(self.missing))
        return f"{WAITING_FOR_UPSTREAM}: " + "; ".join(parts)


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """At least one upstream Failed: this Run can never start."""

    failed: tuple[str, ...]

    @property
    def reason(self) -> str:
        return UPSTREAM_FAILED

    @property
    def message(self) -> str:
        return f"{UPSTREAM_FAILED}: upstream Run(s) " + ", ".join(self.failed) + " failed"


Dependency = Ready | Waiting | UpstreamFailed


def check_after(after: Sequence[str] | None, phases: Mapping[str, str | None]) -> Dependency:
    """Judge ``after`` against the upstream phases by name (absent key: the Run does not exist;
    ``None``: it exists without a phase yet)."""
    names = tuple(dict.fromkeys(after or ()))
    failed = tuple(n for n in names if n in phases and phases[n] == _FAILED)
    if failed:
        return UpstreamFailed(failed)
    pending = tuple(n for n in names if n not in phases or phases[n] != _COMPLETED)
    if pending:
        return Waiting(pending, tuple(n for n in pending if n not in phases))
    return Ready()
