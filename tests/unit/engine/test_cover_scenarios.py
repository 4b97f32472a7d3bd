"""End-to-end cover + accounting stories: family sharing across domains, a co-funded run."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from shared.engine.accounting import headroom, run_funding, usage_from_ledger
from shared.engine.cover import CoverDenied, allocate, cover, cover_demand
from shared.engine.family import Family
from shared.engine.model import CoverFailure, FundingKind, Lease, Role, RunRequest
from shared.engine.offers import Funding
from tests.unit.engine.budgets import T0, budget, env, lending, loc, request, root

H = timedelta(hours=1)
D1 = loc("us-east", "c1", "d1")
D2 = loc("us-east", "c1", "d2")


def _bind(req: RunRequest, funding: Funding, family: Family, now: datetime) -> list[Lease]:
    """What the binder would record: one lease per (payer, GPUs) slice of the greedy allocation."""
    kinds = {o.envelope.key: o.kind for o in funding.offers}
    out = []
    for i, (k, gpus) in enumerate(allocate(funding, cover_demand(req))):
        payer = family.envelope(k)
        out.append(
            Lease(
                name=f"{req.key[1]}-{i}",
                run=req.key,
                owner=req.owner,
                node=f"node-{i}",
                gpus=gpus,
                role=Role.ACTIVE,
                group=i,
                rank=i,
                envelope=k,
                payer_owner=payer.owner,
                funding=kinds[k],
                start=now,
                expected_end=None if req.max_duration is None else now + req.max_duration,
            )
        )
    return out


def test_family_sharing_across_two_domains() -> None:
    sys_, ml = "org:ai:rai:sys", "org:ai:rai:ml"
    fam = Family(
        [
            budget(sys_, env("d1", 32, selector=D1)),
            budget(ml, env("d2", 64, selector=D2)),
            root("org:ai:rai"),
        ]
    )
    req = request(sys_, 64, group_gpus=32, name="train", max_duration=10 * H)
    res = cover(req, fam, usage_from_ledger([], now=T0), now=T0)
    assert isinstance(res, Funding)
    # the owner's own location is d1; the sibling's d2 envelope comes as family in step 4
    assert [(o.envelope.key, o.kind) for o in res.offers] == [
        ("org-ai-rai-sys/d1", FundingKind.OWNED),
        ("org-ai-rai-ml/d2", FundingKind.FAMILY),
    ]
    leases = _bind(req, res, fam, T0)
    assert [(ls.envelope, ls.gpus) for ls in leases] == [
        ("org-ai-rai-sys/d1", 32),
        ("org-ai-rai-ml/d2", 32),
    ]

    now = T0 + 2 * H
    f = run_funding(leases, now=now)
    assert (f.owned_gpus, f.shared_gpus, f.borrowed_gpus) == (32, 32, 0)
    assert f.shared_gpu_hours == pytest.approx(64)
    assert [(s.owner, s.kind, s.gpus) for s in f.sponsors] == [(ml, FundingKind.FAMILY, 32)]

    usage = usage_from_ledger(leases, now=now)
    ml_env = fam.envelope("org-ai-rai-ml/d2")
    assert usage.envelope(ml_env.key).shared.gpus == 32
    assert headroom(ml_env, usage, now).concurrency_gpus == 32

    # the sibling can still run 32 of its own, but not 64: relatives hold the rest (a
    # Reservation follows and, at activation, the resolver reclaims the shared leases)
    own = request(ml, 64, name="ml-run")
    denied = cover(own, fam, usage, now=now)
    assert isinstance(denied, CoverDenied)
    assert denied.reason is CoverFailure.INSUFFICIENT_CAPACITY
    assert denied.shortfall == 32
    assert isinstance(cover(request(ml, 32, name="ml-small"), fam, usage, now=now), Funding)


def test_co_funded_run_96_owned_32_borrowed() -> None:
    me, lab = "org:ai:rai:sys", "ext:lab"
    fam = Family(
        [
            budget(me, env("east", 96)),
            budget(lab, env("east", 64, lend=lending("org:ai:*", max_concurrency=48))),
        ]
    )
    req = request(
        me,
        128,
        group_gpus=32,
        name="big",
        allow_borrow=True,
        max_borrow=32,
        sponsors=[lab],
        max_duration=24 * H,
    )
    res = cover(req, fam, usage_from_ledger([], now=T0), now=T0)
    assert isinstance(res, Funding)
    assert dict(res.caps) == {"lend:ext-lab/east": 48, "borrow": 32}
    leases = _bind(req, res, fam, T0)
    assert [(ls.envelope, ls.gpus, ls.funding) for ls in leases] == [
        ("org-ai-rai-sys/east", 96, FundingKind.OWNED),
        ("ext-lab/east", 32, FundingKind.SPONSOR),
    ]

    now = T0 + 3 * H
    f = run_funding(leases, now=now)
    assert (f.owned_gpus, f.borrowed_gpus) == (96, 32)
    assert f.owned_gpu_hours == pytest.approx(288)
    assert f.borrowed_gpu_hours == pytest.approx(96)
    assert f.as_status()["sponsors"] == [
        {"owner": lab, "kind": "sponsor", "gpus": 32, "gpuHours": pytest.approx(96)}
    ]

    usage = usage_from_ledger(leases, now=now)
    lent = usage.envelope("ext-lab/east")
    assert lent.borrowed_out.gpus == lent.lent.gpus == 32
    # a second borrower of the same lab hits the lender's remaining sub-cap (48 - 32 = 16)
    other = request(
        "org:ai:vision", 24, name="v", allow_borrow=True, sponsors=[lab], max_duration=H
    )
    denied = cover(other, fam, usage, now=now)
    assert isinstance(denied, CoverDenied)
    # org:ai:vision is family of the owner, so the owner's envelope is exhausted; lab lends 16
    assert denied.reason is CoverFailure.BORROW_LIMIT
    assert denied.shortfall == 8
