"""Replay of a synthetic queue through the engine, as the services drive it (issue: promises kept).

Two fleets (256 and 2,048 GPUs: 8-GPU nodes, 16 per fabric domain), one seeded trace each: gangs
of 8–128 GPUs in groups of 8, walltimes log-uniform 30 min–24 h, actual runtimes a per-owner
fraction of the walltime (a Beta draw whose mean differs by owner, as in HPC traces where users
pad walltimes), Poisson arrivals at an offered load of 1.2. Every figure is printed per fleet,
with the plain walltime-backfill ETA of the same run as the baseline.
"""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, datetime, timedelta

from bench.common import machine
from services.replay.simulate import Job, Replay
from shared.engine.model import Budget, Envelope, Node
from shared.engine.state import Settings
from shared.engine.topology import node_from_labels

T0 = datetime(2026, 1, 5, tzinfo=UTC)
FLAVOR = "H100-80GB"
SEED = 11
LOAD = 1.2
SIZES = (8, 16, 32, 64, 128)
OWNERS = {f"org:ai:team-{i}": mean for i, mean in enumerate((0.15, 0.25, 0.35, 0.45, 0.6, 0.8))}
"""Owner → mean fraction of its walltime a Run really uses."""


def fleet(gpus: int) -> tuple[Node, ...]:
    out = []
    for i in range(gpus // 8):
        labels = {
            "region": "us-west",
            "cluster": "gpu-a",
            "fabric.domain": f"f{i // 16:02d}",
            "gpu.flavor": FLAVOR,
        }
        built = node_from_labels(f"n{i:04d}", labels, {"nvidia.com/gpu": "8"})
        assert isinstance(built, Node)
        out.append(built)
    return tuple(out)


def budgets(gpus: int) -> tuple[Budget, ...]:
    """One Budget per owner, each able to fund the whole fleet: capacity is what binds."""
    out = []
    for owner in OWNERS:
        name = owner.replace(":", "-")
        out.append(
            Budget(
                name=name,
                owner=owner,
                parents=(),
                envelopes=(Envelope(name, owner, "west", FLAVOR, {"region": "us-west"}, gpus),),
            )
        )
    return tuple(out)


def trace(gpus: int, jobs: int, seed: int = SEED) -> tuple[Job, ...]:
    rng = random.Random(seed)
    lo, hi = 0.5, 24.0
    mean_gpu_hours = 0.0
    drafts = []
    for i in range(jobs):
        owner = rng.choice(list(OWNERS))
        size = rng.choice(SIZES)
        wall_h = lo * (hi / lo) ** rng.random()
        mean = OWNERS[owner]
        fraction = rng.betavariate(4 * mean, 4 * (1 - mean))
        run_h = max(1 / 60, wall_h * fraction)
        drafts.append((f"job-{i:04d}", owner, size, wall_h, run_h))
        mean_gpu_hours += size * run_h
    mean_gpu_hours /= jobs
    rate = LOAD * gpus / mean_gpu_hours  # arrivals per hour
    at = 0.0
    out = []
    for name, owner, size, wall_h, run_h in drafts:
        at += rng.expovariate(rate)
        out.append(
            Job(
                name=name,
                owner=owner,
                arrival=timedelta(hours=at),
                gpus=size,
                walltime=timedelta(seconds=round(wall_h * 3600)),
                runtime=timedelta(seconds=round(run_h * 3600)),
                group_gpus=8,
            )
        )
    return tuple(out)


def main() -> None:
    sizes = [(256, 300), (2048, 600)]
    if os.environ.get("JOBTREE_BENCH_REPLAY_QUICK"):
        sizes = [(256, 120)]
    for gpus, jobs in sizes:
        replay = Replay(
            fleet(gpus),
            budgets(gpus),
            trace(gpus, jobs),
            T0,
            Settings(conservative_lead=timedelta(hours=24)),
        )
        figures = replay.run().as_dict()
        print(
            json.dumps(
                {
                    "figure": f"replay_{gpus}_gpus",
                    **figures,
                    "seed": SEED,
                    "offered_load": LOAD,
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "machine": machine(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
