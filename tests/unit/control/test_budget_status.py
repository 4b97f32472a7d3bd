"""Budget status: headroom and the owned/shared/borrowed-out/spare split, from the ledger only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from shared.control.budget_status import budget_status, envelope_figures, material
from shared.engine.accounting import usage_from_ledger
from shared.engine.model import (
    AggregateCap,
    Budget,
    Envelope,
    FundingKind,
    Lease,
    Role,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SEL = {"region": "us-west"}


def _env(name: str, concurrency: int, **kw: object) -> Envelope:
    return Envelope(
        budget="b",
        owner="org:ai",
        name=name,
        flavor="H100-80GB",
        selector=SEL,
        concurrency=concurrency,
        **kw,  # type: ignore[arg-type]
    )


def _lease(
    name: str,
    env: str,
    gpus: int,
    funding: FundingKind,
    role: Role = Role.ACTIVE,
    hours_ago: float = 2.0,
    closed_hours_ago: float | None = None,
) -> Lease:
    return Lease(
        name=name,
        run=("ns", name),
        owner="org:ai",
        node="n1",
        gpus=gpus,
        role=role,
        group=0,
        rank=0,
        envelope=f"b/{env}",
        payer_owner="org:ai",
        funding=funding,
        start=T0 - timedelta(hours=hours_ago),
        end=None if closed_hours_ago is None else T0 - timedelta(hours=closed_hours_ago),
    )


BUDGET = Budget(
    name="b",
    owner="org:ai",
    parents=(),
    envelopes=(
        _env("main", 32, max_gpu_hours=1000.0),
        _env("later", 8, start=T0 + timedelta(days=1)),
        _env("gone", 8, end=T0 - timedelta(hours=1)),
    ),
    caps=(
        AggregateCap(
            budget="b",
            name="conc",
            flavor="H100-80GB",
            envelopes=("b/main", "b/later"),
            max_concurrency=36,
        ),
        AggregateCap(
            budget="b",
            name="hours",
            flavor="H100-80GB",
            envelopes=("b/main", "b/later"),
            max_gpu_hours=500.0,
        ),
    ),
)
LEDGER = (
    _lease("own", "main", 8, FundingKind.OWNED),
    _lease("fam", "main", 4, FundingKind.FAMILY),
    _lease("spon", "main", 2, FundingKind.SPONSOR),
    _lease("spare", "main", 1, FundingKind.OWNED, Role.SPARE),
    _lease("old", "main", 8, FundingKind.OWNED, hours_ago=10, closed_hours_ago=5),
)


def _status() -> dict[str, Any]:
    usage = usage_from_ledger(LEDGER, BUDGET.caps, now=T0, spare_factor=0.5)
    return budget_status(BUDGET, usage, now=T0, generation=3)


def test_envelope_headroom_and_usage_split() -> None:
    status = _status()
    main = status["envelopes"][0]
    # 15 GPUs held now; GPU-hours: (8+4+2)*2 + 1*2*0.5 + 8*5 = 69
    assert main["headroom"] == {"concurrency": 17, "gpuHours": 931.0}
    assert main["usage"] == {
        "owned": {"gpus": 8, "gpuHours": 56.0},
        "shared": {"gpus": 4, "gpuHours": 8.0},
        "borrowedOut": {"gpus": 2, "gpuHours": 4.0},
        "spare": {"gpus": 1, "gpuHours": 1.0},
    }
    assert main["active"] is True and main["flavor"] == "H100-80GB"


def test_windows_not_open_and_closed() -> None:
    status = _status()
    later, gone = status["envelopes"][1], status["envelopes"][2]
    assert later["active"] is False and later["headroom"] == {"concurrency": 8}
    assert gone["active"] is False
    assert gone["headroom"] == {"concurrency": 0}


def test_aggregate_caps_headroom() -> None:
    status = _status()
    conc, hours = status["aggregateCaps"]
    assert conc == {
        "name": "conc",
        "headroom": {"concurrency": 21},
        "usage": {"gpus": 15, "gpuHours": 69.0},
    }
    # No concurrency bound: the sum of its envelopes' headroom (17 + 8).
    assert hours["headroom"] == {"concurrency": 25, "gpuHours": 431.0}


def test_stamps_and_generation() -> None:
    status = _status()
    assert status["updatedAt"] == "2026-01-01T00:00:00Z"
    assert status["observedGeneration"] == 3
    assert "aggregateCaps" not in budget_status(
        Budget("x", "org", (), (_env("e", 4),)),
        usage_from_ledger((), now=T0),
        now=T0,
        generation=None,
    )


def test_material_ignores_timestamp_only() -> None:
    a = _status()
    usage = usage_from_ledger(LEDGER, BUDGET.caps, now=T0, spare_factor=0.5)
    b = budget_status(BUDGET, usage, now=T0, generation=3)
    b["updatedAt"] = "2027-01-01T00:00:00Z"
    assert material(a) == material(b)
    assert material(None) == {}


def test_metric_rows_split_by_class() -> None:
    usage = usage_from_ledger(LEDGER, BUDGET.caps, now=T0, spare_factor=0.5)
    figs = envelope_figures(BUDGET, usage, T0)
    assert [f.envelope for f in figs] == ["main", "later", "gone"]
    assert dict(figs[0].concurrency_by_class) == {
        "owned": 8,
        "shared": 4,
        "borrowed": 2,
        "spare": 1,
    }
    assert figs[0].headroom_gpus == 17 and figs[0].headroom_gpu_hours == 931.0
