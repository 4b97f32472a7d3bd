"""Ledger replay at scale (``python -m bench.bench_accounting``): one JSON line per figure.

The ledger: 600,000 leases over 2,000 envelopes (10 % spares, a mix of owned/family/sponsor
funding, most with an expected end), 400,000 of them closed — 1,000,000 lease events in all
(600,000 opens + 400,000 closes).

Figures:

* ``replay_1m_lease_events`` — ``usage_from_ledger`` over that ledger (the full replay every
  Budget status must equal). Target ≤ 10 s (10,000 ms).
* ``tracker_1m_lease_events`` — the same 1,000,000 events fed one by one to ``UsageTracker`` and
  one final snapshot (what a service pays to rebuild from a list+watch).
* ``tracker_snapshot_2000_envelopes`` — one ``UsageTracker.snapshot`` on that state.
* ``naive_replay_1m_lease_events`` — baseline measured in the same run: the textbook replay with
  float datetime arithmetic per lease into per-envelope sums, no integer accumulators, no caps,
  no split. It is a floor for the work, not a rival: it computes far less.

The tracker and the replay must agree exactly; the bench checks it before printing.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from bench.common import emit, time_calls
from shared.engine.accounting import UsageTracker, usage_from_ledger
from shared.engine.model import AggregateCap, FundingKind, Lease, Role

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ENVELOPES = 2000
HOUR = timedelta(hours=1)


def build_ledger(n_leases: int, n_closed: int, rng: random.Random) -> tuple[list[Lease], datetime]:
    """Leases starting over ~30 days; the first ``n_closed`` (by start) get an end."""
    envs = [f"b{i // 4}/e{i % 4}" for i in range(ENVELOPES)]
    fundings = (FundingKind.OWNED,) * 6 + (FundingKind.FAMILY,) * 3 + (FundingKind.SPONSOR,)
    leases: list[Lease] = []
    t = T0
    step = timedelta(days=30) / n_leases
    closed = set(rng.sample(range(n_leases), n_closed))
    for i in range(n_leases):
        t += step
        dur = timedelta(minutes=rng.randint(5, 48 * 60))
        leases.append(
            Lease(
                name=f"l{i}",
                run=("ns", f"r{i // 8}"),
                owner="org:a",
                node=f"n{i % 5000}",
                gpus=rng.choice((1, 2, 4, 8)),
                role=Role.SPARE if rng.random() < 0.1 else Role.ACTIVE,
                group=0,
                rank=i % 8,
                envelope=envs[rng.randrange(ENVELOPES)],
                payer_owner="org:a",
                funding=fundings[rng.randrange(len(fundings))],
                start=t,
                end=t + dur if i in closed else None,
                expected_end=t + 2 * dur if rng.random() < 0.8 else None,
            )
        )
    latest = max(ls.end or ls.start for ls in leases)
    return leases, latest + HOUR


def caps_for_bench() -> list[AggregateCap]:
    return [
        AggregateCap(
            budget=f"b{b}",
            name="all",
            flavor="H100-80GB",
            envelopes=tuple(f"b{b}/e{k}" for k in range(4)),
            max_concurrency=64,
        )
        for b in range(ENVELOPES // 4)
    ]


def naive_replay(leases: list[Lease], now: datetime, factor: float) -> dict[str, float]:
    """Baseline: per-lease float hours into a dict, nothing else."""
    hours: dict[str, float] = {}
    for ls in leases:
        end = ls.end if ls.end is not None and ls.end < now else now
        h = ls.gpus * (end - ls.start) / HOUR
        if ls.role is Role.SPARE:
            h *= factor
        hours[ls.envelope] = hours.get(ls.envelope, 0.0) + h
    return hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leases", type=int, default=600_000)
    parser.add_argument("--closed", type=int, default=400_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(5)
    leases, now = build_ledger(args.leases, args.closed, rng)
    caps = caps_for_bench()
    events = args.leases + args.closed
    factor = 0.5

    replayed = usage_from_ledger(leases, caps, now=now, spare_factor=factor)
    samples = time_calls(
        lambda: usage_from_ledger(leases, caps, now=now, spare_factor=factor), args.repeat
    )
    emit(
        "replay_1m_lease_events",
        samples,
        target_ms=10_000.0,
        events=events,
        envelopes=len(replayed.envelopes),
    )

    # Event stream: opens in start order, each close once its time comes.
    stream: list[tuple[datetime, int, Lease]] = [(ls.start, 0, ls) for ls in leases]
    stream += [(ls.end, 1, ls) for ls in leases if ls.end is not None]
    stream.sort(key=lambda ev: (ev[0], ev[1]))
    opens = [replace(ls, end=None) for ls in leases]
    by_name = {ls.name: o for ls, o in zip(leases, opens, strict=True)}

    def feed() -> UsageTracker:
        tracker = UsageTracker(caps, spare_factor=factor)
        for at, kind, ls in stream:
            if kind == 0:
                tracker.open(by_name[ls.name])
            else:
                tracker.close(ls.name, at)
        return tracker

    tracker_samples: list[float] = []
    tracker = feed()
    for _ in range(args.repeat):
        start = time.perf_counter()
        tracker = feed()
        snap = tracker.snapshot(now)
        tracker_samples.append((time.perf_counter() - start) * 1000.0)
    assert snap == replayed, "tracker and replay disagree"
    emit("tracker_1m_lease_events", tracker_samples, target_ms=10_000.0, events=events)

    later = [now + timedelta(seconds=i) for i in range(1, 51)]
    it = iter(later)
    emit(
        "tracker_snapshot_2000_envelopes",
        time_calls(lambda: tracker.snapshot(next(it)), len(later)),
        target_ms=None,
        open_leases=args.leases - args.closed,
    )

    emit(
        "naive_replay_1m_lease_events",
        time_calls(lambda: naive_replay(leases, now, factor), args.repeat),
        target_ms=None,
        baseline_for="replay_1m_lease_events",
        events=events,
    )


if __name__ == "__main__":
    main()
