"""Pack latency on a 10,000-node fleet: one JSON line per figure (``python -m bench.bench_pack``).

Figures:

* ``pack_1024gpu_10k_nodes`` — ``shared.engine.pack.pack`` of a 1,024-GPU Run with groupGPUs 64 on
  10,000 nodes x 8 GPUs in 625 domains (about a third of the GPUs already leased), target p99 10 ms.
* ``naive_scan_1024gpu_10k_nodes`` — baseline: the same placement found by filtering all 10,000
  nodes on every call (flavor, schedulable, selectors, free) and grouping them by domain, i.e. what
  pack would cost without the topology's per-domain free index.
* ``pack_1024gpu_10k_nodes_rack_selector`` — the same Run (groups of 32) restricted to one rack
  label: a per-node key, so pack must check every node of the matching domains (slow path).
* ``pack_nofit_10k_nodes`` — groups of 256 that no domain holds: the typed NoFit path.
* ``topology_with_leases_<n>`` — applying a bind's leases to the snapshot in one step.
* ``pack_1024gpu_10k_nodes_100k_pods`` — the first figure's Run, its template asking 8 CPUs and
  64Gi per rank, on the same fleet with 100,000 other pods bound to it (10 per node, 2 % holding a
  GPU): the cost of counting other pods and fitting rank pods; target p50 within 1.5x of
  ``pack_1024gpu_10k_nodes`` measured in the same run (interleaved call by call).
* ``topology_build_10k_nodes`` — ``Topology.build`` of the 10,000 nodes and their leases (what a
  service pays at start and relist); baseline ``topology_build_10k_nodes_legacy``, the build
  before pods were counted (``bench/legacy_topology.py``), interleaved; target p50 20 ms.
* ``packer_snapshot_10k_nodes_100k_pods`` — the packer's topology after its first lists: nodes,
  leases and the 100,000 pods in one build (fewer calls: each is a big build).
* ``topology_with_pod_event`` — one pod watch event applied to that snapshot.

The fleet is built once; figures time >= 200 calls with ``time.perf_counter`` unless noted.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from bench.common import emit, time_calls
from bench.legacy_topology import legacy_build
from shared.engine.model import (
    Envelope,
    FundingKind,
    Lease,
    LeaseReason,
    Node,
    NodeCapacity,
    PodNeeds,
    Role,
    RunRequest,
    selector_matches,
)
from shared.engine.offers import Funding, Offer
from shared.engine.pack import NoFit, Placement, pack
from shared.engine.topology import PodChange, Topology, node_from_labels

FLAVOR = "H100-80GB"
REGIONS = ("us-west", "us-east", "eu-north", "eu-west", "ap-south")
CLUSTERS_PER_REGION = 5
FABRICS_PER_CLUSTER = 25  # 5 x 5 x 25 = 625 domains
NODES_PER_DOMAIN = 16  # 625 x 16 = 10,000 nodes
GPUS_PER_NODE = 8
T0 = datetime(2026, 1, 1, tzinfo=UTC)
GI = 2**30
CAPACITY = NodeCapacity(cpu=192_000, memory=2048 * GI, ephemeral=4096 * GI, pods=110)
PODS_PER_NODE = 10


def build_fleet(seed: int = 7) -> tuple[Topology, list[Node]]:
    """10,000 labelled nodes, a few cordoned/NotReady, about a third of their GPUs leased."""
    rng = random.Random(seed)
    nodes: list[Node] = []
    for region in REGIONS:
        for c in range(CLUSTERS_PER_REGION):
            for f in range(FABRICS_PER_CLUSTER):
                for n in range(NODES_PER_DOMAIN):
                    name = f"{region}-c{c}-f{f:02d}-n{n:02d}"
                    labels = {
                        "region": region,
                        "cluster": f"c{c}",
                        "fabric.domain": f"f{f:02d}",
                        "rack": f"r{n // 8}",
                        "gpu.flavor": FLAVOR,
                    }
                    node = node_from_labels(
                        name,
                        labels,
                        {"nvidia.com/gpu": str(GPUS_PER_NODE)},
                        ready=rng.random() > 0.005,
                        cordoned=rng.random() < 0.005,
                        capacity=CAPACITY,
                    )
                    assert isinstance(node, Node)
                    nodes.append(node)
    leases = [
        Lease(
            name=f"busy-{node.name}",
            run=("other", f"busy-{i % 500}"),
            owner="org:ai:other",
            node=node.name,
            gpus=rng.choice((2, 4, 8)),
            role=Role.ACTIVE,
            group=0,
            rank=0,
            envelope="other/env",
            payer_owner="org:ai:other",
            funding=FundingKind.OWNED,
            start=T0,
            reason=LeaseReason.START,
        )
        for i, node in enumerate(nodes)
        if rng.random() < 0.5
    ]
    return Topology.build(nodes, leases), nodes


def open_leases(topo: Topology, nodes: list[Node]) -> list[Lease]:
    """The fleet's open leases as records again (what a cache holds and builds from)."""
    return [
        Lease(
            name=name,
            run=("other", "busy"),
            owner="org:ai:other",
            node=node.name,
            gpus=gpus,
            role=role,
            group=0,
            rank=0,
            envelope="other/env",
            payer_owner="org:ai:other",
            funding=FundingKind.OWNED,
            start=T0,
        )
        for node in nodes
        for name, (gpus, role) in topo.leases_on(node.name).items()
    ]


