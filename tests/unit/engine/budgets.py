"""Builders for budget trees, run requests and leases, shared by engine tests.

Defaults are the common case (one H100 envelope in us-east/c1/d1, window always open) so a test
only spells out what it is about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from shared.engine.family import Family
from shared.engine.model import (
    AggregateCap,
    Budget,
    Envelope,
    FundingKind,
    Lease,
    Lending,
    Malleable,
    Role,
    RunRequest,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
"""Reference instant for tests (aware UTC)."""
H100 = "H100-80GB"
A100 = "A100-40GB"
EAST = {"region": "us-east", "cluster": "c1", "fabric.domain": "d1"}
WEST = {"region": "us-west", "cluster": "c2", "fabric.domain": "d1"}


def loc(region: str, cluster: str | None = None, domain: str | None = None) -> dict[str, str]:
    """A topology selector naming only the given levels."""
    sel = {"region": region}
    if cluster is not None:
        sel["cluster"] = cluster
    if domain is not None:
        sel["fabric.domain"] = domain
    return sel


def lending(
    *to: str, max_concurrency: int | None = None, max_gpu_hours: float | None = None
) -> Lending:
    """Lending that allows the given borrower globs."""
    return Lending(
        allow=True, to=tuple(to), max_concurrency=max_concurrency, max_gpu_hours=max_gpu_hours
    )


def env(
    name: str,
    concurrency: int,
    *,
    flavor: str = H100,
    selector: Mapping[str, str] | None = None,
    max_gpu_hours: float | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    reservations_before_start: bool = False,
    admission_before_start: bool = False,
    lend: Lending | None = None,
) -> Envelope:
    """An envelope draft; :func:`budget` fills in budget name and owner."""
    return Envelope(
        budget="",
        owner="",
        name=name,
        flavor=flavor,
        selector=dict(EAST if selector is None else selector),
        concurrency=concurrency,
        max_gpu_hours=max_gpu_hours,
        start=start,
        end=end,
        reservations_before_start=reservations_before_start,
        admission_before_start=admission_before_start,
        lending=lend or Lending(),
    )


def cap(
    name: str,
    envelopes: Sequence[str],
    *,
    max_concurrency: int | None = None,
    max_gpu_hours: float | None = None,
    flavor: str = H100,
) -> AggregateCap:
    """An aggregate cap draft over envelope names of the same budget."""
    return AggregateCap(
        budget="",
        name=name,
        flavor=flavor,
        envelopes=tuple(envelopes),
        max_concurrency=max_concurrency,
        max_gpu_hours=max_gpu_hours,
    )


def budget(
    owner: str,
    *envelopes: Envelope,
    name: str | None = None,
    parents: Sequence[str] = (),
    caps: Sequence[AggregateCap] = (),
) -> Budget:
    """A Budget whose envelopes and caps are stamped with its name and owner."""
    bname = name or owner.replace(":", "-")
    stamped = tuple(
        Envelope(
            budget=bname,
            owner=owner,
            name=e.name,
            flavor=e.flavor,
            selector=e.selector,
            concurrency=e.concurrency,
            max_gpu_hours=e.max_gpu_hours,
            start=e.start,
            end=e.end,
            reservations_before_start=e.reservations_before_start,
            admission_before_start=e.admission_before_start,
            lending=e.lending,
        )
        for e in envelopes
    )
    stamped_caps = tuple(
        AggregateCap(
            budget=bname,
            name=c.name,
            flavor=c.flavor,
            envelopes=tuple(r if "/" in r else f"{bname}/{r}" for r in c.envelopes),
            max_concurrency=c.max_concurrency,
            max_gpu_hours=c.max_gpu_hours,
        )
        for c in caps
    )
    return Budget(
        name=bname, owner=owner, parents=tuple(parents), envelopes=stamped, caps=stamped_caps
    )


LINK_FLAVOR = "link-only"
"""Flavor no Run asks for: an envelope of it makes a Budget that only joins the family tree."""


def root(owner: str) -> Budget:
    """A Budget for ``owner`` with no money of the tested flavors: it only links the tree.

    The family is the tree of Budgets that exist (SPEC §2), so two teams under ``org:ai:rai`` are
    siblings only when a Budget for ``org:ai:rai`` exists.
    """
    return budget(owner, env("link", 1, flavor=LINK_FLAVOR))


def key(owner: str, envelope_name: str) -> str:
    """Envelope key of an envelope built by :func:`budget` with the default budget name."""
    return f"{owner.replace(':', '-')}/{envelope_name}"


def family(*budgets: Budget) -> Family:
    """Family over the given budgets."""
    return Family(budgets)


def simple_family(owners: Mapping[str, int], *, flavor: str = H100) -> Family:
    """One envelope ``e`` in EAST per owner with the given concurrency."""
    return Family(budget(o, env("e", c, flavor=flavor)) for o, c in owners.items())


def tree(
    depth: int, fanout: int, *, root: str = "org", per_owner: int = 1, concurrency: int = 64
) -> list[Budget]:
    """A complete family tree ``depth`` levels deep; every owner gets ``per_owner`` envelopes.

    Envelopes rotate over a few regions so location-first ordering has work to do.
    """
    regions = ("us-east", "us-west", "eu-west", "ap-south")
    out: list[Budget] = []
    level = [root]
    counter = 0
    for _ in range(depth):
        nxt: list[str] = []
        for owner in level:
            envs = []
            for i in range(per_owner):
                envs.append(
                    env(f"e{i}", concurrency, selector=loc(regions[counter % len(regions)], "c1"))
                )
                counter += 1
            out.append(budget(owner, *envs))
            nxt.extend(f"{owner}:n{j}" for j in range(fanout))
        level = nxt
    return out


def request(
    owner: str,
    total: int,
    *,
    flavor: str = H100,
    name: str = "r",
    group_gpus: int | None = None,
    selector: Mapping[str, str] | None = None,
    spares: int = 0,
    malleable: Malleable | None = None,
    allow_borrow: bool = False,
    max_borrow: int | None = None,
    sponsors: Iterable[str] = (),
    max_duration: timedelta | None = None,
) -> RunRequest:
    """A RunRequest for ``total`` GPUs of ``owner``."""
    return RunRequest(
        key=("ns", name),
        uid=f"uid-{name}",
        owner=owner,
        flavor=flavor,
        total_gpus=total,
        group_gpus=group_gpus,
        selector=dict(selector or {}),
        spares_per_group=spares,
        malleable=malleable,
        allow_borrow=allow_borrow,
        max_borrow_gpus=max_borrow,
        sponsors=tuple(sponsors),
        max_duration=max_duration,
    )


def lease(
    name: str,
    envelope_key: str,
    gpus: int,
    start: datetime,
    *,
    end: datetime | None = None,
    expected_end: datetime | None = None,
    role: Role = Role.ACTIVE,
    funding: FundingKind = FundingKind.OWNED,
    owner: str = "org:a",
    payer_owner: str | None = None,
    run: tuple[str, str] = ("ns", "r"),
    node: str = "n1",
) -> Lease:
    """A lease paid by ``envelope_key``; payer owner defaults to the run owner."""
    return Lease(
        name=name,
        run=run,
        owner=owner,
        node=node,
        gpus=gpus,
        role=role,
        group=0,
        rank=0,
        envelope=envelope_key,
        payer_owner=payer_owner or owner,
        funding=funding,
        start=start,
        end=end,
        expected_end=expected_end,
    )
