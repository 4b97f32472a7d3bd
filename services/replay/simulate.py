"""Trace-driven replay: the engine driven exactly as the services drive it, on a simulated clock.

Every decision is the function the services call — nothing here decides anything itself:

* arrival: ``try_start`` (admission); if blocked, ``forecast`` and the Reservation's claim
  (``intended_slice``, ``claim_gpus``, the Run's walltime) as the forecaster writes it, plus the
  expected start from the ledger-learnt durations (``shared.engine.durations``);
* every lease end: early start of Reserved Runs in ETA order (``try_start`` with the own claim
  exempt, as admission's early start);
* at ``earliestStart``: ``reforecast_instead`` for a conservative promise (the forecaster), else
  ``shared.control.activation.decide`` (the resolver) — Bind, or Resolve (its cuts applied: the
  Runs it ends are lost work), or Blocked (a broken promise: the Run is reserved again).

Runs end at their actual runtime, which the engine never sees: it only knows walltimes and the
ledger of completed Runs. A plain walltime-backfill ETA (``walltime_backfill_eta``: enough free
GPUs once running leases reach their walltime, ignoring budgets and queued Reservations) is
computed at every reservation as the in-run baseline.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from shared.control.activation import Outcome, Target, decide
from shared.control.reservations import claim_gpus, intended_slice, paying_envelope
from shared.engine.admit import Blocked, Start, try_start
from shared.engine.bindplan import LeaseIntent
from shared.engine.deficit import min_demand
from shared.engine.durations import DurationModel, add, expected_start
from shared.engine.forecast import (
    Confidence,
    forecast,
    reforecast_instead,
    walltime_backfill_eta,
)
from shared.engine.model import (
    Budget,
    Closure,
    Lease,
    Node,
    ReservationClaim,
    Role,
    RunKey,
    RunRequest,
)
from shared.engine.pack import PlacedSlice
from shared.engine.resolver import RANDOM_PREEMPT, Action
from shared.engine.state import ClusterState, Settings

NAMESPACE = "replay"
_ARRIVE, _END, _ACTIVATE = 1, 0, 2
"""Event order at one instant: lease ends first (they free room), then arrivals, then
activations (the binder's walltime ends and the forecaster's activation race in the services;
ends first is the outcome the resolver waits for)."""


@dataclass(frozen=True, slots=True)
class Job:
    """One arrival of a trace: who, when, how big, the walltime asked and the runtime it needs."""

    name: str
    owner: str
    arrival: timedelta
    """Offset from the trace's start."""
    gpus: int
    walltime: timedelta
    runtime: timedelta
    """What the Run really takes (capped at its walltime, where the binder would end it)."""
    group_gpus: int | None = None
    flavor: str = "H100-80GB"

    def request(self) -> RunRequest:
        return RunRequest(
            key=(NAMESPACE, self.name),
            uid=f"uid-{self.name}",
            owner=self.owner,
            flavor=self.flavor,
            total_gpus=self.gpus,
            group_gpus=self.group_gpus,
            max_duration=self.walltime,
        )


@dataclass(slots=True)
class JobResult:
    job: Job
    start: datetime | None = None
    first_eta: datetime | None = None
    first_confidence: Confidence | None = None
    first_expected: datetime | None = None
    first_baseline: datetime | None = None
    reservations: int = 0
    killed: bool = False


@dataclass(slots=True)
class _Reservation:
    name: str
    job: Job
    claim: ReservationClaim
    confidence: Confidence