def other_pods(nodes: list[Node], seed: int = 11) -> list[PodChange]:
    """``PODS_PER_NODE`` pods Jobtree did not create on every node: agents, notebooks, jobs."""
    rng = random.Random(seed)
    return [
        (
            f"team-{k}/pod-{node.name}-{k}",
            node.name,
            (1 if rng.random() < 0.02 else 0, rng.choice((250, 500, 1000)), 2 * GI, 0),
        )
        for node in nodes
        for k in range(PODS_PER_NODE)
    ]


def request() -> RunRequest:
    return RunRequest(
        key=("research", "llm-pretrain"),
        uid="0b6f3c1e",
        owner="org:ai:rai:sys",
        flavor=FLAVOR,
        total_gpus=1024,
        group_gpus=64,
    )


def funding() -> Funding:
    """Cover order: the owner's us-west envelope, a sibling's us-east one, a parent's anywhere."""

    def env(owner: str, budget: str, name: str, selector: dict[str, str], gpus: int) -> Offer:
        e = Envelope(budget, owner, name, FLAVOR, selector, concurrency=gpus)
        return Offer(
            e, gpus, FundingKind.OWNED if owner == "org:ai:rai:sys" else FundingKind.FAMILY
        )

    return Funding(
        offers=(
            env("org:ai:rai:sys", "sys", "west", {"region": "us-west"}, 512),
            env("org:ai:rai:nlp", "nlp", "east", {"region": "us-east"}, 384),
            env("org:ai:rai", "rai", "all", {"gpu.flavor": FLAVOR}, 4096),
        )
    )


