"""Forecast of a blocked 64-GPU Run against 20,000 open leases (target p99 ≤ 50 ms).

Every lease belongs to a Run the resolver may cut (their requests are in the snapshot, as in
the services), so the figure includes the remedies preview and the lottery's kill probability.
Baseline in the same run: the naive replay that tries cover+pack at every lease-end instant in
turn, which must find the same ETA.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bench.common import emit, percentile, time_calls
from shared.engine.admit import Blocked, Start, try_start
from shared.engine.forecast import _attempt, _Timeline, forecast, request_scope
from shared.engine.model import (
    Budget,
    Envelope,
    FundingKind,
    Lease,
    Role,
    RunRequest,
)
from shared.engine.state import ClusterState
from shared.engine.topology import node_from_labels

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FLAVOR = "H100-80GB"
NODES_PER_DOMAIN = 16
DOMAINS = 157  # 2,512 nodes × 8 GPUs ≈ 20,000 GPUs
TEAMS = 50


def fleet() -> ClusterState:
    rng = random.Random(7)
    nodes = []
    for d in range(DOMAINS):
        for i in range(NODES_PER_DOMAIN):
            labels = {
                "region": "us-west",
                "cluster": f"c{d // 16}",
                "fabric.domain": f"f{d}",
                "gpu.flavor": FLAVOR,
            }
            built = node_from_labels(f"n{d:03d}-{i:02d}", labels, {"nvidia.com/gpu": "8"})
            assert not isinstance(built, str) and hasattr(built, "gpus")
            nodes.append(built)
    budgets = [
        Budget(
            name=f"team-{t}",
            owner=f"org:ai:team-{t}",
            parents=(),
            envelopes=(
                Envelope(
                    budget=f"team-{t}",
                    owner=f"org:ai:team-{t}",
                    name="west",
                    flavor=FLAVOR,
                    selector={"region": "us-west"},
                    concurrency=2_000,
                ),
            ),
        )
        for t in range(TEAMS)
    ]
    leases = []
    for n, node in enumerate(nodes):
        for g in range(8):
            if len(leases) == 20_000:
                break
            team = rng.randrange(TEAMS)
            start = T0 - timedelta(hours=rng.randrange(1, 48))
            leases.append(
                Lease(
                    name=f"l{n}-{g}",
                    run=("ns", f"run-{n}"),
                    owner=f"org:ai:team-{team}",
                    node=node.name,
                    gpus=1,
                    role=Role.ACTIVE,
                    group=0,
                    rank=g,
                    envelope=f"team-{team}/west",
                    payer_owner=f"org:ai:team-{team}",
                    funding=FundingKind.OWNED,
                    start=start,
                    expected_end=T0 + timedelta(minutes=rng.randrange(1, 7 * 24 * 60)),
                )
            )
    # Fill every remaining GPU so the Run is blocked now.
    for node in nodes[len(leases) // 8 :]:
        used = sum(1 for x in leases if x.node == node.name)
        if used < 8:
            leases.append(
                Lease(
                    name=f"fill-{node.name}",
                    run=("ns", "fill"),
                    owner="org:ai:team-0",
                    node=node.name,
                    gpus=8 - used,
                    role=Role.ACTIVE,
                    group=0,
                    rank=0,
                    envelope="team-0/west",
                    payer_owner="org:ai:team-0",
                    funding=FundingKind.OWNED,
                    start=T0,
                    expected_end=T0 + timedelta(days=6),
                )
            )
    runs = {}
    for x in leases:
        if x.run not in runs:
            runs[x.run] = RunRequest(
                key=x.run, uid=f"uid-{x.run[1]}", owner=x.owner, flavor=FLAVOR, total_gpus=8
            )
    return ClusterState.build(now=T0, nodes=nodes, budgets=budgets, ledger=leases, runs=runs)


def cpu_ms(call: Callable[[], object], n: int) -> list[float]:
    """CPU time of n calls in milliseconds: on a shared, loaded machine wall time is inflated
    by other processes, CPU time is not."""
    out = []
    for _ in range(n):
        began = time.process_time()
        call()
        out.append((time.process_time() - began) * 1000.0)
    return out


def main() -> None:
    state = fleet()
    want = RunRequest(
        key=("ns", "want"),
        uid="u",
        owner="org:ai:team-1",
        flavor=FLAVOR,
        total_gpus=64,
        group_gpus=8,
        max_duration=timedelta(hours=8),
    )
    blocked = try_start(want, state)
    assert isinstance(blocked, Blocked), blocked
    open_leases = len(state.open_leases)
    got = forecast(want, state, blocked)
    samples = time_calls(lambda: forecast(want, state, blocked), 30)
    cpu = cpu_ms(lambda: forecast(want, state, blocked), 30)
    emit(
        "forecast_20k_open_leases_all_cuttable",
        samples,
        cpu_p50_ms=round(percentile(cpu, 50), 3),
        cpu_p99_ms=round(percentile(cpu, 99), 3),
        target_ms=50,
        open_leases=open_leases,
        conflict_set=len(got.remedies.conflict_set),
        loadavg=[round(x, 2) for x in os.getloadavg()],
        eta_hours=round((got.earliest_start - T0).total_seconds() / 3600, 2),
        confidence=got.confidence.value,
    )
    # The figure documented before: the same ledger with no Run the resolver may cut.
    bare = dataclasses.replace(state, runs={})
    cpu = cpu_ms(lambda: forecast(want, bare, blocked), 30)
    emit(
        "forecast_20k_open_leases",
        time_calls(lambda: forecast(want, bare, blocked), 30),
        cpu_p50_ms=round(percentile(cpu, 50), 3),
        cpu_p99_ms=round(percentile(cpu, 99), 3),
        target_ms=50,
        open_leases=open_leases,
        loadavg=[round(x, 2) for x in os.getloadavg()],
    )

    # Baseline: the naive replay, one cover+pack attempt at every lease-end instant in order.
    timeline = _Timeline(want, state, request_scope(want, state))
    instants = sorted({t for t in timeline.ends if t > T0})

    def naive() -> datetime | None:
        for at in instants:
            if isinstance(_attempt(want, state, timeline, at, None), Start):
                return at
        return None

    eta = naive()
    assert eta == got.earliest_start, (eta, got.earliest_start)
    emit("forecast_20k_open_leases_naive_linear_baseline", time_calls(naive, 1), same_eta=True)


if __name__ == "__main__":
    main()
