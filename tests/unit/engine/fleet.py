"""Small builders for labelled fleets, envelopes, offers and runs, shared by engine tests.

Nodes go through ``node_from_labels`` so tests exercise the same translation the packer service
uses. Defaults follow the admin guide's example labels (us-west, H100-80GB).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from shared.engine.model import (
    DomainKey,
    Envelope,
    FundingKind,
    Lease,
    LeaseReason,
    Malleable,
    Node,
    Role,
    RunRequest,
)
from shared.engine.offers import Funding, Offer
from shared.engine.topology import MissingLabels, Topology, node_from_labels

FLAVOR = "H100-80GB"
REGION = "us-west"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def labels(
    region: str = REGION,
    cluster: str = "gpu-a",
    fabric: str = "nv-a",
    *,
    flavor: str = FLAVOR,
    rack: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Topology labels of one node."""
    out = {"region": region, "cluster": cluster, "fabric.domain": fabric, "gpu.flavor": flavor}
    if rack is not None:
        out["rack"] = rack
    out.update(extra or {})
    return out


def node(
    name: str,
    *,
    region: str = REGION,
    cluster: str = "gpu-a",
    fabric: str = "nv-a",
    flavor: str = FLAVOR,
    gpus: int = 8,
    rack: str | None = None,
    ready: bool = True,
    cordoned: bool = False,
    extra: Mapping[str, str] | None = None,
) -> Node:
    """One labelled node, built the way the packer service builds it."""
    built = node_from_labels(
        name,
        labels(region, cluster, fabric, flavor=flavor, rack=rack, extra=extra),
        {"nvidia.com/gpu": str(gpus)},
        ready=ready,
        cordoned=cordoned,
    )
    assert not isinstance(built, MissingLabels)
    return built


def domain_nodes(
    cluster: str,
    fabric: str,
    count: int,
    *,
    region: str = REGION,
    flavor: str = FLAVOR,
    gpus: int = 8,
    prefix: str | None = None,
    rack: str | None = None,
) -> list[Node]:
    """``count`` identical nodes named ``<prefix>-NN`` in one domain (prefix defaults to fabric)."""
    stem = prefix or fabric
    return [
        node(
            f"{stem}-{i:02d}",
            region=region,
            cluster=cluster,
            fabric=fabric,
            flavor=flavor,
            gpus=gpus,
            rack=rack,
        )
        for i in range(1, count + 1)
    ]


def dom(cluster: str = "gpu-a", fabric: str = "nv-a", region: str = REGION) -> DomainKey:
    return (region, cluster, fabric)


def topo(nodes: Iterable[Node], leases: Iterable[Lease] = ()) -> Topology:
    return Topology.build(nodes, leases)


def envelope(
    name: str = "west",
    *,
    budget: str = "team-a",
    owner: str = "org:ai:team-a",
    flavor: str = FLAVOR,
    selector: Mapping[str, str] | None = None,
    concurrency: int = 10_000,
) -> Envelope:
    return Envelope(
        budget=budget,
        owner=owner,
        name=name,
        flavor=flavor,
        selector=dict(selector) if selector is not None else {"region": REGION},
        concurrency=concurrency,
    )


def offer(
    env: Envelope | None = None,
    gpus: int = 10_000,
    *,
    kind: FundingKind = FundingKind.OWNED,
    caps: tuple[str, ...] = (),
) -> Offer:
    return Offer(envelope=env or envelope(), gpus=gpus, kind=kind, caps=caps)


def funding(*offers: Offer, caps: Mapping[str, int] | None = None) -> Funding:
    return Funding(offers=offers or (offer(),), caps=dict(caps or {}))


def run(
    name: str = "train",
    *,
    namespace: str = "research",
    uid: str = "uid-1",
    owner: str = "org:ai:team-a",
    flavor: str = FLAVOR,
    total: int = 8,
    group: int | None = None,
    spread: bool = True,
    selector: Mapping[str, str] | None = None,
    spares: int = 0,
    malleable: Malleable | None = None,
    max_duration: timedelta | None = None,
) -> RunRequest:
    return RunRequest(
        key=(namespace, name),
        uid=uid,
        owner=owner,
        flavor=flavor,
        total_gpus=total,
        group_gpus=group,
        allow_cross_group_spread=spread,
        selector=dict(selector or {}),
        spares_per_group=spares,
        malleable=malleable,
        max_duration=max_duration,
    )


def lease(
    node_name: str,
    gpus: int,
    *,
    name: str | None = None,
    run_key: tuple[str, str] = ("other", "busy"),
    envelope_key: str = "team-b/west",
    start: datetime = T0,
    end: datetime | None = None,
) -> Lease:
    """An existing lease holding GPUs on a node (another Run's by default)."""
    return Lease(
        name=name or f"busy-{node_name}-{gpus}",
        run=run_key,
        owner="org:ai:team-b",
        node=node_name,
        gpus=gpus,
        role=Role.ACTIVE,
        group=0,
        rank=0,
        envelope=envelope_key,
        payer_owner="org:ai:team-b",
        funding=FundingKind.OWNED,
        start=start,
        reason=LeaseReason.START,
        end=end,
    )
