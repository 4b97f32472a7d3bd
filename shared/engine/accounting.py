"""Ledger arithmetic: budget usage derived from Leases only (SPEC §3 Accounting).

Concurrency u_e(t) is the GPUs of leases paid by envelope e that are alive at t; GPU-hours U_e is
the integral of lease intervals up to t, spare leases weighted by ``spare_factor``. Two ways to get
there must agree exactly — a full replay (:func:`usage_from_ledger`) and an incremental
:class:`UsageTracker` a service keeps — so both reduce every lease to the same integer accumulators
(GPU-microseconds) and build the snapshot with one shared function. Integers make the agreement
exact rather than approximately-equal floats.

Besides consumption, a snapshot carries what open leases have *committed* (GPU-hours until their
``expected_end``, i.e. start + maxDuration) and how many open GPUs have no expected end. Cover needs
both to avoid promising the same GPU-hours twice to runs admitted back to back.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, NamedTuple

from shared.engine.model import AggregateCap, Envelope, FundingKind, Lease, Role

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
US_PER_HOUR = 3_600_000_000
_NEVER = -(1 << 62)

# Accumulator slots of one bucket (all ints, so replay and increments agree exactly).
_CONC, _CLOSED, _OPEN_G, _OPEN_GS, _BND_G, _BND_GE, _UNB_G = range(7)
_SLOTS = 7
# Buckets per envelope: funding kind (owned, family, sponsor) × (active, spare).
_BUCKETS = 6


def to_us(t: datetime) -> int:
    """Exact microseconds since the epoch; naive datetimes are taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // _US


_OWNED, _FAMILY, _SPARE = FundingKind.OWNED, FundingKind.FAMILY, Role.SPARE


def _bucket(lease: Lease) -> int:
    """Bucket index; identity tests because Enum.__hash__ is slow on a million-lease replay."""
    f = lease.funding
    base = 0 if f is _OWNED else 2 if f is _FAMILY else 4
    return base + 1 if lease.role is _SPARE else base


def _new_acc() -> list[list[int]]:
    return [[0] * _SLOTS for _ in range(_BUCKETS)]


class UsageClass(StrEnum):
    """Exclusive split of an envelope's usage for Budget status and metrics (sums to total)."""

    OWNED = "owned"
    SHARED = "shared"
    BORROWED_OUT = "borrowed-out"
    SPARE = "spare"


class Meter(NamedTuple):
    """One slice of usage at the snapshot instant (a tuple: snapshots build thousands)."""

    gpus: int = 0
    """GPUs of leases alive now."""
    gpu_hours: float = 0.0
    """GPU-hours consumed up to now (spares × spare_factor)."""
    committed_gpu_hours: float = 0.0
    """GPU-hours open leases will still consume until their expected end (spares × factor)."""
    unbounded_gpus: int = 0
    """Open GPUs with no expected end (no maxDuration): their future use is unknown."""


ZERO = Meter()


class EnvelopeUsage(NamedTuple):
    """Usage of one envelope: the total, its exclusive class split, and lending totals."""

    total: Meter = ZERO
    owned: Meter = ZERO
    """Paid for the envelope owner's own runs (not spares)."""
    shared: Meter = ZERO
    """Paid for relatives through family sharing (not spares)."""
    borrowed_out: Meter = ZERO
    """Lent to sponsees (not spares)."""
    spare: Meter = ZERO
    """Spare leases, whoever the borrower."""
    lent: Meter = ZERO
    """Everything lent to sponsees, spares included: what lending sub-caps bound."""

    def by_class(self, cls: UsageClass) -> Meter:
        """Meter of one exclusive class."""
        if cls is UsageClass.OWNED:
            return self.owned
        if cls is UsageClass.SHARED:
            return self.shared
        if cls is UsageClass.BORROWED_OUT:
            return self.borrowed_out
        return self.spare


EMPTY_USAGE = EnvelopeUsage()