def naive_pack(req: RunRequest, nodes: list[Node], topo: Topology, fund: Funding) -> int:
    """Baseline: scan and group every node per call, then take groups greedily (payer-blind)."""
    by_domain: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
    for node in nodes:
        if node.flavor != req.flavor or not node.schedulable:
            continue
        if not selector_matches(req.selector, node.labels):
            continue
        if not any(selector_matches(o.envelope.selector, node.labels) for o in fund.offers):
            continue
        free = topo.free(node.name)
        if free > 0:
            by_domain.setdefault(node.domain, []).append((-free, node.name))
    room = {d: -sum(f for f, _ in ns) for d, ns in by_domain.items()}
    order = sorted(room, key=lambda d: (-room[d], d))
    group = req.group_gpus or 1
    placed = 0
    for d in order:
        while room[d] >= group and placed < req.total_gpus:
            room[d] -= group
            placed += group
        if placed >= req.total_gpus:
            break
    for d in order[:4]:
        sorted(by_domain[d])
    return placed


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Milliseconds of n calls after a short warm-up."""
    for _ in range(5):
        fn()
    return time_calls(fn, n)


def interleaved(
    base: Callable[[], object], head: Callable[[], object], n: int
) -> tuple[list[float], list[float]]:
    """Milliseconds of n calls each, alternating base and head so both see the same load."""
    for _ in range(3):
        base()
        head()
    a: list[float] = []
    b: list[float] = []
    for _ in range(n):
        a.extend(time_calls(base, 1))
        b.extend(time_calls(head, 1))
    return a, b


def p50(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=300, help="timed calls per figure (>= 200)")
    args = parser.parse_args(argv)
    n = max(200, args.n)
    topo, nodes = build_fleet()
    req, fund = request(), funding()
    plan = pack(req, topo, fund)
    assert isinstance(plan, Placement), plan
    assert plan.active_gpus == 1024
    leases = open_leases(topo, nodes)
    pods = other_pods(nodes)
    crowded = Topology.build(nodes, leases, pods)
    ranked = replace(req, pod=PodNeeds(cpu=8_000, memory=64 * GI))
    crowded_plan = pack(ranked, crowded, fund)
    assert isinstance(crowded_plan, Placement), crowded_plan
    base, head = interleaved(lambda: pack(req, topo, fund), lambda: pack(ranked, crowded, fund), n)
    emit(
        "pack_1024gpu_10k_nodes",
        base,
        target_p99_ms=10,
        nodes=len(topo),
        domains=len(topo.domains(FLAVOR)),
        groups=len(plan.groups),
    )
    emit(
        "pack_1024gpu_10k_nodes_100k_pods",
        head,
        target_p50_ratio=1.5,
        p50_ratio=round(p50(head) / p50(base), 2),
        baseline="pack_1024gpu_10k_nodes (same run, interleaved)",
        nodes=len(crowded),
        pods=crowded.pod_count(),
        groups=len(crowded_plan.groups),
    )
    old, new = interleaved(
        lambda: legacy_build(nodes, leases), lambda: Topology.build(nodes, leases), n
    )
    emit(
        "topology_build_10k_nodes_legacy",
        old,
        target_p99_ms=None,
        nodes=len(nodes),
        leases=len(leases),
        note="baseline: the build before pods were counted",
    )
    emit(
        "topology_build_10k_nodes",
        new,
        target_p50_ms=20,
        p50_ratio=round(p50(new) / p50(old), 2),
        baseline="topology_build_10k_nodes_legacy (same run, interleaved)",
        nodes=len(nodes),
        leases=len(leases),
    )
    emit(
        "packer_snapshot_10k_nodes_100k_pods",
        timed(lambda: Topology.build(nodes, leases, pods), max(20, n // 10)),
        target_p99_ms=None,
        nodes=len(nodes),
        leases=len(leases),
        pods=len(pods),
    )
    events = iter(range(10**9))
    emit(
        "topology_with_pod_event",
        timed(
            lambda: crowded.with_pods([(f"x/p{next(events)}", nodes[0].name, (0, 100, GI, 0))]), n
        ),
        target_p99_ms=None,
        nodes=len(crowded),
        pods=crowded.pod_count(),
    )
    emit(
        "naive_scan_1024gpu_10k_nodes",
        timed(lambda: naive_pack(req, nodes, topo, fund), n),
        target_p99_ms=None,
        nodes=len(nodes),
        note="baseline: full node scan per call, payer-blind",
    )
    rack = replace(req, selector={"rack": "r0"}, group_gpus=32)
    assert isinstance(pack(rack, topo, fund), Placement)
    emit(
        "pack_1024gpu_10k_nodes_rack_selector",
        timed(lambda: pack(rack, topo, fund), n),
        target_p99_ms=None,
        nodes=len(topo),
        note="per-node selector key: every node of matching domains is checked",
    )
    huge = replace(req, group_gpus=256)
    assert isinstance(pack(huge, topo, fund), NoFit)
    emit(
        "pack_nofit_10k_nodes",
        timed(lambda: pack(huge, topo, fund), n),
        target_p99_ms=None,
        nodes=len(topo),
        note="groups of 256 fit no domain: the NoFit path forecast replays hit",
    )
    bind = [
        Lease(
            name=f"plan-{s.node}-{s.rank}",
            run=req.key,
            owner=req.owner,
            node=s.node,
            gpus=s.gpus,
            role=s.role,
            group=s.group,
            rank=s.rank,
            envelope=s.envelope,
            payer_owner=s.payer_owner,
            funding=s.funding,
            start=T0,
        )
        for s in plan.slices
    ]
    emit(
        f"topology_with_leases_{len(bind)}",
        timed(lambda: topo.with_leases(bind), n),
        target_p99_ms=None,
        nodes=len(topo),
    )


if __name__ == "__main__":
    main()
