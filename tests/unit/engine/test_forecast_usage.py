"""The forecast's cheap usage-at-t equals a full ledger replay for every figure cover reads."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.accounting import usage_from_ledger
from shared.engine.forecast import usage_at
from shared.engine.model import AggregateCap, FundingKind, Lease, Role

from .fleet import T0

ENVELOPES = ("b/e1", "b/e2", "c/e3")
CAPS = (AggregateCap("b", "both", "H100-80GB", ("b/e1", "b/e2"), max_concurrency=10),)


@st.composite
def ledgers(draw: st.DrawFn) -> list[Lease]:
    out = []
    for i in range(draw(st.integers(0, 25))):
        start = T0 + timedelta(minutes=draw(st.integers(0, 600)))
        out.append(
            Lease(
                name=f"l{i}",
                run=("ns", f"r{i % 4}"),
                owner="o",
                node=f"n{i % 5}",
                gpus=draw(st.integers(1, 8)),
                role=draw(st.sampled_from(list(Role))),
                group=0,
                rank=i,
                envelope=draw(st.sampled_from(ENVELOPES)),
                payer_owner="p",
                funding=draw(st.sampled_from(list(FundingKind))),
                start=start,
                expected_end=start + timedelta(minutes=draw(st.integers(1, 2000))),
            )
        )
    return out


@settings(max_examples=200, deadline=None)
@given(ledgers(), st.integers(601, 3000))
def test_usage_at_matches_replay(ledger: list[Lease], minutes: int) -> None:
    now, at = T0 + timedelta(minutes=600), T0 + timedelta(minutes=minutes)
    base = usage_from_ledger(ledger, CAPS, now=now)
    ended = [x for x in ledger if x.expected_end is not None and x.expected_end <= at]
    closed = {x.name for x in ended}
    replay = usage_from_ledger(
        [_close(x, now) if x.name in closed else x for x in ledger], CAPS, now=at
    )
    fast = usage_at(base, ended, _caps_for)
    for key in ENVELOPES:
        got, want = fast.envelope(key), replay.envelope(key)
        for part in ("total", "owned", "shared", "borrowed_out", "spare", "lent"):
            g, w = getattr(got, part), getattr(want, part)
            assert g.gpus == w.gpus, (key, part)
            spent = g.gpu_hours + g.committed_gpu_hours
            assert abs(spent - (w.gpu_hours + w.committed_gpu_hours)) < 1e-6, (key, part)
    assert fast.cap("b/both").gpus == replay.cap("b/both").gpus


def _caps_for(key: str) -> tuple[AggregateCap, ...]:
    return tuple(cap for cap in CAPS if key in cap.envelopes)


def _close(lease: Lease, now: datetime) -> Lease:
    """Closed at its expected end; a lease already past it (overdue) ends now, not in the past."""
    assert lease.expected_end is not None
    return replace(lease, end=max(lease.expected_end, now))
