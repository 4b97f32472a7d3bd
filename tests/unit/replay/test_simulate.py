"""The replay drives the engine as the services do; on a trace where walltimes hold, every promise
holds and the lottery never runs."""

from __future__ import annotations

from datetime import timedelta

from bench.bench_replay import T0, budgets, fleet, trace
from services.replay.simulate import Job, Replay
from shared.engine.state import Settings


def replay(jobs: tuple[Job, ...], gpus: int = 256) -> Replay:
    return Replay(
        fleet(gpus), budgets(gpus), jobs, T0, Settings(conservative_lead=timedelta(hours=24))
    )


def test_promises_hold_and_nobody_is_killed_when_walltimes_hold() -> None:
    r = replay(trace(256, 60))
    figures = r.run()
    assert figures.jobs == 60
    assert all(result.start is not None for result in r.results.values())
    assert figures.broken == 0
    assert figures.lottery_kills == 0 and figures.lottery_gpu_hours == 0
    assert figures.waited > 0  # the trace does queue
    assert 0 < figures.utilisation <= 1
    # Every waiting Run started no later than its first guaranteed ETA.
    for result in r.results.values():
        if result.first_eta is not None:
            assert result.start is not None and result.start <= result.first_eta
            assert result.first_expected is not None and result.first_expected <= result.first_eta


def test_runs_that_use_their_whole_walltime_start_at_their_eta() -> None:
    """Runtimes equal to walltimes: each Reserved Run starts exactly at its ETA (the lease end at
    that instant starts it, as admission's early start does, before activation is due)."""
    jobs = tuple(
        Job(
            f"j{i}",
            "org:ai:team-0",
            timedelta(minutes=i),
            128,
            timedelta(hours=2),
            timedelta(hours=2),
            8,
        )
        for i in range(5)
    )
    r = replay(jobs)
    figures = r.run()
    assert figures.broken == 0 and figures.early_starts == 3
    starts = sorted(result.start for result in r.results.values() if result.start)
    assert [s - T0 for s in starts] == [
        timedelta(0),
        timedelta(minutes=1),
        timedelta(hours=2),
        timedelta(hours=2, minutes=1),
        timedelta(hours=4),
    ]
    for result in r.results.values():
        assert result.first_eta in (None, result.start)


def test_the_replay_is_deterministic() -> None:
    a = replay(trace(256, 30)).run().as_dict()
    b = replay(trace(256, 30)).run().as_dict()
    for key in ("forecast_ms_p50_p99", "forecast_cpu_ms_p50_p99", "expected_start_ms_p50_p99"):
        a.pop(key), b.pop(key)
    assert a == b