@dataclass(frozen=True, slots=True)
class Usage:
    """Immutable usage snapshot at ``now``; missing keys mean zero usage."""

    now: datetime
    spare_factor: float
    envelopes: Mapping[str, EnvelopeUsage]
    caps: Mapping[str, Meter]

    def envelope(self, key: str) -> EnvelopeUsage:
        """Usage of one envelope (zero when it never paid a lease)."""
        return self.envelopes.get(key, EMPTY_USAGE)

    def cap(self, key: str) -> Meter:
        """Usage under one aggregate cap (sum of its envelopes' totals)."""
        return self.caps.get(key, ZERO)

    def concurrency(self, key: str) -> int:
        """GPUs currently paid by the envelope."""
        return self.envelope(key).total.gpus

    def gpu_hours(self, key: str) -> float:
        """GPU-hours consumed by the envelope up to ``now``."""
        return self.envelope(key).total.gpu_hours


def _meter(rows: Iterable[list[int]], spare: bool, now_us: int, factor: float) -> Meter:
    """Fold integer buckets of one weight into a Meter."""
    conc = unb = used = com = 0
    for acc in rows:
        conc += acc[_CONC]
        unb += acc[_UNB_G]
        used += acc[_CLOSED] + now_us * acc[_OPEN_G] - acc[_OPEN_GS]
        com += acc[_BND_GE] - now_us * acc[_BND_G]
    if spare:
        return Meter(conc, used * factor / US_PER_HOUR, com * factor / US_PER_HOUR, unb)
    return Meter(conc, used / US_PER_HOUR, com / US_PER_HOUR, unb)


def _mix(full: Meter, spare: Meter) -> Meter:
    """Sum of a full-rate and a spare-rate meter (floats added in one fixed order)."""
    return Meter(
        full.gpus + spare.gpus,
        full.gpu_hours + spare.gpu_hours,
        full.committed_gpu_hours + spare.committed_gpu_hours,
        full.unbounded_gpus + spare.unbounded_gpus,
    )


def _build(
    accs: Mapping[str, list[list[int]]],
    caps: Iterable[AggregateCap],
    now: datetime,
    now_us: int,
    factor: float,
) -> Usage:
    """The one place integer accumulators become a snapshot (replay and tracker share it)."""
    envs: dict[str, EnvelopeUsage] = {}
    for key in sorted(accs):
        b = accs[key]
        owned = _meter((b[0],), False, now_us, factor)
        shared = _meter((b[2],), False, now_us, factor)
        lent_full = _meter((b[4],), False, now_us, factor)
        lent_spare = _meter((b[5],), True, now_us, factor)
        spare = _meter((b[1], b[3], b[5]), True, now_us, factor)
        full = _meter((b[0], b[2], b[4]), False, now_us, factor)
        envs[key] = EnvelopeUsage(
            total=_mix(full, spare),
            owned=owned,
            shared=shared,
            borrowed_out=lent_full,
            spare=spare,
            lent=_mix(lent_full, lent_spare),
        )
    cap_usage: dict[str, Meter] = {}
    for cap in caps:
        keys = (ref if "/" in ref else f"{cap.budget}/{ref}" for ref in cap.envelopes)
        members = [acc for k in dict.fromkeys(keys) if (acc := accs.get(k)) is not None]
        cap_usage[cap.key] = _mix(
            _meter((m[i] for m in members for i in (0, 2, 4)), False, now_us, factor),
            _meter((m[i] for m in members for i in (1, 3, 5)), True, now_us, factor),
        )
    return Usage(
        now=now,
        spare_factor=factor,
        envelopes=MappingProxyType(envs),
        caps=MappingProxyType(cap_usage),
    )


