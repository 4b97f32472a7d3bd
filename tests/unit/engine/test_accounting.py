"""Ledger arithmetic: replay, increments, per-run funding and headroom."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.accounting import (
    Settled,
    UsageClass,
    UsageTracker,
    cap_headroom,
    headroom,
    run_funding,
    usage_from_ledger,
)
from shared.engine.model import FundingKind, Lease, Role
from tests.unit.engine.budgets import T0, budget, cap, env, lease

H = timedelta(hours=1)
K = "b/e"


def test_concurrency_counts_open_leases_and_spares_fully() -> None:
    leases = [
        lease("a", K, 8, T0),
        lease("b", K, 4, T0, role=Role.SPARE),
        lease("c", K, 2, T0, end=T0 + H),
    ]
    u = usage_from_ledger(leases, now=T0 + 2 * H)
    assert u.concurrency(K) == 12
    assert u.concurrency("other/x") == 0


def test_gpu_hours_integrate_intervals_with_spare_factor() -> None:
    leases = [
        lease("a", K, 8, T0),  # open: 8 × 2 h
        lease("b", K, 4, T0, role=Role.SPARE),  # open spare: 4 × 2 h × 0.5
        lease("c", K, 2, T0, end=T0 + H),  # closed: 2 × 1 h
    ]
    u = usage_from_ledger(leases, now=T0 + 2 * H, spare_factor=0.5)
    assert u.gpu_hours(K) == pytest.approx(16 + 4 + 2)
    assert u.envelope(K).spare.gpu_hours == pytest.approx(4)


def test_replay_at_a_past_instant_clips_to_now() -> None:
    leases = [
        lease("a", K, 8, T0, end=T0 + 3 * H),
        lease("b", K, 4, T0 + 5 * H),  # not started yet at now
    ]
    u = usage_from_ledger(leases, now=T0 + H)
    assert u.concurrency(K) == 8  # ends after now: alive at now
    assert u.gpu_hours(K) == pytest.approx(8)


def test_class_split_is_exclusive_and_lent_includes_spares() -> None:
    leases = [
        lease("o", K, 8, T0, funding=FundingKind.OWNED),
        lease("f", K, 4, T0, funding=FundingKind.FAMILY, payer_owner="org:p"),
        lease("s", K, 2, T0, funding=FundingKind.SPONSOR, payer_owner="org:x"),
        lease("ss", K, 1, T0, funding=FundingKind.SPONSOR, role=Role.SPARE),
        lease("os", K, 16, T0, funding=FundingKind.OWNED, role=Role.SPARE),
    ]
    u = usage_from_ledger(leases, now=T0 + H).envelope(K)
    assert u.owned.gpus == 8
    assert u.shared.gpus == 4
    assert u.borrowed_out.gpus == 2
    assert u.spare.gpus == 17
    assert sum(u.by_class(c).gpus for c in UsageClass) == u.total.gpus == 31
    assert sum(u.by_class(c).gpu_hours for c in UsageClass) == pytest.approx(u.total.gpu_hours)
    assert u.lent.gpus == 3
    assert u.lent.gpu_hours == pytest.approx(3)


def test_aggregate_cap_usage_sums_its_envelopes() -> None:
    b = budget("org:a", env("e1", 8), env("e2", 8), env("e3", 8), caps=[cap("c", ["e1", "e2"])])
    leases = [
        lease("1", "org-a/e1", 2, T0),
        lease("2", "org-a/e2", 3, T0, end=T0 + H),
        lease("3", "org-a/e3", 5, T0),
    ]
    u = usage_from_ledger(leases, b.caps, now=T0 + 2 * H)
    c = u.cap("org-a/c")
    assert c.gpus == 2
    assert c.gpu_hours == pytest.approx(2 * 2 + 3 * 1)
    assert u.cap("none/x").gpus == 0


def test_committed_hours_for_open_leases_until_expected_end() -> None:
    leases = [
        lease("a", K, 8, T0, expected_end=T0 + 10 * H),
        lease("b", K, 2, T0, expected_end=T0 + H),  # overdue at now: commits nothing more
        lease("c", K, 4, T0),  # no maxDuration: unbounded
        lease("d", K, 1, T0, role=Role.SPARE, expected_end=T0 + 10 * H),
    ]
    m = usage_from_ledger(leases, now=T0 + 4 * H, spare_factor=0.5).envelope(K).total
    assert m.committed_gpu_hours == pytest.approx(8 * 6 + 1 * 6 * 0.5)
    assert m.unbounded_gpus == 4


def test_tracker_matches_replay_on_a_small_story() -> None:
    t = UsageTracker(spare_factor=0.25)
    a = lease("a", K, 8, T0, expected_end=T0 + 5 * H)
    b = lease("b", K, 4, T0 + H, role=Role.SPARE)
    t.open(a)
    t.open(b)
    t.close("b", T0 + 2 * H)
    snap = t.snapshot(T0 + 3 * H)
    ledger = [a, replace(b, end=T0 + 2 * H)]
    assert snap == usage_from_ledger(ledger, now=T0 + 3 * H, spare_factor=0.25)
    assert t.open_leases == (a,)


def test_tracker_is_idempotent_and_strict() -> None:
    t = UsageTracker()
    a = lease("a", K, 8, T0)
    t.open(a)
    t.open(a)
    t.close("a", T0 + H)
    t.close("a", T0 + 2 * H)  # re-sent close: ignored
    t.open(a)  # a closed lease never reopens
    assert t.snapshot(T0 + 2 * H).gpu_hours(K) == pytest.approx(8)
    with pytest.raises(KeyError):
        t.close("zzz", T0 + 2 * H)
    t.open(lease("b", K, 1, T0 + 2 * H))
    with pytest.raises(ValueError):
        t.close("b", T0)
    with pytest.raises(ValueError):
        t.snapshot(T0 + H)  # earlier than recorded events


def test_tracker_records_already_closed_leases() -> None:
    t = UsageTracker()
    closed = lease("a", K, 2, T0, end=T0 + 3 * H)
    t.open(closed)
    assert t.snapshot(T0 + 4 * H) == usage_from_ledger([closed], now=T0 + 4 * H)


# -- property: incremental == replay --------------------------------------------------------------

_ENVS = ("b/e1", "b/e2", "c/e1")


Op = Lease | tuple[str, datetime] | datetime
"""A lease to open, (name, at) to close, or an instant to snapshot."""


@st.composite
def _stories(draw: st.DrawFn) -> list[Op]:
    """A time-ordered script of open/close/snapshot operations."""
    ops: list[Op] = []
    now = T0
    open_names: list[str] = []
    for i in range(draw(st.integers(1, 40))):
        now += timedelta(minutes=draw(st.integers(0, 180)))
        action = draw(st.sampled_from(("open", "open", "close", "snap")))
        if action == "close" and open_names:
            name = open_names.pop(draw(st.integers(0, len(open_names) - 1)))
            ops.append((name, now))
        elif action == "snap":
            ops.append(now)
        else:
            back = timedelta(minutes=draw(st.integers(0, 120)))
            start = now - back
            exp = draw(st.one_of(st.none(), st.integers(0, 600)))
            lz = Lease(
                name=f"l{i}",
                run=("ns", f"r{i % 3}"),
                owner="org:a",
                node="n",
                gpus=draw(st.integers(1, 8)),
                role=draw(st.sampled_from(list(Role))),
                group=0,
                rank=0,
                envelope=draw(st.sampled_from(_ENVS)),
                payer_owner="org:a",
                funding=draw(st.sampled_from(list(FundingKind))),
                start=start,
                expected_end=None if exp is None else start + timedelta(minutes=exp),
            )
            open_names.append(lz.name)
            ops.append(lz)
    ops.append(now + timedelta(minutes=draw(st.integers(0, 300))))
    return ops


@settings(max_examples=300, deadline=None)
@given(_stories(), st.sampled_from((1.0, 0.5, 0.3)))
def test_property_tracker_equals_full_replay(ops: list[Op], factor: float) -> None:
    caps = budget("b", env("e1", 8), env("e2", 8), name="b", caps=[cap("both", ["e1", "e2"])]).caps
    tracker = UsageTracker(caps, spare_factor=factor)
    ledger: dict[str, Lease] = {}
    for op in ops:
        if isinstance(op, Lease):
            tracker.open(op)
            ledger[op.name] = op
        elif isinstance(op, tuple):
            name, at = op
            tracker.close(name, at)
            ledger[name] = replace(ledger[name], end=at)
        else:
            snap = tracker.snapshot(op)
            assert snap == usage_from_ledger(ledger.values(), caps, now=op, spare_factor=factor)


@settings(max_examples=300, deadline=None)
@given(_stories(), st.sampled_from((1.0, 0.5)), st.integers(-600, 600))
def test_property_settled_totals_plus_open_leases_equal_a_full_replay(
    ops: list[Op], factor: float, shift: int
) -> None:
    """A cache keeps ended leases summed in ``Settled`` and replays only the open ones; at any
    instant (also before some of the settled leases ended) that equals replaying everything."""
    caps = budget("b", env("e1", 8), env("e2", 8), name="b", caps=[cap("both", ["e1", "e2"])]).caps
    ledger: dict[str, Lease] = {}
    for op in ops:
        if isinstance(op, Lease):
            ledger[op.name] = op
        elif isinstance(op, tuple):
            name, at = op
            ledger[name] = replace(ledger[name], end=at)
    now = ops[-1] + timedelta(minutes=shift) if isinstance(ops[-1], datetime) else T0
    settled = Settled()
    for record in ledger.values():
        if record.end is not None:
            settled.add(record)
            settled.add(record)  # idempotent
    rest = [record for record in ledger.values() if record.end is None]
    full = usage_from_ledger(ledger.values(), caps, now=now, spare_factor=factor)
    assert usage_from_ledger(rest, caps, now=now, spare_factor=factor, settled=settled) == full


def test_settled_leases_can_be_discarded_and_open_ones_are_refused() -> None:
    ended = replace(lease("a", K, 8, T0), end=T0 + H)
    other = replace(lease("b", K, 4, T0), end=T0 + 2 * H)
    settled = Settled()
    settled.add(ended)
    settled.add(other)
    settled.discard("b")
    settled.discard("missing")
    now = T0 + 3 * H
    assert "a" in settled and "b" not in settled
    assert usage_from_ledger([], now=now, settled=settled) == usage_from_ledger([ended], now=now)
    with pytest.raises(ValueError, match="open"):
        settled.add(lease("c", K, 1, T0))


# -- per-run funding ------------------------------------------------------------------------------


def test_run_funding_splits_owned_shared_borrowed_with_sponsor_rows() -> None:
    now = T0 + 2 * H
    leases = [
        lease("o1", "a/e", 64, T0, funding=FundingKind.OWNED, owner="org:a"),
        lease("o2", "a/e", 8, T0, end=T0 + H, funding=FundingKind.OWNED, owner="org:a"),
        lease("f1", "p/e", 16, T0, funding=FundingKind.FAMILY, payer_owner="org"),
        lease("s1", "x/e", 32, T0, funding=FundingKind.SPONSOR, payer_owner="ext:x"),
        lease(
            "s2", "y/e", 8, T0, role=Role.SPARE, funding=FundingKind.SPONSOR, payer_owner="ext:b"
        ),
    ]
    f = run_funding(leases, now=now, spare_factor=0.5)
    assert (f.owned_gpus, f.shared_gpus, f.borrowed_gpus) == (64, 16, 40)
    assert f.owned_gpu_hours == pytest.approx(64 * 2 + 8)
    assert f.shared_gpu_hours == pytest.approx(32)
    assert f.borrowed_gpu_hours == pytest.approx(64 + 8)
    assert [(s.owner, s.kind, s.gpus) for s in f.sponsors] == [
        ("org", FundingKind.FAMILY, 16),
        ("ext:b", FundingKind.SPONSOR, 8),
        ("ext:x", FundingKind.SPONSOR, 32),
    ]
    status = f.as_status()
    assert status["borrowedGPUs"] == 40
    assert status["sponsors"][0] == {"owner": "org", "kind": "family", "gpus": 16, "gpuHours": 32.0}


def test_run_funding_of_a_finished_run_keeps_hours_not_gpus() -> None:
    f = run_funding([lease("a", "a/e", 4, T0, end=T0 + H)], now=T0 + 5 * H)
    assert f.owned_gpus == 0
    assert f.owned_gpu_hours == pytest.approx(4)


# -- headroom -------------------------------------------------------------------------------------


def test_headroom_open_window() -> None:
    b = budget("org:a", env("e", 16, max_gpu_hours=100))
    e = b.envelopes[0]
    u = usage_from_ledger([lease("a", e.key, 6, T0)], now=T0 + 2 * H)
    h = headroom(e, u, T0 + 2 * H)
    assert h.concurrency_gpus == 10
    assert h.gpu_hours == pytest.approx(88)
    assert h.window_open


def test_headroom_never_negative_and_window_states() -> None:
    b = budget("org:a", env("e", 4, start=T0 + H, end=T0 + 3 * H))
    e = b.envelopes[0]
    u = usage_from_ledger([lease("a", e.key, 6, T0)], now=T0)
    before = headroom(e, u, T0)
    assert before.concurrency_gpus == 0
    assert before.gpu_hours is None
    assert not before.window_open
    after = headroom(e, usage_from_ledger([], now=T0), T0 + 3 * H)
    assert after.concurrency_gpus == 0 and not after.window_open


def test_cap_headroom() -> None:
    b = budget("org:a", env("e1", 8), env("e2", 8), caps=[cap("c", ["e1", "e2"], max_gpu_hours=10)])
    u = usage_from_ledger([lease("a", "org-a/e1", 2, T0)], b.caps, now=T0 + H)
    h = cap_headroom(b.caps[0], u)
    assert h.concurrency_gpus is None
    assert h.gpu_hours == pytest.approx(8)