@dataclass(slots=True)
class Figures:
    """What one replay measured (all computed from the simulated ledger)."""

    gpus: int
    jobs: int
    waited: int
    guaranteed_error: tuple[float, float]
    """p50, p90 of |guaranteed ETA − actual start| / wait, first promise of each waiting Run."""
    expected_error: tuple[float, float]
    baseline_error: tuple[float, float]
    activations: int
    broken: int
    """Activations at which the Run did not fit (Resolve or Blocked)."""
    reforecast: int
    early_starts: int
    reservations_per_reserved_run: float
    lottery_kills: int
    lottery_gpu_hours: float
    gpu_hours: float
    utilisation: float
    forecast_ms: tuple[float, float]
    forecast_cpu_ms: tuple[float, float]
    expected_ms: tuple[float, float]
    conservative_etas: int
    window_aligned_etas: int
    eta_count: int

    def as_dict(self) -> dict[str, object]:
        return {
            "fleet_gpus": self.gpus,
            "jobs": self.jobs,
            "waited": self.waited,
            "eta_error_guaranteed_p50_p90": [round(x, 2) for x in self.guaranteed_error],
            "eta_error_expected_p50_p90": [round(x, 2) for x in self.expected_error],
            "eta_error_walltime_backfill_baseline_p50_p90": [
                round(x, 2) for x in self.baseline_error
            ],
            "activations": self.activations,
            "promises_broken": self.broken,
            "promises_broken_share": round(self.broken / self.activations, 4)
            if self.activations
            else 0.0,
            "reforecast_conservative": self.reforecast,
            "early_starts": self.early_starts,
            "reservations_per_reserved_run": round(self.reservations_per_reserved_run, 2),
            "lottery_killed_runs": self.lottery_kills,
            "lottery_killed_gpu_hours": round(self.lottery_gpu_hours, 1),
            "lottery_killed_share": round(self.lottery_gpu_hours / self.gpu_hours, 4)
            if self.gpu_hours
            else 0.0,
            "utilisation": round(self.utilisation, 3),
            "forecast_ms_p50_p99": [round(x, 2) for x in self.forecast_ms],
            "forecast_cpu_ms_p50_p99": [round(x, 2) for x in self.forecast_cpu_ms],
            "expected_start_ms_p50_p99": [round(x, 2) for x in self.expected_ms],
            "etas": self.eta_count,
            "conservative_etas": self.conservative_etas,
            "window_aligned_etas": self.window_aligned_etas,
        }


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass(slots=True)
class Replay:
    """One replay of ``jobs`` on ``nodes`` paid by ``budgets`` from ``t0``."""

    nodes: tuple[Node, ...]
    budgets: tuple[Budget, ...]
    jobs: tuple[Job, ...]
    t0: datetime
    settings: Settings = field(default_factory=Settings)
    now: datetime = field(init=False)
    results: dict[str, JobResult] = field(init=False)
    open: dict[str, Lease] = field(init=False)
    running: dict[RunKey, RunRequest] = field(init=False)
    reserved: dict[str, _Reservation] = field(init=False)
    model: DurationModel = field(init=False)
    events: list[tuple[datetime, int, int, str]] = field(init=False)
    seq: itertools.count[int] = field(init=False)
    counters: dict[str, int] = field(init=False)
    lottery_gpu_hours: float = 0.0
    gpu_hours: float = 0.0
    forecast_ms: list[float] = field(init=False)
    forecast_cpu_ms: list[float] = field(init=False)
    """CPU time of the same calls: what a shared, loaded machine does not inflate."""
    expected_ms: list[float] = field(init=False)
    confidences: list[Confidence] = field(init=False)
    incarnation: dict[RunKey, int] = field(init=False)
    last_end: datetime = field(init=False)
    closed: list[Lease] = field(init=False)
    """Closed leases, kept only when some envelope or cap limits GPU-hours (they count there)."""
    hours_matter: bool = field(init=False)

    def __post_init__(self) -> None:
        self.now = self.t0
        self.last_end = self.t0
        self.results = {job.name: JobResult(job) for job in self.jobs}
        self.open, self.running, self.reserved = {}, {}, {}
        self.model = DurationModel()
        self.events, self.seq = [], itertools.count()
        self.counters = dict.fromkeys(
            ("activations", "broken", "reforecast", "early", "kills", "reservations"), 0
        )
        self.forecast_ms, self.expected_ms, self.confidences = [], [], []
        self.forecast_cpu_ms = []
        self.incarnation = {}
        self.closed = []
        self.hours_matter = any(
            e.max_gpu_hours is not None for b in self.budgets for e in b.envelopes
        ) or any(c.max_gpu_hours is not None for b in self.budgets for c in b.caps)
        for job in self.jobs:
            self._at(self.t0 + job.arrival, _ARRIVE, job.name)

    # ------------------------------------------------------------------ clock

    def _at(self, when: datetime, kind: int, key: str) -> None:
        heapq.heappush(self.events, (when, kind, next(self.seq), key))

    def state(self) -> ClusterState:
        claims = tuple(r.claim for r in self.reserved.values())
        return ClusterState.build(
            now=self.now,
            nodes=self.nodes,
            budgets=self.budgets,
            ledger=(*self.closed, *self.open.values()),
            runs=dict(self.running),
            claims=claims,
            settings=self.settings,
        )

    def run(self) -> Figures:
        jobs = {job.name: job for job in self.jobs}
        while self.events:
            when, kind, _, key = heapq.heappop(self.events)
            self.now = when
            if kind == _ARRIVE:
                self._arrive(jobs[key])
            elif kind == _END:
                self._end(key)
            else:
                self._activate(key)
        return self.figures()

    # ------------------------------------------------------------------ starts and ends

    def _start(self, job: Job, slices: Iterable[PlacedSlice | LeaseIntent]) -> None:
        key = (NAMESPACE, job.name)
        n = self.incarnation[key] = self.incarnation.get(key, 0) + 1
        for i, piece in enumerate(slices):
            name = f"{job.name}-{n}-{i}"
            self.open[name] = Lease(
                name=name,
                run=key,
                owner=job.owner,
                node=piece.node,
                gpus=piece.gpus,
                role=piece.role,
                group=piece.group,
                rank=piece.rank,
                envelope=piece.envelope,
                payer_owner=piece.payer_owner,
                funding=piece.funding,
                start=self.now,
                expected_end=self.now + job.walltime,
            )
        self.running[key] = job.request()
        self.results[job.name].start = self.now
        self._at(self.now + min(job.runtime, job.walltime), _END, f"{job.name}#{n}")

    def _close(self, run: RunKey, closure: str) -> list[Lease]:
        ended = [lease for lease in self.open.values() if lease.run == run]
        for lease in ended:
            del self.open[lease.name]
            if self.hours_matter:
                self.closed.append(replace(lease, end=self.now, closure=closure))
        self.running.pop(run, None)
        return ended

    def _end(self, token: str) -> None:
        name, _, n = token.partition("#")
        key = (NAMESPACE, name)
        if self.incarnation.get(key) != int(n) or key not in self.running:
            return  # ended already (cut at an activation)
        ended = self._close(key, Closure.COMPLETED.value)
        job = self.results[name].job
        working = sum(lease.gpus for lease in ended if lease.role is not Role.SPARE)
        self.gpu_hours += working * (self.now - ended[0].start).total_seconds() / 3600
        self.last_end = max(self.last_end, self.now)
        ratio = min(job.runtime, job.walltime) / job.walltime
        self.model = add(self.model, job.owner, ratio)
        self._early_starts()

    def _early_starts(self) -> None:
        """Reserved Runs in ETA order try to start on the room that just freed."""
        for resv in sorted(self.reserved.values(), key=lambda r: (r.claim.earliest_start, r.name)):
            request = resv.job.request()
            free = sum(self._free().values())
            if free < min_demand(request):
                continue
            got = try_start(request, self.state(), own_claim=resv.name)
            if isinstance(got, Start):
                del self.reserved[resv.name]
                self.counters["early"] += 1
                self._start(resv.job, got.placement.slices)

    def _free(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for lease in self.open.values():
            used[lease.node] = used.get(lease.node, 0) + lease.gpus
        return {n.name: n.gpus - used.get(n.name, 0) for n in self.nodes}

    # ------------------------------------------------------------------ reservations

    def _arrive(self, job: Job) -> None:
        request = job.request()
        state = self.state()
        got = try_start(request, state)
        if isinstance(got, Start):
            self._start(job, got.placement.slices)
            return
        self._reserve(job, request, state, got)

    def _reserve(self, job: Job, request: RunRequest, state: ClusterState, got: Blocked) -> None:
        result = self.results[job.name]
        result.reservations += 1
        self.counters["reservations"] += 1
        began, cpu = time.perf_counter(), time.process_time()
        fc = forecast(request, state, got)
        self.forecast_ms.append((time.perf_counter() - began) * 1000)
        self.forecast_cpu_ms.append((time.process_time() - cpu) * 1000)
        self.confidences.append(fc.confidence)
        began = time.perf_counter()
        guess = expected_start(request, state, self.model, fc.earliest_start)
        self.expected_ms.append((time.perf_counter() - began) * 1000)
        if result.first_eta is None:
            result.first_eta = fc.earliest_start
            result.first_confidence = fc.confidence
            result.first_expected = guess.at
            result.first_baseline = walltime_backfill_eta(request, state) or fc.earliest_start
        name = f"{job.name}-r{result.reservations}"
        _, nodes = intended_slice(fc, state.topology)
        claim = ReservationClaim(
            name=name,
            run=request.key,
            earliest_start=fc.earliest_start,
            nodes=nodes,
            gpus=claim_gpus(fc, request),
            envelope=paying_envelope(fc),
            duration=request.max_duration,
            owner=request.owner,
        )
        self.reserved[name] = _Reservation(name, job, claim, fc.confidence)
        self._at(fc.earliest_start, _ACTIVATE, name)

    def _activate(self, name: str) -> None:
        resv = self.reserved.get(name)
        if resv is None:
            return  # started early
        request = resv.job.request()
        state = self.state()
        if resv.confidence is Confidence.CONSERVATIVE:
            later = reforecast_instead(request, state, name)
            if later is not None:
                del self.reserved[name]
                self.counters["reforecast"] += 1
                blocked = try_start(request, state)
                assert isinstance(blocked, Blocked)
                self._reserve(resv.job, request, self.state(), blocked)
                return
        self.counters["activations"] += 1
        target = Target(NAMESPACE, name, f"uid-{name}", self.now, nodes=resv.claim.nodes)
        act = decide(request, state, target, settle=False)
        del self.reserved[name]
        if act.outcome is Outcome.BIND and act.intent is not None:
            self._bind(resv.job, act.intent.leases)
            return
        self.counters["broken"] += 1
        if act.outcome is Outcome.RESOLVE and act.intent is not None:
            assert act.resolution is not None
            self._cut(act.resolution.actions)
            self._bind(resv.job, act.intent.leases)
            return
        after = self.state()
        again = try_start(request, after)
        if isinstance(again, Start):
            self._start(resv.job, again.placement.slices)
        else:
            self._reserve(resv.job, request, after, again)

    def _bind(self, job: Job, leases: Iterable[LeaseIntent]) -> None:
        """Open the leases of an activation's bind (the binder's commit)."""
        self._start(job, tuple(leases))

    def _cut(self, actions: Iterable[Action]) -> None:
        """End the Runs an activation cut; what they had run is lost work."""
        for action in actions:
            run = action.run
            if run not in self.running:
                continue
            ended = self._close(run, action.closure)
            hours = sum(
                x.gpus * (self.now - x.start).total_seconds() / 3600
                for x in ended
                if x.role is not Role.SPARE
            )
            self.gpu_hours += hours
            if action.kind == RANDOM_PREEMPT:
                self.counters["kills"] += 1
                self.lottery_gpu_hours += hours
            self.results[run[1]].killed = True

    # ------------------------------------------------------------------ figures

    def figures(self) -> Figures:
        waited = [r for r in self.results.values() if r.first_eta is not None and r.start]
        errors: dict[str, list[float]] = {"g": [], "e": [], "b": []}
        for r in waited:
            assert r.start is not None and r.first_eta is not None
            wait = (r.start - (self.t0 + r.job.arrival)).total_seconds()
            if wait <= 0:
                continue
            for k, eta in (("g", r.first_eta), ("e", r.first_expected), ("b", r.first_baseline)):
                assert eta is not None
                errors[k].append(abs((eta - r.start).total_seconds()) / wait)
        total = sum(n.gpus for n in self.nodes)
        span = (self.last_end - self.t0).total_seconds() / 3600
        reserved_runs = sum(1 for r in self.results.values() if r.reservations)
        return Figures(
            gpus=total,
            jobs=len(self.jobs),
            waited=len(errors["g"]),
            guaranteed_error=(_pct(errors["g"], 0.5), _pct(errors["g"], 0.9)),
            expected_error=(_pct(errors["e"], 0.5), _pct(errors["e"], 0.9)),
            baseline_error=(_pct(errors["b"], 0.5), _pct(errors["b"], 0.9)),
            activations=self.counters["activations"],
            broken=self.counters["broken"],
            reforecast=self.counters["reforecast"],
            early_starts=self.counters["early"],
            reservations_per_reserved_run=(
                self.counters["reservations"] / reserved_runs if reserved_runs else 0.0
            ),
            lottery_kills=self.counters["kills"],
            lottery_gpu_hours=self.lottery_gpu_hours,
            gpu_hours=self.gpu_hours,
            utilisation=self.gpu_hours / (total * span) if span > 0 else 0.0,
            forecast_ms=(_pct(self.forecast_ms, 0.5), _pct(self.forecast_ms, 0.99)),
            forecast_cpu_ms=(_pct(self.forecast_cpu_ms, 0.5), _pct(self.forecast_cpu_ms, 0.99)),
            expected_ms=(_pct(self.expected_ms, 0.5), _pct(self.expected_ms, 0.99)),
            conservative_etas=sum(c is Confidence.CONSERVATIVE for c in self.confidences),
            window_aligned_etas=sum(c is Confidence.WINDOW_ALIGNED for c in self.confidences),
            eta_count=len(self.confidences),
        )