class Settled:
    """The closed part of a ledger, summed once: an ended lease adds the same GPU-hours to every
    later snapshot, so a long-lived cache keeps their totals here and a snapshot replays only the
    open leases (``usage_from_ledger(open, settled=...)``). Adding a lease again is a no-op."""

    __slots__ = ("_accs", "_leases", "latest_end")

    def __init__(self) -> None:
        self._accs: dict[str, list[list[int]]] = {}
        self._leases: dict[str, Lease] = {}
        self.latest_end = _NEVER
        """Latest end (µs) among the leases; snapshots before it must replay them instead."""

    def __contains__(self, name: object) -> bool:
        return name in self._leases

    def _apply(self, lease: Lease, sign: int) -> None:
        assert lease.end is not None
        acc = self._accs.get(lease.envelope)
        if acc is None:
            acc = self._accs[lease.envelope] = _new_acc()
        acc[_bucket(lease)][_CLOSED] += sign * lease.gpus * (to_us(lease.end) - to_us(lease.start))

    def add(self, lease: Lease) -> None:
        """Record an ended lease (``lease.end`` set)."""
        if lease.end is None:
            raise ValueError(f"lease {lease.name} is open: only ended leases are settled")
        if lease.name in self._leases:
            return
        self._leases[lease.name] = lease
        self._apply(lease, 1)
        self.latest_end = max(self.latest_end, to_us(lease.end))

    def discard(self, name: str) -> None:
        """Forget a lease (its object was deleted); ``latest_end`` stays as a safe bound."""
        lease = self._leases.pop(name, None)
        if lease is not None:
            self._apply(lease, -1)

    def leases(self) -> Iterable[Lease]:
        return self._leases.values()

    def accumulators(self) -> dict[str, list[list[int]]]:
        """A copy to build a snapshot on."""
        return {key: [list(row) for row in acc] for key, acc in self._accs.items()}


def usage_from_ledger(
    leases: Iterable[Lease],
    caps: Iterable[AggregateCap] = (),
    *,
    now: datetime,
    spare_factor: float = 1.0,
    settled: Settled | None = None,
) -> Usage:
    """Full replay of the ledger at ``now``: the reference every other figure must equal.

    Leases starting after ``now`` are ignored; leases ending after ``now`` count as alive.
    The ledger is assumed well formed (end ≥ start), as the binder guarantees. With
    ``settled``, ``leases`` are the rest of the ledger and the settled totals are used as they
    are, unless one of them ends after ``now`` (then they are replayed like the others).
    """
    now_us = to_us(now)
    accs: dict[str, list[list[int]]] = {}
    if settled is not None:
        if settled.latest_end <= now_us:
            accs = settled.accumulators()
        else:
            leases = (*settled.leases(), *leases)
    for lease in leases:
        s = to_us(lease.start)
        if s > now_us:
            continue
        acc = accs.get(lease.envelope)
        if acc is None:
            acc = accs[lease.envelope] = _new_acc()
        a = acc[_bucket(lease)]
        g = lease.gpus
        if lease.end is not None:
            e = to_us(lease.end)
            if e <= now_us:
                a[_CLOSED] += g * (e - s)
                continue
        a[_CONC] += g
        a[_OPEN_G] += g
        a[_OPEN_GS] += g * s
        if lease.expected_end is None:
            a[_UNB_G] += g
        else:
            x = to_us(lease.expected_end)
            if x > now_us:
                a[_BND_G] += g
                a[_BND_GE] += g * x
    return _build(accs, tuple(caps), now, now_us, spare_factor)


