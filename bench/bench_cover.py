"""Cover latency: 2,000 envelopes in a five-level family tree (``python -m bench.bench_cover``).

Figures (one JSON line each):

* ``cover_2000_envelopes`` — ``shared.engine.cover.cover`` for Runs of random owners, sizes and
  locations (some borrowing from sponsors outside the tree), with the Family built once as a
  service keeps it (relations are memoised per owner on first use, so most of the 2,000 calls
  also pay that first use); about half the envelopes carry leases; 8 extra envelopes belong to
  outside sponsors. Target p99 5 ms.
* ``cover_2000_envelopes_cold_owner`` — the first cover for an owner on a fresh Family (relations
  not memoised yet): what a service pays once per owner after every Budget change.
* ``naive_cover_2000_envelopes`` — baseline measured in the same run: rebuild the Family index and
  its relations on every call (what cover would cost without the memoised family tree).
"""

from __future__ import annotations

import argparse
import random
from datetime import UTC, datetime, timedelta
from functools import partial

from bench.common import emit, time_calls
from shared.engine.accounting import Usage, usage_from_ledger
from shared.engine.cover import cover
from shared.engine.family import Family
from shared.engine.model import (
    AggregateCap,
    Budget,
    Envelope,
    FundingKind,
    Lease,
    Lending,
    Role,
    RunRequest,
)

FLAVORS = ("H100-80GB", "A100-40GB")
REGIONS = ("us-east", "us-west", "eu-west", "ap-south")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEPTH = 5
FANOUT = 6  # 1 + 6 + 36 + 216 + 1296 = 1,555 owners
ENVELOPES = 2000


def build_budgets(rng: random.Random) -> list[Budget]:
    """A five-level org tree with 2,000 envelopes plus a handful of outside sponsors."""
    owners: list[str] = []
    level = ["org"]
    for _ in range(DEPTH):
        owners.extend(level)
        level = [f"{o}:t{j}" for o in level for j in range(FANOUT)]
    budgets: list[Budget] = []
    count = 0
    for i, owner in enumerate(owners):
        name = owner.replace(":", "-")
        n_env = 2 if i < ENVELOPES - len(owners) else 1
        envs = []
        for k in range(n_env):
            region = REGIONS[rng.randrange(len(REGIONS))]
            envs.append(
                Envelope(
                    budget=name,
                    owner=owner,
                    name=f"e{k}",
                    flavor=FLAVORS[rng.randrange(len(FLAVORS))],
                    selector={"region": region, "cluster": f"c{rng.randrange(3)}"},
                    concurrency=rng.choice((8, 16, 32, 64)),
                    max_gpu_hours=rng.choice((None, 5_000.0, 20_000.0)),
                )
            )
            count += 1
        caps: tuple[AggregateCap, ...] = ()
        if n_env == 2 and rng.random() < 0.3:
            caps = (
                AggregateCap(
                    budget=name,
                    name="both",
                    flavor=envs[0].flavor,
                    envelopes=(f"{name}/e0", f"{name}/e1"),
                    max_concurrency=48,
                ),
            )
        budgets.append(Budget(name, owner, (), tuple(envs), caps))
    assert count == ENVELOPES, count
    for s in range(4):
        owner = f"lab:s{s}"
        name = owner.replace(":", "-")
        envs = [
            Envelope(
                budget=name,
                owner=owner,
                name=f"e{k}",
                flavor=FLAVORS[k % 2],
                selector={"region": REGIONS[s]},
                concurrency=256,
                lending=Lending(allow=True, to=("org:*",), max_concurrency=128),
            )
            for k in range(2)
        ]
        budgets.append(Budget(name, owner, (), tuple(envs)))
    return budgets


def build_usage(budgets: list[Budget], rng: random.Random) -> Usage:
    """About half the envelopes carry one or two live or finished leases."""
    leases: list[Lease] = []
    caps = [c for b in budgets for c in b.caps]
    for b in budgets:
        for e in b.envelopes:
            if rng.random() < 0.5:
                continue
            for i in range(rng.randint(1, 2)):
                start = T0 - timedelta(hours=rng.randint(1, 48))
                closed = rng.random() < 0.4
                leases.append(
                    Lease(
                        name=f"{e.key}-{i}",
                        run=("ns", f"r-{e.key}"),
                        owner=e.owner,
                        node="n",
                        gpus=rng.choice((4, 8)),
                        role=Role.SPARE if rng.random() < 0.1 else Role.ACTIVE,
                        group=0,
                        rank=i,
                        envelope=e.key,
                        payer_owner=e.owner,
                        funding=FundingKind.OWNED,
                        start=start,
                        end=start + timedelta(hours=1) if closed else None,
                        expected_end=start + timedelta(hours=72),
                    )
                )
    return usage_from_ledger(leases, caps, now=T0)


def build_requests(budgets: list[Budget], rng: random.Random, n: int) -> list[RunRequest]:
    owners = [b.owner for b in budgets if not b.owner.startswith("lab:")]
    out = []
    for i in range(n):
        borrow = rng.random() < 0.3
        out.append(
            RunRequest(
                key=("ns", f"run-{i}"),
                uid=f"u{i}",
                owner=rng.choice(owners),
                flavor=FLAVORS[rng.randrange(len(FLAVORS))],
                total_gpus=rng.choice((8, 16, 32, 64, 128, 256, 512)),
                group_gpus=8,
                spares_per_group=rng.choice((0, 0, 1)),
                selector={"region": rng.choice(REGIONS)} if rng.random() < 0.5 else {},
                allow_borrow=borrow,
                max_borrow_gpus=64 if borrow else None,
                sponsors=("lab:s0", "lab:s2") if borrow else (),
                max_duration=timedelta(hours=rng.choice((1, 4, 24))),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--baseline-calls", type=int, default=60)
    args = parser.parse_args()
    rng = random.Random(11)
    budgets = build_budgets(rng)
    usage = build_usage(budgets, rng)
    requests = build_requests(budgets, rng, args.calls)
    family = Family(budgets)

    it = iter(requests)
    warm = time_calls(lambda: cover(next(it), family, usage, now=T0), len(requests))
    emit(
        "cover_2000_envelopes",
        warm,
        target_p99_ms=5.0,
        envelopes=len(family.all_envelopes()),
        owners=len(family.owners()),
    )

    cold: list[float] = []
    for req in requests[: args.baseline_calls]:
        fresh = Family(budgets)
        cold.extend(time_calls(partial(cover, req, fresh, usage, now=T0), 1))
    emit("cover_2000_envelopes_cold_owner", cold, target_p99_ms=None, envelopes=ENVELOPES)

    naive_reqs = iter(requests[: args.baseline_calls])
    naive = time_calls(
        lambda: cover(next(naive_reqs), Family(budgets), usage, now=T0), args.baseline_calls
    )
    emit(
        "naive_cover_2000_envelopes",
        naive,
        target_p99_ms=None,
        baseline_for="cover_2000_envelopes",
        envelopes=ENVELOPES,
    )


if __name__ == "__main__":
    main()
