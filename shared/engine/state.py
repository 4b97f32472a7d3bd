"""The immutable snapshot one decision cycle works on (the cache/snapshot split of Kueue)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from shared.engine.accounting import Usage, usage_from_ledger
from shared.engine.family import Family
from shared.engine.model import Budget, Lease, Node, ReservationClaim, RunKey, RunRequest
from shared.engine.topology import Topology


@dataclass(frozen=True, slots=True)
class Settings:
    """Operator-configurable knobs every rule reads from one place.

    Every service parses them with the same flags and environment variables
    (``shared.bus.settings``), so the binder's re-checks judge a commit by the numbers the
    services that proposed it used.
    """

    default_duration: timedelta = timedelta(hours=24)
    """Expected duration of a Run without maxDuration (GPU-hours headroom, forecasts)."""
    spare_factor: float = 1.0
    """Fraction of a spare GPU-hour charged to the paying envelope."""
    conservative_lead: timedelta = timedelta(hours=24)
    """ETA offered when no lease end or window opening in the horizon makes a Run fit."""
    horizon: timedelta = timedelta(days=30)
    """How far the forecast replays the timeline."""
    node_grace: timedelta = timedelta(seconds=30)
    """How long a leased node may be NotReady before it counts as failed."""
    missing_pod_grace: timedelta = timedelta(seconds=30)
    """How long a running rank may have no pod before its gang closes ``Fail``."""


@dataclass(frozen=True, slots=True)
class ClusterState:
    """Everything a decision reads, frozen at ``now``: nodes, budgets, the ledger, the claims."""

    now: datetime
    topology: Topology
    family: Family
    ledger: tuple[Lease, ...]
    """Open leases and the closed ones that still matter for GPU-hours (budget windows)."""
    usage: Usage
    runs: Mapping[RunKey, RunRequest] = field(default_factory=dict)
    """Requests of the Runs holding leases: what the resolver may cut."""
    claims: tuple[ReservationClaim, ...] = ()
    settings: Settings = field(default_factory=Settings)

    @property
    def open_leases(self) -> tuple[Lease, ...]:
        return tuple(lease for lease in self.ledger if lease.open)

    @classmethod
    def build(
        cls,
        *,
        now: datetime,
        nodes: Iterable[Node],
        budgets: Iterable[Budget],
        ledger: Iterable[Lease] = (),
        runs: Mapping[RunKey, RunRequest] | None = None,
        claims: Iterable[ReservationClaim] = (),
        settings: Settings | None = None,
    ) -> ClusterState:
        """Derive topology, family and usage from raw records (tests, replays, cold starts)."""
        settings = settings or Settings()
        budgets = tuple(budgets)
        ledger = tuple(ledger)
        family = Family(budgets)
        caps = tuple(cap for budget in budgets for cap in budget.caps)
        return cls(
            now=now,
            topology=Topology.build(nodes, (lease for lease in ledger if lease.open)),
            family=family,
            ledger=ledger,
            usage=usage_from_ledger(ledger, caps, now=now, spare_factor=settings.spare_factor),
            runs=dict(runs or {}),
            claims=tuple(claims),
            settings=settings,
        )