class UsageTracker:
    """Incremental ledger for a long-lived service; ``snapshot`` equals a full replay.

    Events must arrive in non-decreasing snapshot order: ``snapshot(now)`` needs ``now`` at or
    after every recorded start/end and every earlier snapshot (expected ends that passed are
    retired from the commitment once, which is what makes snapshots O(envelopes)).
    Re-opening a known lease and re-closing a closed one are no-ops (commits may be re-sent).
    """

    __slots__ = ("_accs", "_caps", "_closed", "_factor", "_heap", "_horizon", "_latest", "_open")

    def __init__(self, caps: Iterable[AggregateCap] = (), *, spare_factor: float = 1.0) -> None:
        self._caps = tuple(caps)
        self._factor = spare_factor
        self._accs: dict[str, list[list[int]]] = {}
        self._open: dict[str, tuple[Lease, int, int, list[int]]] = {}
        """name → (lease, start µs, expected end µs while committed else _NEVER, its bucket)."""
        self._closed: set[str] = set()
        self._heap: list[tuple[int, str]] = []
        self._horizon = _NEVER
        """Latest snapshot instant (µs): expected ends at or before it are no longer committed."""
        self._latest = _NEVER
        """Latest event instant (µs): a snapshot may not be taken before it."""

    @property
    def open_leases(self) -> tuple[Lease, ...]:
        """Leases currently open, by name."""
        return tuple(self._open[n][0] for n in sorted(self._open))

    def set_caps(self, caps: Iterable[AggregateCap]) -> None:
        """Replace the aggregate caps (Budgets changed); usage itself is unaffected."""
        self._caps = tuple(caps)

    def _bucket_of(self, lease: Lease) -> list[int]:
        acc = self._accs.get(lease.envelope)
        if acc is None:
            acc = self._accs[lease.envelope] = _new_acc()
        return acc[_bucket(lease)]

    def open(self, lease: Lease) -> None:
        """Record a lease; a lease that already has an end is recorded closed."""
        name = lease.name
        if name in self._open or name in self._closed:
            return
        s = to_us(lease.start)
        if s > self._latest:
            self._latest = s
        a = self._bucket_of(lease)
        g = lease.gpus
        if lease.end is not None:
            e = to_us(lease.end)
            if e < s:
                raise ValueError(f"lease {name} ends before it starts")
            if e > self._latest:
                self._latest = e
            a[_CLOSED] += g * (e - s)
            self._closed.add(name)
            return
        a[_CONC] += g
        a[_OPEN_G] += g
        a[_OPEN_GS] += g * s
        x = _NEVER
        if lease.expected_end is None:
            a[_UNB_G] += g
        else:
            xe = to_us(lease.expected_end)
            if xe > self._horizon:
                x = xe
                a[_BND_G] += g
                a[_BND_GE] += g * xe
                heapq.heappush(self._heap, (xe, name))
        self._open[name] = (lease, s, x, a)

    def close(self, lease_key: str, at: datetime) -> None:
        """Close an open lease at ``at``; closing a closed lease again is a no-op."""
        if lease_key in self._closed:
            return
        lease, s, x, a = self._open[lease_key]
        e = to_us(at)
        if e < s:
            raise ValueError(f"lease {lease_key} closed before it started")
        del self._open[lease_key]
        if e > self._latest:
            self._latest = e
        g = lease.gpus
        a[_CONC] -= g
        a[_OPEN_G] -= g
        a[_OPEN_GS] -= g * s
        a[_CLOSED] += g * (e - s)
        if lease.expected_end is None:
            a[_UNB_G] -= g
        elif x != _NEVER:
            a[_BND_G] -= g
            a[_BND_GE] -= g * x
        self._closed.add(lease_key)

    def snapshot(self, now: datetime) -> Usage:
        """Usage at ``now`` (≥ every event and earlier snapshot), equal to a full replay."""
        now_us = to_us(now)
        if now_us < self._latest:
            raise ValueError("snapshot earlier than a recorded lease event")
        if now_us < self._horizon:
            raise ValueError("snapshot earlier than a previous snapshot")
        heap = self._heap
        while heap and heap[0][0] <= now_us:
            xe, name = heapq.heappop(heap)
            entry = self._open.get(name)
            if entry is None or entry[2] != xe:
                continue  # closed meanwhile: already removed from the commitment
            lease, s, _, a = entry
            a[_BND_G] -= lease.gpus
            a[_BND_GE] -= lease.gpus * xe
            self._open[name] = (lease, s, _NEVER, a)
        self._horizon = now_us
        return _build(self._accs, self._caps, now, now_us, self._factor)


# -- per-Run funding (Run status.funding) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SponsorFunding:
    """One relative or sponsor paying part of a Run."""

    owner: str
    kind: FundingKind
    """FAMILY or SPONSOR (owned leases have no row)."""
    gpus: int
    gpu_hours: float


@dataclass(frozen=True, slots=True)
class RunFunding:
    """Who pays a Run: GPUs of live leases and GPU-hours of all its leases, by relation."""

    owned_gpus: int = 0
    owned_gpu_hours: float = 0.0
    shared_gpus: int = 0
    shared_gpu_hours: float = 0.0
    borrowed_gpus: int = 0
    borrowed_gpu_hours: float = 0.0
    sponsors: tuple[SponsorFunding, ...] = ()

    def as_status(self) -> dict[str, Any]:
        """The Run ``status.funding`` shape of SPEC §2 (camelCase keys)."""
        return {
            "ownedGPUs": self.owned_gpus,
            "ownedGPUHours": self.owned_gpu_hours,
            "sharedGPUs": self.shared_gpus,
            "sharedGPUHours": self.shared_gpu_hours,
            "borrowedGPUs": self.borrowed_gpus,
            "borrowedGPUHours": self.borrowed_gpu_hours,
            "sponsors": [
                {"owner": s.owner, "kind": s.kind.value, "gpus": s.gpus, "gpuHours": s.gpu_hours}
                for s in self.sponsors
            ],
        }


