"""Builders of RunRequest and Lease sets for resolver, lottery, failure and shrink tests.

Names are deterministic (``<run>-g<group>-r<rank>`` for working leases, ``<run>-g<group>-s<n>``
for spares) so assertions can name leases directly.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from shared.engine.model import (
    DomainKey,
    FundingKind,
    Lease,
    LeaseReason,
    Malleable,
    Role,
    RunKey,
    RunRequest,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FLAVOR = "H100-80GB"
NAMESPACE = "team"
DOMAIN_A: DomainKey = ("us-west", "gpu-a", "nv-a")
DOMAIN_B: DomainKey = ("us-west", "gpu-a", "nv-b")


def fixed_run(
    name: str,
    owner: str,
    total: int,
    *,
    group_gpus: int | None = None,
    spares: int = 0,
    checkpoint: timedelta | None = None,
    max_restarts: int = 0,
    opportunistic: bool = False,
    flavor: str = FLAVOR,
) -> RunRequest:
    """A fixed-width run: the whole gang is one AND bundle."""
    return RunRequest(
        key=(NAMESPACE, name),
        uid=f"uid-{name}",
        owner=owner,
        flavor=flavor,
        total_gpus=total,
        group_gpus=group_gpus,
        spares_per_group=spares,
        checkpoint=checkpoint,
        max_restarts=max_restarts,
        opportunistic=opportunistic,
    )


def elastic_run(
    name: str,
    owner: str,
    *,
    min_gpus: int,
    max_gpus: int,
    step: int,
    total: int | None = None,
    group_gpus: int | None = None,
    spares: int = 0,
    checkpoint: timedelta | None = None,
    max_restarts: int = 0,
    allow_borrow: bool = False,
    flavor: str = FLAVOR,
) -> RunRequest:
    """A malleable run, shrinkable by whole groups down to ``min_gpus``."""
    width = max_gpus if total is None else total
    return RunRequest(
        key=(NAMESPACE, name),
        uid=f"uid-{name}",
        owner=owner,
        flavor=flavor,
        total_gpus=width,
        group_gpus=group_gpus if group_gpus is not None else step,
        spares_per_group=spares,
        malleable=Malleable(min_gpus, max_gpus, step, width),
        allow_borrow=allow_borrow,
        checkpoint=checkpoint,
        max_restarts=max_restarts,
    )


@dataclass
class Ledger:
    """Mutable builder of one open ledger plus the runs it references."""

    leases: list[Lease] = field(default_factory=list)
    runs: dict[RunKey, RunRequest] = field(default_factory=dict)
    _ranks: dict[RunKey, int] = field(default_factory=dict)
    _spares: dict[tuple[RunKey, int], int] = field(default_factory=dict)

    def lease(
        self,
        run: RunRequest,
        node: str,
        gpus: int,
        *,
        role: Role = Role.ACTIVE,
        group: int = 0,
        rank: int | None = None,
        envelope: str | None = None,
        payer_owner: str | None = None,
        funding: FundingKind = FundingKind.OWNED,
        start: datetime = T0,
        name: str | None = None,
        expected_end: datetime | None = None,
    ) -> Lease:
        """Add one open lease; ranks count up per run, names follow the module convention."""
        self.runs[run.key] = run
        if role is Role.SPARE:
            # Spares hold no rank of their own: numbered per group, not from the run's ranks.
            spare = self._spares.get((run.key, group), 0)
            self._spares[(run.key, group)] = spare + 1
            rank = spare if rank is None else rank
            name = name or f"{run.key[1]}-g{group}-s{spare}"
        else:
            if rank is None:
                rank = self._ranks.get(run.key, 0)
            self._ranks[run.key] = max(self._ranks.get(run.key, 0), rank + 1)
            name = name or f"{run.key[1]}-g{group}-r{rank}"
        payer = payer_owner if payer_owner is not None else run.owner
        lease = Lease(
            name=name,
            run=run.key,
            owner=run.owner,
            node=node,
            gpus=gpus,
            role=role,
            group=group,
            rank=rank,
            envelope=envelope if envelope is not None else f"{payer}/main",
            payer_owner=payer,
            funding=funding,
            start=start,
            reason=LeaseReason.FILL if role is Role.BORROWED else LeaseReason.START,
            expected_end=expected_end,
        )
        self.leases.append(lease)
        return lease

    def group(
        self,
        run: RunRequest,
        group: int,
        nodes: Sequence[str],
        gpus: int,
        **kwargs: object,
    ) -> list[Lease]:
        """One working lease of ``gpus`` per node for ``group`` (one rank per node)."""
        return [self.lease(run, node, gpus, group=group, **kwargs) for node in nodes]  # type: ignore[arg-type]

    def spare(self, run: RunRequest, group: int, node: str, gpus: int, **kwargs: object) -> Lease:
        return self.lease(run, node, gpus, role=Role.SPARE, group=group, **kwargs)  # type: ignore[arg-type]

    def fill(self, run: RunRequest, node: str, gpus: int, **kwargs: object) -> Lease:
        """An opportunistic run's Borrowed lease on someone's spare GPUs."""
        return self.lease(run, node, gpus, role=Role.BORROWED, **kwargs)  # type: ignore[arg-type]

    def run_leases(self, run: RunRequest) -> list[Lease]:
        return [lease for lease in self.leases if lease.run == run.key]

    @property
    def by_name(self) -> Mapping[str, Lease]:
        return {lease.name: lease for lease in self.leases}


def width(leases: Sequence[Lease], run: RunKey, ended: Collection[str] = frozenset()) -> int:
    """Working GPUs of ``run`` once ``ended`` leases are gone."""
    return sum(
        lease.gpus
        for lease in leases
        if lease.run == run and lease.role is not Role.SPARE and lease.name not in ended
    )