def run_funding(
    leases_of_run: Iterable[Lease], *, now: datetime, spare_factor: float = 1.0
) -> RunFunding:
    """Split one Run's leases into owned / shared (family) / borrowed (sponsor).

    GPUs count leases alive at ``now`` (spares fully); GPU-hours integrate every lease up to
    ``now`` with spares × ``spare_factor``. Rows are family first, then sponsors, by owner.
    """
    now_us = to_us(now)
    gpus = {k: 0 for k in FundingKind}
    used = {k: [0, 0] for k in FundingKind}  # [full µs, spare µs]
    rows: dict[tuple[FundingKind, str], list[int]] = {}  # → [gpus, full µs, spare µs]
    for lease in leases_of_run:
        s = to_us(lease.start)
        if s > now_us:
            continue
        end = now_us if lease.end is None else min(to_us(lease.end), now_us)
        alive = lease.end is None or to_us(lease.end) > now_us
        g_us = lease.gpus * max(0, end - s)
        slot = 1 if lease.role is Role.SPARE else 0
        used[lease.funding][slot] += g_us
        if alive:
            gpus[lease.funding] += lease.gpus
        if lease.funding is not FundingKind.OWNED:
            row = rows.setdefault((lease.funding, lease.payer_owner), [0, 0, 0])
            row[1 + slot] += g_us
            if alive:
                row[0] += lease.gpus

    def hours(full: int, spare: int) -> float:
        return (full + spare * spare_factor) / US_PER_HOUR

    order = {FundingKind.FAMILY: 0, FundingKind.SPONSOR: 1}
    sponsors = tuple(
        SponsorFunding(owner=owner, kind=kind, gpus=r[0], gpu_hours=hours(r[1], r[2]))
        for (kind, owner), r in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
    )
    return RunFunding(
        owned_gpus=gpus[FundingKind.OWNED],
        owned_gpu_hours=hours(*used[FundingKind.OWNED]),
        shared_gpus=gpus[FundingKind.FAMILY],
        shared_gpu_hours=hours(*used[FundingKind.FAMILY]),
        borrowed_gpus=gpus[FundingKind.SPONSOR],
        borrowed_gpu_hours=hours(*used[FundingKind.SPONSOR]),
        sponsors=sponsors,
    )


# -- headroom (Budget status) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Headroom:
    """What an envelope or aggregate cap can still pay."""

    concurrency_gpus: int | None
    """GPUs it can still pay concurrently (never negative); None only for an aggregate cap with
    no concurrency bound."""
    gpu_hours: float | None
    """GPU-hours not yet consumed; None when the bound is unlimited."""
    window_open: bool = True
    """False before ``start`` (figures show what will be available) and after ``end``."""


def headroom(envelope: Envelope, usage: Usage, now: datetime) -> Headroom:
    """Headroom of one envelope for Budget status; a closed window has none left."""
    if envelope.end is not None and now >= envelope.end:
        return Headroom(0, None if envelope.max_gpu_hours is None else 0.0, window_open=False)
    used = usage.envelope(envelope.key).total
    hours = (
        None
        if envelope.max_gpu_hours is None
        else max(0.0, envelope.max_gpu_hours - used.gpu_hours)
    )
    return Headroom(
        concurrency_gpus=max(0, envelope.concurrency - used.gpus),
        gpu_hours=hours,
        window_open=envelope.start is None or now >= envelope.start,
    )


def cap_headroom(cap: AggregateCap, usage: Usage) -> Headroom:
    """Headroom of an aggregate cap; unset bounds report None (unlimited)."""
    used = usage.cap(cap.key)
    conc = None if cap.max_concurrency is None else max(0, cap.max_concurrency - used.gpus)
    hours = None if cap.max_gpu_hours is None else max(0.0, cap.max_gpu_hours - used.gpu_hours)
    return Headroom(concurrency_gpus=conc, gpu_hours=hours)
